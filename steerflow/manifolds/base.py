"""The manifold interface every geometry in steerflow implements (Chen & Lipman 2024, §3).

A manifold ``M`` is stored in *ambient coordinates*: a point is a tensor of shape ``(b, *M.shape)``
(``(b, n + 1)`` on the sphere ``Sⁿ ⊂ Rⁿ⁺¹``, ``(b, 3, 3)`` on ``SO(3)``), a tangent vector at ``x`` has
the same shape. The solvers only need ``retract(x, dx)`` and ``proju(x, v)``
(:mod:`steerflow.solvers.steps`), training needs geodesics (:class:`steerflow.paths.GeodesicPath`),
likelihoods need a metric-orthonormal tangent basis (:mod:`steerflow.manifolds.likelihood`).

Metric conventions: ``inner(x, u, w) = covector(x, u) · w`` where ``·`` is the flat dot product of the
ambient coordinates and ``covector`` lowers the index (``u ↦ G u``). Densities (``base_log_prob``,
likelihoods) are with respect to the Riemannian volume of that metric.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..solvers.likelihood import in_numeric_range

_TINY = 1e-30


def sqnorm(u: Tensor, keepdim: bool = True) -> Tensor:
    """Squared Euclidean norm over the last axis."""
    return (u * u).sum(-1, keepdim=keepdim)


def safe_norm(u: Tensor, keepdim: bool = True) -> Tensor:
    """``|u|`` over the last axis with a finite gradient at ``u = 0`` (``sqrt`` of a clamped square)."""
    return torch.sqrt(torch.clamp_min(sqnorm(u, keepdim), _TINY))


def sinhc(r: Tensor) -> Tensor:
    """``sinh(r) / r`` with the Taylor series ``1 + r²/6 + r⁴/120`` near 0 (finite value and gradient)."""
    small = r.abs() < 1e-3
    r_safe = torch.where(small, torch.ones_like(r), r)
    return torch.where(small, 1 + r * r / 6 + r ** 4 / 120, torch.sinh(r_safe) / r_safe)


def log_sinhc(r: Tensor) -> Tensor:
    """``log(sinh(r) / r)`` for ``r ≥ 0``, stable for small and large ``r``."""
    small = r < 1e-3
    r_safe = torch.where(small, torch.ones_like(r), r)
    big = r_safe + torch.log1p(-torch.exp(-2 * r_safe)) - math.log(2.0) - torch.log(r_safe)
    return torch.where(small, r * r / 6 - r ** 4 / 180, big)


class AbstractManifold(ABC):
    """A Riemannian manifold in ambient coordinates.

    Attributes:
        dim: intrinsic dimension (2 for ``S²``, 3 for ``SO(3)``).
        shape: ambient shape of one point (``(3,)`` for ``S²``, ``(3, 3)`` for ``SO(3)``).
        name: registry spec that rebuilds it with :func:`get_manifold` (``"sphere2"``).

    Concrete classes implement the geometry; everything else (the geodesic path, the tangent-projected
    network, the Riemannian divergence and likelihood) is written once against this interface.
    """

    dim: int
    shape: tuple[int, ...]
    name: str
    projection_stages = True
    """Solvers take Runge–Kutta stages in the ambient space and project each step's result with
    ``projx`` (order-preserving projection method; see ``steerflow.solvers.steps``)."""

    # --- geometry ---------------------------------------------------------------------------------
    @abstractmethod
    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        """Exponential map ``exp_x(u)``: the point reached at time 1 by the geodesic with ``γ'(0) = u``."""

    @abstractmethod
    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        """Logarithm ``log_x(y)``: the tangent vector at ``x`` with ``exp_x(log_x y) = y`` of least norm."""

    @abstractmethod
    def projx(self, x: Tensor) -> Tensor:
        """Nearest point on the manifold (idempotent)."""

    @abstractmethod
    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        """Orthogonal projection of an ambient vector ``u`` onto ``T_x M`` (idempotent)."""

    @abstractmethod
    def inner(self, x: Tensor, u: Tensor, w: Tensor) -> Tensor:
        """Metric ``⟨u, w⟩_x`` of tangent vectors at ``x``; shape (b,)."""

    @abstractmethod
    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        """Geodesic distance ``d(x, y) = |log_x y|_x``; shape (b,)."""

    @abstractmethod
    def random_base(self, n: int, generator: torch.Generator | None = None, *,
                    dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """``n`` draws from the base (source, ``t = 0``) distribution; shape ``(n, *shape)``."""

    @abstractmethod
    def base_log_prob(self, x: Tensor) -> Tensor:
        """Log density of the base distribution w.r.t. the Riemannian volume; shape (b,)."""

    @abstractmethod
    def tangent_basis(self, x: Tensor) -> Tensor:
        """A basis ``E`` of ``T_x M``, orthonormal for ``inner``: shape ``(b, D, dim)`` with ``D`` the
        flattened ambient size (column ``i`` is the i-th basis vector, flattened)."""

    @abstractmethod
    def residual(self, x: Tensor) -> Tensor:
        """How far ``x`` is from the manifold (0 on it); shape (b,). Used by :meth:`check_point`."""

    # --- defaults ---------------------------------------------------------------------------------
    def retract(self, x: Tensor, dx: Tensor) -> Tensor:
        """A retraction; the exponential map by default (used by every solver step)."""
        return self.expmap(x, dx)

    def covector(self, x: Tensor, u: Tensor) -> Tensor:
        """Lower the index: ``G_x u`` so that ``inner(x, u, w) = (G_x u) · w`` (identity by default)."""
        return u

    def in_numeric_range(self, x: Tensor) -> Tensor:
        """(b,) True where ``x`` lies in the range this manifold's formulas resolve in ``x.dtype``. Default:
        finite coordinates at most ``finfo.max ** (1/4)`` in size
        (:func:`steerflow.solvers.likelihood.in_numeric_range`). A likelihood solve freezes a point that
        leaves it and gives it ``-inf``."""
        return in_numeric_range(x)

    def norm(self, x: Tensor, u: Tensor) -> Tensor:
        """``|u|_x = sqrt⟨u, u⟩_x``; shape (b,)."""
        return torch.sqrt(torch.clamp_min(self.inner(x, u, u), 0.0))

    def geodesic_velocity(self, x: Tensor, u: Tensor, t: Tensor) -> Tensor:
        """``d/dt exp_x(t u)`` at times ``t`` (b,), by forward-mode differentiation of :meth:`expmap`.

        Concrete manifolds override this with the closed form (the parallel transport of ``u``).
        """
        tt = t.reshape(-1, *([1] * (x.ndim - 1))).to(x)
        _, du = torch.func.jvp(lambda s: self.expmap(x, s * u), (tt,), (torch.ones_like(tt),))
        return du

    def geodesic(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The minimising geodesic from ``x_0`` to ``x_1`` at times ``t`` (b,): ``(x_t, ẋ_t)`` with

        ``x_t = exp_{x_0}(t log_{x_0} x_1)`` and ``ẋ_t = d/dt x_t`` (Chen & Lipman 2024, eq. 13).
        """
        u = self.logmap(x_0, x_1)
        tt = t.reshape(-1, *([1] * (x_0.ndim - 1))).to(x_0)
        return self.expmap(x_0, tt * u), self.geodesic_velocity(x_0, u, t)

    def check_point(self, x: Tensor, atol: float | None = None) -> None:
        """Raise ``ValueError`` unless ``x`` has shape ``(b, *shape)`` and lies on the manifold to ``atol``
        (default: ``1e-4`` in float32, ``1e-8`` in float64)."""
        if not torch.is_tensor(x):
            raise TypeError(f"points on {self.name} must be torch tensors, got {type(x).__name__}")
        if tuple(x.shape[1:]) != tuple(self.shape) or x.ndim != len(self.shape) + 1:
            raise ValueError(f"points on {self.name} must have shape (b, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(x.shape)}")
        if atol is None:
            atol = 1e-8 if x.dtype == torch.float64 else 1e-4
        r = self.residual(x).detach()
        if not torch.isfinite(r).all() or (r > atol).any():
            hint = self.describe_points(x.detach())
            raise ValueError(f"points are not on {self.name}: max residual {float(r.max()):.3g} > atol={atol:g}"
                             + (f"; {hint}" if hint else ""))

    def describe_points(self, x: Tensor) -> str:
        """What this manifold's points look like, said of the points ``x`` that :meth:`check_point` refused
        (e.g. the torus's angle range and the values found); empty by default."""
        return ""

    def check_tangent(self, x: Tensor, u: Tensor, atol: float | None = None) -> None:
        """Raise ``ValueError`` unless ``u`` is tangent at ``x``: ``|u - proju(x, u)|_∞ ≤ atol (1 + |x|_∞ |u|_∞)``
        (relative to the coordinates' size, which grows like ``e^r`` on the hyperboloid)."""
        if u.shape != x.shape:
            raise ValueError(f"tangent vectors must have the point's shape {tuple(x.shape)}, got {tuple(u.shape)}")
        if atol is None:
            atol = 1e-8 if x.dtype == torch.float64 else 1e-4
        b = x.shape[0]
        scale = 1 + x.reshape(b, -1).abs().amax(-1) * u.reshape(b, -1).abs().amax(-1)
        r = ((u - self.proju(x, u)).reshape(b, -1).abs().amax(-1) / scale).detach()
        if (r > atol).any():
            raise ValueError(f"vectors are not tangent to {self.name}: max normal part {float(r.max()):.3g}")

    @property
    def ambient_dim(self) -> int:
        """Flattened ambient size ``D = prod(shape)``."""
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
