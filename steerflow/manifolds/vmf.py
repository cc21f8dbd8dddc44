"""Von Mises–Fisher mixtures on the sphere ``S²``: an exact density to use as a flow's source.

The vMF density on ``S² ⊂ R³`` with mean direction ``μ`` (``|μ| = 1``) and concentration ``κ ≥ 0``, with
respect to the area measure, is (Fisher 1953; Mardia & Jupp 2000, §9.3.2)

    ``f(x; μ, κ) = κ / (4π sinh κ) · exp(κ μᵀx) = κ / (2π (1 − e^{−2κ})) · exp(κ (μᵀx − 1))``,

the second form being the one evaluated (no overflow for large ``κ``; ``1/(4π)`` at ``κ = 0``). Its mean
resultant length is ``E[μᵀx] = A(κ) = coth κ − 1/κ``. Sampling is exact: ``w = μᵀx`` has density
``∝ e^{κ w}`` on ``[−1, 1]``, inverted in closed form (Wood 1994 for ``S²``),

    ``w = 1 + log(1 + (1 − u) (e^{−2κ} − 1)) / κ``,  ``u ~ U(0, 1)``,

and the direction orthogonal to ``μ`` is uniform. A mixture ``Σ_k π_k f(x; μ_k, κ_k)`` is fitted by EM
(Banerjee et al. 2005, "Clustering on the Unit Hypersphere using von Mises-Fisher Distributions"), whose
M-step solves ``A(κ_k) = r̄_k`` exactly by Newton's method, or built as a kernel density estimate
(one component per point, one ``κ``) with ``κ`` chosen on held-out points;
:meth:`VonMisesFisherMixture.fit_em_select` chooses the number of EM components and the concentration cap on
held-out points. :meth:`~VonMisesFisherMixture.save` / :meth:`~VonMisesFisherMixture.load` store a mixture as
``<name>.safetensors`` (float64 means, kappas, weights) and ``<name>.json`` (format and class), each written
atomically; a reload is bit-for-bit the saved mixture.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, final

import torch
from torch import Tensor

from ..models.pretrained import read_json, read_weights, write_json, write_weights

_LOG_2PI = math.log(2 * math.pi)
BASE_FORMAT = "steerflow.base"
"""The ``format`` of a saved source distribution (:meth:`VonMisesFisherMixture.save`)."""
BASE_VERSION = 1
DEFAULT_COMPONENTS = (10, 30, 100, 300)
"""The numbers of EM components :meth:`VonMisesFisherMixture.fit_em_select` tries by default."""


def vmf_log_normaliser(kappa: Tensor) -> Tensor:
    """``log (κ / (2π (1 − e^{−2κ})))`` elementwise: ``log f(x; μ, κ) = this + κ (μᵀx − 1)`` on ``S²``.

    Exact for every ``κ ≥ 0`` (``log(1/(4π))`` at ``κ = 0``, ``log κ − log 2π`` for large ``κ``)."""
    kappa = torch.as_tensor(kappa)
    small = kappa < 1e-6
    k = torch.where(small, torch.ones_like(kappa), kappa)
    # log(κ / (1 − e^{−2κ})) = −log 2 + κ − κ²/6 + O(κ⁴) near 0
    ratio = torch.where(small, -math.log(2.0) + kappa, torch.log(k) - torch.log(-torch.expm1(-2 * k)))
    return ratio - _LOG_2PI


def mean_resultant_length(kappa: Tensor) -> Tensor:
    """``A(κ) = E[μᵀx] = coth κ − 1/κ`` on ``S²`` (``κ/3`` near 0, ``1 − 1/κ`` for large ``κ``)."""
    kappa = torch.as_tensor(kappa)
    small = kappa < 1e-3
    k = torch.where(small, torch.ones_like(kappa), kappa)
    return torch.where(small, kappa / 3 - kappa ** 3 / 45, 1 / torch.tanh(k) - 1 / k)


def kappa_from_resultant(r: Tensor, kappa_max: float = 1e5) -> Tensor:
    """Solve ``A(κ) = r̄`` for ``κ`` (the vMF maximum-likelihood concentration on ``S²``), ``r̄ ∈ [0, 1]``.

    Start from Banerjee et al.'s ``κ₀ = r̄ (3 − r̄²) / (1 − r̄²)`` and take Newton steps on ``A(κ) − r̄``
    with ``A'(κ) = 1/κ² − 1/sinh² κ``; the result is clipped to ``[0, kappa_max]`` (``r̄ = 1``, a component on
    coincident points, has no finite solution)."""
    r = torch.as_tensor(r, dtype=torch.float64).clamp(0.0, 1.0)
    k = (r * (3 - r * r) / (1 - r * r).clamp_min(1e-300)).clamp(1e-8, kappa_max)
    for _ in range(30):
        big = k > 30
        kb = torch.where(big, torch.ones_like(k), k)
        d_a = torch.where(big, 1 / k ** 2, 1 / k ** 2 - 1 / torch.sinh(kb) ** 2)
        k = (k - (mean_resultant_length(k) - r) / d_a.clamp_min(1e-300)).clamp(1e-8, kappa_max)
    return torch.where(r <= 0, torch.zeros_like(k), k)


@final
class VonMisesFisherMixture:
    """``p(x) = Σ_k π_k κ_k / (4π sinh κ_k) exp(κ_k μ_kᵀx)`` on ``S²`` (points ``(b, 3)``).

    Args:
        means: ``(K, 3)`` mean directions (normalised here).
        kappas: ``(K,)`` concentrations ``κ_k ≥ 0``, or one number for every component.
        weights: ``(K,)`` non-negative mixture weights (normalised here); default equal.

    ``log_prob(x)`` is exact with respect to the area measure (it integrates to 1 over ``S²``) and
    ``sample(n, generator)`` draws exactly from ``p``; together they make it a flow source:
    ``train(..., source=mix.sample)`` and ``manifold_log_likelihood(..., base_log_prob=mix.log_prob)``.
    Parameters are kept in float64.
    """

    def __init__(self, means: Tensor, kappas: Tensor | float, weights: Tensor | None = None) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2 or means.shape[1] != 3 or means.shape[0] < 1:
            raise ValueError(f"means must have shape (K, 3) with K ≥ 1 (the sphere S² in R³), "
                             f"got {tuple(means.shape)}")
        norms = means.norm(dim=1, keepdim=True)
        if not torch.isfinite(means).all() or (norms == 0).any():
            raise ValueError("means must be finite and non-zero")
        K = means.shape[0]
        kappas = torch.as_tensor(kappas, dtype=torch.float64)
        kappas = kappas.expand(K).clone() if kappas.ndim == 0 else kappas
        if kappas.shape != (K,) or not torch.isfinite(kappas).all() or (kappas < 0).any():
            raise ValueError(f"kappas must be {K} finite values ≥ 0 (or one number), got shape {tuple(kappas.shape)}")
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {K} finite values ≥ 0 with a positive sum, "
                             f"got shape {tuple(weights.shape)}")
        self.means, self.kappas, self.weights = _normalised(means, norms), kappas, _normalised(weights, weights.sum())

    def __repr__(self) -> str:
        lo, hi = float(self.kappas.min()), float(self.kappas.max())
        return f"VonMisesFisherMixture(K={len(self)}, kappa∈[{lo:.3g}, {hi:.3g}])"

    def __len__(self) -> int:
        return self.means.shape[0]

    # --- density --------------------------------------------------------------------------------

    def component_log_prob(self, x: Tensor) -> Tensor:
        """``log π_k + log f(x_i; μ_k, κ_k)`` (b, K), in float64, on ``x``'s device."""
        x = _check_points(x)
        means, kappas, weights = (p.to(x.device) for p in (self.means, self.kappas, self.weights))
        log_c = vmf_log_normaliser(kappas) + torch.log(weights)
        return log_c + kappas * (x.double() @ means.T - 1)

    def log_prob(self, x: Tensor, *, chunk: int = 4096) -> Tensor:
        """``log p(x)`` (b,) w.r.t. the area measure of ``S²``, returned in ``x``'s dtype. Points are
        processed ``chunk`` at a time so memory is ``chunk × K``."""
        x = _check_points(x)
        out = [torch.logsumexp(self.component_log_prob(xb), dim=1) for xb in torch.split(x, chunk)]
        return torch.cat(out).to(x.dtype)

    __call__ = log_prob

    # --- sampling -------------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None, *, dtype: torch.dtype = torch.float32,
               device=None) -> Tensor:
        """``n`` exact draws ``(n, 3)``: a component ``k ~ π``, then ``w = μ_kᵀx`` by the inverse CDF and a
        uniform direction orthogonal to ``μ_k``. Same generator state, same samples."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int ≥ 0, got {n!r}")
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator) if n else \
            torch.zeros(0, dtype=torch.long)
        return self._draw(k, generator, dtype=dtype, device=device)

    def sample_given(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One draw per point of ``x`` (b, 3) from the component it belongs to: ``k ~ p(k | x_i)`` (the EM
        responsibilities), then ``x_0 ~ vMF(μ_k, κ_k)``; returned in ``x``'s dtype and device.

        Paired with their points, the draws make a coupling of the data and the mixture whose source marginal is
        ``Σ_k (mean_i p(k | x_i)) vMF_k`` — the mixture itself when its weights are the mean responsibilities of
        the data (an EM fixed point): a flow trained on these pairs only has to move each point within its own
        component (:meth:`coupling`)."""
        x = _check_points(x)
        logits = torch.cat([self.component_log_prob(xb) for xb in torch.split(x, 4096)]).cpu()
        k = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator)[:, 0] if x.shape[0] else \
            torch.zeros(0, dtype=torch.long)
        return self._draw(k, generator, dtype=x.dtype, device=x.device)

    def coupling(self):
        """A training coupling ``(x_0, x_1, labels=None, generator=None) -> (x_0', x_1)`` that replaces the source
        draws by :meth:`sample_given` of the data batch (for ``steerflow.training.train(coupling=...)``, with
        ``source=self.sample``)."""
        def couple(x0: Tensor, x1: Tensor, labels=None, generator: torch.Generator | None = None):
            return self.sample_given(x1, generator).to(x0.dtype), x1
        return couple

    def _draw(self, k: Tensor, generator: torch.Generator | None, *, dtype: torch.dtype, device) -> Tensor:
        """One draw from component ``k[i]`` per entry (Wood's inverse CDF for ``w = μᵀx``, a uniform direction)."""
        n = k.shape[0]
        mu, kappa = self.means[k], self.kappas[k]
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        small = kappa < 1e-8
        kk = torch.where(small, torch.ones_like(kappa), kappa)
        w = torch.where(small, 2 * u - 1, 1 + torch.log1p((1 - u) * torch.expm1(-2 * kk)) / kk).clamp(-1.0, 1.0)
        z = torch.randn((n, 3), generator=generator, dtype=torch.float64)
        v = z - (z * mu).sum(-1, keepdim=True) * mu
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        x = w[:, None] * mu + torch.sqrt((1 - w * w).clamp_min(0.0))[:, None] * v
        x = x / x.norm(dim=-1, keepdim=True)
        return x.to(dtype=dtype, device=device or "cpu")

    # --- fitting --------------------------------------------------------------------------------

    @classmethod
    def kde(cls, centres: Tensor, kappa: float) -> VonMisesFisherMixture:
        """The kernel density estimate ``1/N Σ_i f(x; x_i, κ)`` with one component per centre."""
        return cls(centres, float(kappa))

    @classmethod
    def fit_kde(cls, train: Tensor, val: Tensor, kappas=None) -> tuple[VonMisesFisherMixture, float]:
        """The KDE on ``train`` whose ``κ`` (from ``kappas``, default 46 log-spaced values in ``[1, 10^4.5]``)
        maximises the mean log-likelihood of ``val``; returns ``(mixture, κ)``."""
        kappas = torch.logspace(0, 4.5, 46).tolist() if kappas is None else [float(k) for k in kappas]
        if not kappas:
            raise ValueError("kappas must hold at least one value")
        scores = [float(cls.kde(train, k).log_prob(_check_points(val).double()).mean()) for k in kappas]
        best = max(range(len(kappas)), key=scores.__getitem__)
        return cls.kde(train, kappas[best]), kappas[best]

    @classmethod
    def fit_em(cls, x: Tensor, k: int, *, generator: torch.Generator | None = None, iters: int = 200,
               tol: float = 1e-8, kappa_init: float = 10.0, kappa_max: float = 1e5,
               init: Tensor | None = None) -> VonMisesFisherMixture:
        """Maximum-likelihood mixture of ``k`` components by EM (Banerjee et al. 2005).

        E-step: responsibilities ``r_ik ∝ π_k f(x_i; μ_k, κ_k)``. M-step: ``π_k = mean_i r_ik``,
        ``μ_k = s_k / |s_k|`` with ``s_k = Σ_i r_ik x_i``, and ``κ_k`` solving ``A(κ_k) = |s_k| / Σ_i r_ik``
        (clipped at ``kappa_max``). Means start at ``init`` (k, 3) or at ``k`` distinct data points drawn with
        ``generator``; stops when the mean log-likelihood gains less than ``tol``.
        """
        x = _check_points(x).double()
        if not isinstance(k, int) or not 1 <= k <= x.shape[0]:
            raise ValueError(f"k must be an int in [1, {x.shape[0]}] (the number of points), got {k!r}")
        if init is None:
            means = x[torch.randperm(x.shape[0], generator=generator)[:k]]
        else:
            means = torch.as_tensor(init, dtype=torch.float64)
            if means.shape != (k, 3):
                raise ValueError(f"init must have shape ({k}, 3), got {tuple(means.shape)}")
        mix = cls(means, float(kappa_init))
        prev = -math.inf
        for _ in range(iters):
            lp = mix.component_log_prob(x)
            ll = torch.logsumexp(lp, dim=1, keepdim=True)
            r = torch.exp(lp - ll)                          # (b, K) responsibilities
            nk = r.sum(0)
            keep = nk > 1e-10                                # drop components that lost every point
            r, nk = r[:, keep], nk[keep]
            s = r.T @ x                                      # (K, 3)
            s_norm = s.norm(dim=1)
            kappa = kappa_from_resultant((s_norm / nk).clamp(0, 1), kappa_max)
            mix = cls(s / s_norm[:, None].clamp_min(1e-300), kappa, nk)
            cur = float(ll.mean())
            if cur - prev < tol:
                break
            prev = cur
        return mix

    @classmethod
    def fit_em_select(cls, train: Tensor, held_out: Tensor | None = None,
                      components: Sequence[int] = DEFAULT_COMPONENTS, kappa_max: Sequence[float] = (1e4,), *,
                      seed: int = 0, iters: int = 100,
                      held_out_fraction: float = 0.1) -> tuple[VonMisesFisherMixture, EMSelection]:
        """The EM mixture on ``train`` with the lowest mean ``-log p`` on ``held_out`` over every ``K`` in
        ``components`` (capped at the number of training points, duplicates dropped) and every cap in
        ``kappa_max``. Each fit is :meth:`fit_em` with ``iters`` iterations and its own
        ``torch.Generator().manual_seed(seed)``; the first of equal scores is kept.

        Without ``held_out``: a single candidate pair is fitted on ``train`` with no choice (``held_out_nll`` is
        None); several are chosen on a random ``held_out_fraction`` of ``train`` (at least one point, drawn with
        ``torch.Generator().manual_seed(seed)``), fitted on the rest, and the chosen pair is then fitted again on
        all of ``train``. Returns ``(mixture, EMSelection)``."""
        train = _check_points(train)
        ks = list(dict.fromkeys(min(int(k), train.shape[0]) for k in components))
        caps = [float(c) for c in kappa_max]
        if not ks or not caps or any(k < 1 for k in ks) or any(not c > 0 for c in caps):
            raise ValueError(f"components must be ints ≥ 1 and kappa_max numbers > 0 (at least one of each), got "
                             f"{list(components)} and {list(kappa_max)}")
        candidates = tuple((k, c) for k in ks for c in caps)

        def fit(x: Tensor, k: int, cap: float) -> VonMisesFisherMixture:
            return cls.fit_em(x, min(k, x.shape[0]), iters=iters, kappa_max=cap,
                              generator=torch.Generator().manual_seed(seed))

        if held_out is None and len(candidates) == 1:
            mix = fit(train, *candidates[0])
            return mix, EMSelection(*candidates[0], held_out_nll=None, fitted=len(mix), candidates=candidates,
                                    chosen_on=None)
        chosen_on, fit_on = "held_out", train
        if held_out is None:
            if not 0 < held_out_fraction < 1 or train.shape[0] < 2:
                raise ValueError(f"choosing among {len(candidates)} (K, kappa_max) pairs without held_out points "
                                 f"needs held_out_fraction in (0, 1) and at least 2 training points, got "
                                 f"{held_out_fraction} and {train.shape[0]}")
            n_out = min(max(1, round(held_out_fraction * train.shape[0])), train.shape[0] - 1)
            perm = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
            chosen_on, fit_on, held_out = "train_slice", train[perm[n_out:]], train[perm[:n_out]]
        held_out = _check_points(held_out)
        if held_out.shape[0] < 1:
            raise ValueError("held_out must hold at least one point to choose the mixture on")
        best = None
        for k, cap in candidates:
            mix = fit(fit_on, k, cap)
            nll = float(-mix.log_prob(held_out.double()).mean())
            if best is None or nll < best[0]:
                best = (nll, min(k, fit_on.shape[0]), cap, mix)
        nll, k, cap, mix = best
        if fit_on is not train:
            mix = fit(train, k, cap)
        return mix, EMSelection(k, cap, held_out_nll=nll, fitted=len(mix), candidates=candidates,
                                chosen_on=chosen_on)

    # --- files ----------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike, name: str = "base") -> Path:
        """Write ``directory/<name>.safetensors`` (``means``, ``kappas``, ``weights`` in float64) and then
        ``directory/<name>.json`` (format, class, number of components), each atomically; the JSON file, written
        last, marks a complete pair (an older one is removed first). Returns the JSON file's path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        config = d / f"{name}.json"
        config.unlink(missing_ok=True)
        write_weights({"means": self.means, "kappas": self.kappas, "weights": self.weights},
                      d / f"{name}.safetensors", fmt=BASE_FORMAT)
        write_json({"format": BASE_FORMAT, "version": BASE_VERSION, "class": type(self).__name__,
                    "manifold": "sphere2", "components": len(self), "tensors": f"{name}.safetensors"}, config)
        return config

    @classmethod
    def load(cls, directory: str | os.PathLike, name: str = "base") -> VonMisesFisherMixture:
        """The mixture :meth:`save` wrote into ``directory``, bit for bit. ``FileNotFoundError`` naming a missing
        file, ``ValueError`` naming a corrupt one (bad JSON or safetensors, wrong format, class, keys, shapes or
        dtypes, or parameters that are not a normalised mixture)."""
        config = Path(directory) / f"{name}.json"
        meta = read_json(config)
        if not (isinstance(meta, dict) and meta.get("format") == BASE_FORMAT and isinstance(meta.get("tensors"), str)):
            raise ValueError(f"corrupt {config}: not a {BASE_FORMAT} file with a 'tensors' entry")
        if not isinstance(meta.get("version"), int) or meta["version"] > BASE_VERSION:
            raise ValueError(f"{config} has version {meta.get('version')!r}; this steerflow reads <= {BASE_VERSION}")
        if meta.get("class") != cls.__name__:
            raise ValueError(f"{config} holds a {meta.get('class')!r}, not a {cls.__name__}")
        path = config.parent / meta["tensors"]
        t = read_weights(path)
        K = t["means"].shape[0] if "means" in t and t["means"].ndim == 2 else -1
        if (set(t) != {"means", "kappas", "weights"} or any(v.dtype != torch.float64 for v in t.values())
                or t["means"].shape != (K, 3) or t["kappas"].shape != (K,) or t["weights"].shape != (K,)):
            raise ValueError(f"corrupt {path}: expected float64 tensors means (K, 3), kappas (K,), weights (K,), got "
                             f"{ {k: (tuple(v.shape), str(v.dtype)) for k, v in t.items()} }")
        try:
            mix = cls(t["means"], t["kappas"], t["weights"])
        except ValueError as e:
            raise ValueError(f"corrupt {path}: {e}") from None
        # the stored parameters were normalised when fitted (and the constructor keeps normalised ones bit for bit)
        if not (torch.equal(mix.means, t["means"]) and torch.equal(mix.weights, t["weights"])):
            raise ValueError(f"corrupt {path}: the means are not unit vectors or the weights do not sum to 1")
        return mix


@dataclass(frozen=True)
class EMSelection:
    """The mixture :meth:`VonMisesFisherMixture.fit_em_select` kept: ``components`` asked of EM (``fitted`` were
    left after EM dropped empty ones), the concentration cap ``kappa_max``, the mean negative log-likelihood
    ``held_out_nll`` (nats) of the points it was chosen on, ``candidates`` (the ``(K, κ_max)`` pairs tried) and
    ``chosen_on``: ``"held_out"`` (the points given), ``"train_slice"`` (a slice of the training points, held out,
    then the choice fitted on all of them) or None (one candidate, no choice)."""

    components: int
    kappa_max: float
    held_out_nll: float | None
    fitted: int
    candidates: tuple[tuple[int, float], ...]
    chosen_on: str | None


DEFAULT_SITE_KAPPA = 1e8
"""The concentration of a repeated site's component: peak density ``κ/2π ≈ 1.6·10⁷`` per steradian, that of a
unit mass spread over one cell of a 0.01° latitude–longitude grid near the equator (``≈ 3·10⁻⁸`` sr) — the
coordinate resolution of the earth catalogues. On a test point that repeats a training site, the log-density
grows like ``log κ``: figures on catalogues with repeats depend on this number."""


@final
class RepeatedSites:
    """A density for catalogues whose events recur at the same coordinates (a volcano erupts again, an
    earthquake is filed at its region's coordinates), around a continuous density ``q`` of new sites:

        ``p(x) = λ Σ_u w_u f(x; s_u, κ) + (1 − λ) q(x)``,  ``w_u ∝ n_u − d``,

    over the distinct training sites ``s_u`` with counts ``n_u`` (a Pitman–Yor-style predictive rule: a new event
    repeats site ``u`` with probability ``∝ n_u − d``, ``0 ≤ d < 1``). ``κ`` is fixed (:data:`DEFAULT_SITE_KAPPA`);
    ``λ`` and ``d`` are chosen on held-out points by :meth:`select`. ``q`` is anything with an exact log-density
    on ``S²`` — a :class:`VonMisesFisherMixture` fitted on :attr:`sites`, or a flow with such a base — passed to
    :meth:`log_prob` as its values, so a flow's likelihood is computed once.

    Args:
        sites: ``(U, 3)`` distinct points.
        counts: ``(U,)`` their multiplicities (``≥ 1``).
        kappa: the concentration ``κ`` of every site's component.
        weight: ``λ ∈ [0, 1)``, the probability of a repeated site.
        discount: ``d ∈ [0, 1)``."""

    def __init__(self, sites: Tensor, counts: Tensor, *, kappa: float = DEFAULT_SITE_KAPPA, weight: float = 0.5,
                 discount: float = 0.0) -> None:
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.ndim != 1 or counts.shape[0] != sites.shape[0] or not (counts >= 1).all():
            raise ValueError(f"counts must be {sites.shape[0]} values ≥ 1 (one per site), got shape "
                             f"{tuple(counts.shape)}")
        if not 0 <= weight < 1 or not 0 <= discount < 1 or not kappa > 0:
            raise ValueError(f"weight and discount must lie in [0, 1) and kappa be > 0, got {weight}, {discount}, "
                             f"{kappa}")
        self.atoms = VonMisesFisherMixture(sites, float(kappa), counts - discount)
        self.counts, self.kappa, self.weight, self.discount = counts, float(kappa), float(weight), float(discount)

    def __repr__(self) -> str:
        return (f"RepeatedSites(U={len(self)}, events={int(self.counts.sum())}, kappa={self.kappa:.3g}, "
                f"weight={self.weight:.3f}, discount={self.discount:.2f})")

    def __len__(self) -> int:
        return self.counts.shape[0]

    @property
    def sites(self) -> Tensor:
        """The distinct sites ``(U, 3)`` in float64 (the points to fit the continuous part ``q`` on)."""
        return self.atoms.means

    def with_weight(self, weight: float, discount: float | None = None) -> RepeatedSites:
        """The same sites (bit for bit) with another ``λ`` (and discount ``d``, default this one's)."""
        return RepeatedSites(self.sites, self.counts, kappa=self.kappa, weight=weight,
                             discount=self.discount if discount is None else discount)

    @classmethod
    def from_points(cls, x: Tensor, **kwargs) -> RepeatedSites:
        """The distinct rows of ``x`` (bit-identical coordinates are one site) and their counts; ``kwargs`` go to
        the constructor."""
        x = _check_points(x)
        if x.shape[0] < 1:
            raise ValueError("x must hold at least one point")
        sites, counts = torch.unique(x.double(), dim=0, return_counts=True)
        return cls(sites, counts, **kwargs)

    def repeats(self, x: Tensor, tol: float = 1e-7) -> Tensor:
        """Boolean ``(b,)``: which points of ``x`` lie within chord distance ``tol`` of a site."""
        x = _check_points(x).double()
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool, device=x.device)
        sites = self.sites.to(x.device)
        near = torch.cat([torch.cdist(xb, sites, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
                          for xb in torch.split(x, 1024)])
        return near <= tol

    def log_prob(self, x: Tensor, continuous_log_prob: Tensor) -> Tensor:
        """``log p(x)`` (b,) in float64, given ``log q(x)`` (b,)."""
        x = _check_points(x)
        q = torch.as_tensor(continuous_log_prob, dtype=torch.float64)
        if q.shape != (x.shape[0],):
            raise ValueError(f"continuous_log_prob must have shape ({x.shape[0]},), got {tuple(q.shape)}")
        return _two_part(self.atoms.log_prob(x.double()), q, self.weight)

    def sample(self, n: int, continuous_sample, generator: torch.Generator | None = None, *,
               dtype: torch.dtype = torch.float32, with_mask: bool = False):
        """``n`` draws on the CPU: each from the sites with probability ``λ``, else from
        ``continuous_sample(m, generator)`` (called once, for all of them). ``with_mask``: also return which draws came
        from the sites (``(n,)`` bool)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int ≥ 0, got {n!r}")
        at_site = torch.rand(n, generator=generator, dtype=torch.float64) < self.weight
        out = torch.empty((n, 3), dtype=dtype)
        m = int(at_site.sum())
        if m:
            out[at_site] = self.atoms.sample(m, generator, dtype=dtype)
        if n - m:
            out[~at_site] = continuous_sample(n - m, generator).to(device=out.device, dtype=dtype)
        return (out, at_site) if with_mask else out

    def select(self, held_out: Tensor, continuous_log_prob: Tensor, *, weights: Sequence[float] | None = None,
               discounts: Sequence[float] = (0.0, 0.5, 0.9)) -> tuple[RepeatedSites, float]:
        """The ``(λ, d)`` pair (from ``weights``, default ``0, 0.05, …, 0.95``, × ``discounts``) with the lowest mean
        ``-log p`` on ``held_out`` given ``log q(held_out)``; the first of equal scores is kept. Returns the chosen
        instance and its held-out NLL."""
        held_out = _check_points(held_out).double()
        weights = [round(0.05 * i, 2) for i in range(20)] if weights is None else [float(w) for w in weights]
        if not weights or not discounts or held_out.shape[0] < 1:
            raise ValueError("select needs at least one weight, one discount and one held-out point")
        q = torch.as_tensor(continuous_log_prob, dtype=torch.float64)
        if q.shape != (held_out.shape[0],):
            raise ValueError(f"continuous_log_prob must have shape ({held_out.shape[0]},), got {tuple(q.shape)}")
        # log f(x; s_u, κ) once; each discount only reweights it, each λ only mixes it with q
        log_f = self.atoms.component_log_prob(held_out) - torch.log(self.atoms.weights)
        best = None
        for d in (float(d) for d in discounts):
            w_d = self.counts - d
            sites_lp = torch.logsumexp(log_f + torch.log(w_d / w_d.sum()), dim=1)
            for w in weights:
                score = float(-_two_part(sites_lp, q, w).mean())
                if best is None or score < best[0]:
                    best = (score, w, d)
        score, w, d = best
        return self.with_weight(w, d), score

    # --- files ----------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike, name: str = "sites") -> Path:
        """Write ``directory/<name>.safetensors`` (``sites``, ``counts`` in float64) and then ``directory/<name>.json``
        (format, class, ``kappa``, ``weight``, ``discount``), each atomically. Returns the JSON file's path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        config = d / f"{name}.json"
        config.unlink(missing_ok=True)
        write_weights({"sites": self.sites, "counts": self.counts}, d / f"{name}.safetensors", fmt=BASE_FORMAT)
        write_json({"format": BASE_FORMAT, "version": BASE_VERSION, "class": type(self).__name__,
                    "manifold": "sphere2", "sites": len(self), "kappa": self.kappa, "weight": self.weight,
                    "discount": self.discount, "tensors": f"{name}.safetensors"}, config)
        return config

    @classmethod
    def load(cls, directory: str | os.PathLike, name: str = "sites") -> RepeatedSites:
        """What :meth:`save` wrote into ``directory``. ``FileNotFoundError`` naming a missing file, ``ValueError``
        naming a corrupt one."""
        config = Path(directory) / f"{name}.json"
        meta = read_json(config)
        if not (isinstance(meta, dict) and meta.get("format") == BASE_FORMAT and meta.get("class") == cls.__name__
                and isinstance(meta.get("tensors"), str)):
            raise ValueError(f"corrupt {config}: not a {BASE_FORMAT} file of a {cls.__name__}")
        if not isinstance(meta.get("version"), int) or meta["version"] > BASE_VERSION:
            raise ValueError(f"{config} has version {meta.get('version')!r}; this steerflow reads <= {BASE_VERSION}")
        path = config.parent / meta["tensors"]
        t = read_weights(path)
        U = t["sites"].shape[0] if "sites" in t and t["sites"].ndim == 2 else -1
        if (set(t) != {"sites", "counts"} or any(v.dtype != torch.float64 for v in t.values())
                or t["sites"].shape != (U, 3) or t["counts"].shape != (U,)):
            raise ValueError(f"corrupt {path}: expected float64 tensors sites (U, 3) and counts (U,), got "
                             f"{ {k: (tuple(v.shape), str(v.dtype)) for k, v in t.items()} }")
        try:
            out = cls(t["sites"], t["counts"], kappa=float(meta["kappa"]), weight=float(meta["weight"]),
                      discount=float(meta["discount"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupt {config}: {e}") from None
        if not torch.equal(out.sites, t["sites"]):
            raise ValueError(f"corrupt {path}: the sites are not unit vectors")
        return out


def _two_part(sites_log_prob: Tensor, q: Tensor, weight: float) -> Tensor:
    """``log(λ p_sites + (1 − λ) q)`` from the two log-densities (``q`` itself at ``λ = 0``)."""
    if weight == 0:
        return q
    return torch.logaddexp(sites_log_prob + math.log(weight), q + math.log1p(-weight))


def _normalised(v: Tensor, norm: Tensor) -> Tensor:
    """``v / norm``, except where ``norm`` is 1 to rounding (8 units in the last place): there ``v`` as it is, so that
    normalising normalised parameters (a reload, a copy with other weights) keeps their bits."""
    return torch.where((norm - 1).abs() <= 8 * torch.finfo(torch.float64).eps, v, v / norm)


def _check_points(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor of points (b, 3) on S², got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"x must have shape (b, 3) (points on S² in R³), got {tuple(x.shape)}")
    return x
