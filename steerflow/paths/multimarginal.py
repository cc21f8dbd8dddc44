"""Multimarginal stochastic interpolants (Albergo, Boffi, Lindsey & Vanden-Eijnden 2023, "Multimarginal
generative modeling with stochastic interpolants").

With ``K`` marginals ``x_k ~ ρ_k`` and barycentric coordinates ``α`` on the simplex ``Δ^{K-1}``
(``α_k ≥ 0``, ``Σ_k α_k = 1``) the interpolant is

    x(α) = Σ_k α_k x_k + γ(α) z,        z ~ N(0, I),  γ(α) = a (1 - Σ_k α_k²)     (paper eq. 2.1)

(``γ`` vanishes at every vertex, so ``x(e_k) = x_k``; ``a = 0`` drops the latent term). The conditional
means ``g_k(α, x) = E[x_k | x(α) = x]`` and ``g_z(α, x) = E[z | x(α) = x]`` satisfy the identity
``Σ_k α_k g_k + γ(α) g_z = x`` and minimise ``Σ_k E|ĝ_k(α, x(α)) - x_k|² (+ E|ĝ_z - z|²)`` (eq. 2.8).
For any path ``α(s)`` on the simplex, the marginal density of ``x(α(s))`` is transported by

    dx/ds = Σ_k α̇_k(s) g_k(α(s), x) + (∇_α γ · α̇(s)) g_z(α(s), x)                 (Theorem 2.3)

so moving along the edge ``e_i → e_j`` maps ``ρ_i`` to ``ρ_j``. With ``K = 2`` and ``α(s) = (1 - s, s)``,
``a = 0``, the velocity is ``g_1 - g_0 = E[x_1 - x_0 | x_s]``: ordinary flow matching on the linear path.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class MultimarginalSample:
    """One draw of the interpolant: ``x = x(α)`` (b, *d), ``alpha`` (b, K), the marginal draws ``xs``
    (K, b, *d) and the latent ``z`` (b, *d) (``None`` when ``γ ≡ 0``)."""

    x: Tensor
    alpha: Tensor
    xs: Tensor
    z: Tensor | None


class ConditionalMeans(Protocol):
    """``g(alpha (b, K), x (b, *d)) -> (K, b, *d)``, or ``(K + 1, b, *d)`` with ``g_z`` last when latent."""

    def __call__(self, alpha: Tensor, x: Tensor) -> Tensor: ...


def _bcast(w: Tensor, x: Tensor) -> Tensor:
    """(b,) → (b, 1, ..., 1) against ``x`` (b, *d)."""
    return w.reshape(-1, *([1] * (x.ndim - 1)))


def check_simplex(alpha: Tensor, K: int, atol: float = 1e-5) -> None:
    """Raise ``ValueError`` unless ``alpha`` (b, K) has non-negative rows summing to one."""
    if not torch.is_tensor(alpha) or alpha.ndim != 2 or alpha.shape[1] != K:
        raise ValueError(f"alpha must have shape (b, {K}), got {tuple(alpha.shape) if torch.is_tensor(alpha) else type(alpha).__name__}")
    if (alpha < -atol).any() or ((alpha.sum(-1) - 1).abs() > atol).any():
        raise ValueError("alpha must lie on the simplex: α_k ≥ 0 and Σ_k α_k = 1")


class MultimarginalInterpolant:
    """``x(α) = Σ_k α_k x_k + γ(α) z`` with ``γ(α) = a (1 - Σ_k α_k²)``.

    Args:
        K: number of marginals (≥ 2).
        gamma_scale: ``a ≥ 0`` (0: deterministic interpolant, no latent).
    """

    def __init__(self, K: int, gamma_scale: float = 0.0) -> None:
        if not isinstance(K, int) or K < 2:
            raise ValueError(f"K must be an integer ≥ 2, got {K!r}")
        if not gamma_scale >= 0:
            raise ValueError(f"gamma_scale must be ≥ 0, got {gamma_scale}")
        self.K, self.a = K, float(gamma_scale)

    def __repr__(self) -> str:
        return f"MultimarginalInterpolant(K={self.K}, gamma_scale={self.a:g})"

    @property
    def latent(self) -> bool:
        return self.a > 0

    def gamma(self, alpha: Tensor) -> Tensor:
        """``γ(α) = a (1 - Σ_k α_k²)`` (b,)."""
        return self.a * (1 - alpha.pow(2).sum(-1))

    def d_gamma(self, alpha: Tensor) -> Tensor:
        """``∇_α γ = -2 a α`` (b, K)."""
        return -2 * self.a * alpha

    def interpolate(self, xs: Tensor, alpha: Tensor, z: Tensor | None = None) -> Tensor:
        """``x(α)`` (b, *d) for marginal draws ``xs`` (K, b, *d) and ``alpha`` (b, K)."""
        if xs.ndim < 3 or xs.shape[0] != self.K:
            raise ValueError(f"xs must have shape ({self.K}, b, *d), got {tuple(xs.shape)}")
        check_simplex(alpha, self.K)
        x = sum(_bcast(alpha[:, k], xs[k]) * xs[k] for k in range(self.K))
        if self.latent:
            if z is None:
                raise ValueError("this interpolant has a latent term; pass z")
            x = x + _bcast(self.gamma(alpha), z) * z
        return x

    def sample_alpha(self, b: int, generator: torch.Generator | None = None, *, edge_fraction: float = 0.5,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """``b`` points (b, K) on the simplex: a fraction ``edge_fraction`` uniform on random edges
        ``(1 - s) e_i + s e_j`` (where two-marginal transport happens), the rest uniform (Dirichlet(1))."""
        if not 0 <= edge_fraction <= 1:
            raise ValueError(f"edge_fraction must be in [0, 1], got {edge_fraction}")
        e = -torch.log(torch.rand(b, self.K, generator=generator, dtype=torch.float64).clamp_min(1e-300))
        alpha = e / e.sum(-1, keepdim=True)
        on_edge = torch.rand(b, generator=generator) < edge_fraction
        m = int(on_edge.sum())
        if m:
            i = torch.randint(0, self.K, (m,), generator=generator)
            j = (i + torch.randint(1, self.K, (m,), generator=generator)) % self.K
            s = torch.rand(m, generator=generator, dtype=torch.float64)
            a = torch.zeros(m, self.K, dtype=torch.float64)
            a[torch.arange(m), i] = 1 - s
            a[torch.arange(m), j] += s
            alpha[on_edge] = a
        return alpha.to(dtype)

    def sample(self, xs: Tensor, alpha: Tensor | None = None, generator: torch.Generator | None = None,
               *, edge_fraction: float = 0.5) -> MultimarginalSample:
        """Draw ``α`` (unless given) and ``z`` and return the :class:`MultimarginalSample`."""
        if xs.ndim < 3 or xs.shape[0] != self.K:
            raise ValueError(f"xs must have shape ({self.K}, b, *d), got {tuple(xs.shape)}")
        b = xs.shape[1]
        if alpha is None:
            alpha = self.sample_alpha(b, generator, edge_fraction=edge_fraction, dtype=xs.dtype)
        z = torch.randn(xs.shape[1:], generator=generator, dtype=xs.dtype) if self.latent else None
        return MultimarginalSample(x=self.interpolate(xs, alpha, z), alpha=alpha, xs=xs, z=z)

    def loss(self, g: ConditionalMeans, s: MultimarginalSample) -> Tensor:
        """``Σ_k E|ĝ_k(α, x(α)) - x_k|² (+ E|ĝ_z - z|²)``, each averaged over the batch (scalar)."""
        out = g(s.alpha, s.x)
        target = s.xs if s.z is None else torch.cat([s.xs, s.z[None]])
        if out.shape != target.shape:
            raise ValueError(f"conditional means must have shape {tuple(target.shape)}, got {tuple(out.shape)}")
        return (out - target).pow(2).reshape(out.shape[0], out.shape[1], -1).sum(-1).mean(-1).sum()

    def identity_residual(self, g_out: Tensor, alpha: Tensor, x: Tensor) -> Tensor:
        """``Σ_k α_k g_k + γ g_z - x`` (b, *d): zero for exact conditional means."""
        r = sum(_bcast(alpha[:, k], x) * g_out[k] for k in range(self.K)) - x
        if self.latent:
            r = r + _bcast(self.gamma(alpha), x) * g_out[self.K]
        return r

    def velocity(self, g: ConditionalMeans, path: "AbstractSimplexPath") -> Callable[[Tensor, Tensor], Tensor]:
        """``v(x, s) = Σ_k α̇_k g_k(α(s), x) + (∇γ · α̇) g_z(α(s), x)`` as a field for :func:`steerflow.sample`."""
        if path.K != self.K:
            raise ValueError(f"the path lives on a simplex with K={path.K}, the interpolant has K={self.K}")

        def v(x: Tensor, s: Tensor) -> Tensor:
            s = s.to(dtype=x.dtype, device=x.device)
            if s.ndim == 0:
                s = s.expand(x.shape[0])
            alpha, d_alpha = path(s)
            out = g(alpha, x)
            vel = sum(_bcast(d_alpha[:, k], x) * out[k] for k in range(self.K))
            if self.latent:
                vel = vel + _bcast((self.d_gamma(alpha) * d_alpha).sum(-1), x) * out[self.K]
            return vel

        return v


class AbstractSimplexPath(ABC):
    """A path ``s ∈ [0, 1] ↦ α(s) ∈ Δ^{K-1}``; ``__call__(s (b,)) -> (α (b, K), α̇ (b, K))``."""

    K: int

    @abstractmethod
    def __call__(self, s: Tensor) -> tuple[Tensor, Tensor]: ...


class StraightSimplexPath(AbstractSimplexPath):
    """``α(s) = (1 - s) a + s b`` between two points ``a, b`` (K,) of the simplex; ``α̇ = b - a``."""

    def __init__(self, start: Tensor, end: Tensor) -> None:
        start = torch.as_tensor(start, dtype=torch.float64)
        end = torch.as_tensor(end, dtype=torch.float64)
        if start.ndim != 1 or start.shape != end.shape:
            raise ValueError(f"start and end must be (K,) vectors, got {tuple(start.shape)} and {tuple(end.shape)}")
        check_simplex(torch.stack([start, end]), start.shape[0])
        self.K, self.start, self.end = start.shape[0], start, end

    def __repr__(self) -> str:
        return f"StraightSimplexPath({self.start.tolist()}, {self.end.tolist()})"

    def __call__(self, s):
        a, b = self.start.to(s), self.end.to(s)
        return (1 - s)[:, None] * a + s[:, None] * b, (b - a).expand(s.shape[0], -1)


def vertex(K: int, k: int) -> Tensor:
    """The vertex ``e_k`` (K,) of the simplex."""
    if not 0 <= k < K:
        raise ValueError(f"vertex index must be in [0, {K}), got {k}")
    e = torch.zeros(K, dtype=torch.float64)
    e[k] = 1.0
    return e


def edge_path(K: int, i: int, j: int) -> StraightSimplexPath:
    """The edge ``e_i → e_j``: transport from marginal ``i`` to marginal ``j`` (the two-marginal reduction)."""
    if i == j:
        raise ValueError(f"an edge needs two different vertices, got i = j = {i}")
    return StraightSimplexPath(vertex(K, i), vertex(K, j))


class GaussianConditionalMeans:
    """Exact ``g_k`` for independent Gaussian marginals ``x_k ~ N(m_k, S_k)`` (and ``z ~ N(0, I)``).

    ``x(α)`` is Gaussian with mean ``μ(α) = Σ α_k m_k`` and covariance ``C(α) = Σ α_k² S_k + γ(α)² I``; the
    conditional means are ``g_k = m_k + α_k S_k C⁻¹ (x - μ)`` and ``g_z = γ C⁻¹ (x - μ)`` (Gaussian
    conditioning), which satisfy ``Σ α_k g_k + γ g_z = x`` exactly.

    Args:
        means: (K, d). covs: (K, d, d) symmetric positive definite.
        interpolant: the :class:`MultimarginalInterpolant` whose ``γ`` is used.
    """

    def __init__(self, means: Tensor, covs: Tensor, interpolant: MultimarginalInterpolant) -> None:
        means, covs = torch.as_tensor(means), torch.as_tensor(covs)
        K = interpolant.K
        if means.ndim != 2 or means.shape[0] != K:
            raise ValueError(f"means must have shape ({K}, d), got {tuple(means.shape)}")
        d = means.shape[1]
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must have shape ({K}, {d}, {d}), got {tuple(covs.shape)}")
        self.means, self.covs, self.interpolant = means, covs, interpolant

    def __call__(self, alpha: Tensor, x: Tensor) -> Tensor:
        m, S = self.means.to(x), self.covs.to(x)
        it = self.interpolant
        mu = alpha @ m                                                        # (b, d)
        C = torch.einsum("bk,kij->bij", alpha.pow(2), S)
        gam = it.gamma(alpha) if it.latent else torch.zeros_like(alpha[:, 0])
        C = C + gam.pow(2)[:, None, None] * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        w = torch.linalg.solve(C, (x - mu)[..., None]).squeeze(-1)            # C⁻¹ (x - μ)
        gs = m[:, None, :] + alpha.T[..., None] * torch.einsum("kij,bj->kbi", S, w)
        if it.latent:
            gs = torch.cat([gs, (gam[:, None] * w)[None]])
        return gs


__all__ = ["MultimarginalSample", "ConditionalMeans", "MultimarginalInterpolant", "AbstractSimplexPath",
           "StraightSimplexPath", "vertex", "edge_path", "GaussianConditionalMeans", "check_simplex"]
