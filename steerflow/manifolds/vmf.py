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
(one component per point, one ``κ``) with ``κ`` chosen on held-out points.
"""
from __future__ import annotations

import math
from typing import final

import torch
from torch import Tensor

_LOG_2PI = math.log(2 * math.pi)


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
        self.means, self.kappas, self.weights = means / norms, kappas, weights / weights.sum()

    def __repr__(self) -> str:
        lo, hi = float(self.kappas.min()), float(self.kappas.max())
        return f"VonMisesFisherMixture(K={len(self)}, kappa∈[{lo:.3g}, {hi:.3g}])"

    def __len__(self) -> int:
        return self.means.shape[0]

    # --- density --------------------------------------------------------------------------------

    def component_log_prob(self, x: Tensor) -> Tensor:
        """``log π_k + log f(x_i; μ_k, κ_k)`` (b, K), in float64."""
        x = _check_points(x)
        log_c = vmf_log_normaliser(self.kappas) + torch.log(self.weights)
        return log_c + self.kappas * (x.double() @ self.means.T - 1)

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


def _check_points(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor of points (b, 3) on S², got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"x must have shape (b, 3) (points on S² in R³), got {tuple(x.shape)}")
    return x
