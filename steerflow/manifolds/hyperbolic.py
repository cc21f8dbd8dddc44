"""Hyperbolic space ``Hⁿ`` in the Lorentz (hyperboloid) model with a wrapped-normal base."""
from __future__ import annotations

import math
from typing import final

import torch
from torch import Tensor

from .base import AbstractManifold, log_sinhc, sinhc
from .euclidean import _check_dim


def minkowski(u: Tensor, w: Tensor, keepdim: bool = False) -> Tensor:
    """Lorentz product ``⟨u, w⟩_L = -u_0 w_0 + Σ_{i≥1} u_i w_i`` over the last axis."""
    p = u * w
    out = p[..., 1:].sum(-1) - p[..., 0]
    return out[..., None] if keepdim else out


@final
class Hyperbolic(AbstractManifold):
    """``Hⁿ = {x ∈ Rⁿ⁺¹ : ⟨x, x⟩_L = -1, x_0 > 0}`` (curvature -1), points of shape ``(b, n + 1)``.

    * tangent space ``T_x = {u : ⟨x, u⟩_L = 0}``, metric ``⟨u, w⟩_L`` (positive definite there);
    * ``exp_x(u) = cosh(|u|) x + sinh(|u|) u / |u|``, ``log_x(y) = d / sinh(d) · (y + ⟨x, y⟩_L x)`` with
      ``d = arccosh(-⟨x, y⟩_L)``;
    * base: the wrapped normal at the origin ``o = (1, 0, …, 0)`` (Nagano et al. 2019):
      ``x = exp_o((0, v))``, ``v ~ N(0, σ² I_n)``, with density w.r.t. the hyperbolic volume

      ``log p(x) = log N(v; 0, σ² I_n) - (n - 1) log(sinh r / r)``, ``v = log_o x``, ``r = |v| = d(o, x)``

      (the factor is the Jacobian of ``exp_o``: ``dV = (sinh r / r)^{n-1} dv``).
    """

    def __init__(self, n: int = 2, base_std: float = 1.0) -> None:
        self.dim = _check_dim(n, "hyperbolic dimension n")
        if not base_std > 0:
            raise ValueError(f"base_std must be positive, got {base_std}")
        self.shape = (n + 1,)
        self.name = f"hyperbolic{n}"
        self.base_std = float(base_std)

    def origin(self, b: int = 1, *, dtype=torch.float32, device=None) -> Tensor:
        o = torch.zeros((b, self.dim + 1), dtype=dtype, device=device or "cpu")
        o[:, 0] = 1.0
        return o

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        r = torch.sqrt(torch.clamp_min(minkowski(u, u, keepdim=True), 1e-30))
        return self.projx(torch.cosh(r) * x + sinhc(r) * u)

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        # with Δ = y - x: ⟨Δ, Δ⟩_L = 2(α - 1) = 4 sinh²(d/2), α = -⟨x, y⟩_L; both forms below avoid the
        # cancellation of α - 1 for nearby points far from the origin
        delta = y - x
        q = torch.clamp_min(minkowski(delta, delta, keepdim=True), 0.0)
        d = 2 * torch.asinh(0.5 * torch.sqrt(torch.clamp_min(q, 1e-30)))
        w = delta - 0.5 * q * x  # = y + ⟨x, y⟩_L x, the tangent part of y at x; |w|_L = sinh d
        return w / sinhc(d)

    def projx(self, x: Tensor) -> Tensor:
        """Lift the space-like coordinates onto the upper sheet: ``x_0 = sqrt(1 + |x_{1:}|²)``."""
        xs = x[..., 1:]
        return torch.cat([torch.sqrt(1 + (xs * xs).sum(-1, keepdim=True)), xs], -1)

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        return u + minkowski(x, u, keepdim=True) * x

    def inner(self, x: Tensor, u: Tensor, w: Tensor) -> Tensor:
        return minkowski(u, w)

    def covector(self, x: Tensor, u: Tensor) -> Tensor:
        return torch.cat([-u[..., :1], u[..., 1:]], -1)

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        """``d = 2 asinh(|y - x|_L / 2)`` (equal to ``arccosh(-⟨x, y⟩_L)``, accurate for nearby points)."""
        delta = y - x
        return 2 * torch.asinh(0.5 * torch.sqrt(torch.clamp_min(minkowski(delta, delta), 0.0)))

    def random_base(self, n, generator=None, *, dtype=torch.float32, device=None):
        v = self.base_std * torch.randn((n, self.dim), generator=generator, dtype=dtype, device=device or "cpu")
        u = torch.cat([torch.zeros_like(v[:, :1]), v], -1)
        return self.expmap(self.origin(n, dtype=dtype, device=device), u)

    def base_log_prob(self, x: Tensor) -> Tensor:
        xs = x[..., 1:]
        r = torch.asinh(torch.sqrt(torch.clamp_min((xs * xs).sum(-1), 0.0)))  # d(o, x), accurate near o
        n, s2 = self.dim, self.base_std ** 2
        log_normal = -0.5 * r * r / s2 - 0.5 * n * math.log(2 * math.pi * s2)
        return log_normal - (n - 1) * log_sinhc(r)

    def tangent_basis(self, x: Tensor) -> Tensor:
        """Columns 1..n of the Lorentz boost taking ``o`` to ``x``:
        ``e_i = (x_i, δ_i + x_{1:} x_i / (1 + x_0))`` — Lorentz-orthonormal and tangent at ``x``."""
        x0, xs = x[:, :1], x[:, 1:]
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        space = eye + xs[:, :, None] * xs[:, None, :] / (1 + x0)[:, :, None]
        return torch.cat([xs[:, None, :], space], 1)

    def residual(self, x: Tensor) -> Tensor:
        return (minkowski(x, x) + 1).abs() / (1 + x[..., 0] ** 2) + torch.clamp_min(-x[..., 0], 0.0)

    def describe_points(self, x: Tensor) -> str:
        return ("expected points on the upper sheet x_0 = sqrt(1 + |x_{1:}|²) of the hyperboloid (Lorentz model); "
                "Hyperbolic.projx lifts the coordinates x_{1:} onto it")

    def in_numeric_range(self, x: Tensor) -> Tensor:
        """``x_0² · eps ≤ 1`` (``eps`` of ``x.dtype``): the hyperboloid equation ``x_0² - |x_{1:}|² = 1`` is still
        resolved, i.e. ``d(o, x) ≲ 8.7`` in float32 and ``≲ 18.7`` in float64. Beyond it ``proju`` cancels terms of
        size ``x_0²`` and tangent vectors lose every digit; a flow run backward that gets there is escaping
        to infinity."""
        x = x.detach()
        x0 = x[..., 0]
        return torch.isfinite(x).all(-1) & (x0 * x0 * torch.finfo(x.dtype).eps <= 1)

    def geodesic_velocity(self, x: Tensor, u: Tensor, t: Tensor) -> Tensor:
        """``d/dt exp_x(t u) = |u| sinh(t|u|) x + cosh(t|u|) u``."""
        r = torch.sqrt(torch.clamp_min(minkowski(u, u, keepdim=True), 1e-30))
        tr = t.reshape(-1, 1).to(x) * r
        return r * torch.sinh(tr) * x + torch.cosh(tr) * u
