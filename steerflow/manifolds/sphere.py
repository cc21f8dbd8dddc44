"""The unit sphere ``Sⁿ = {x ∈ Rⁿ⁺¹ : |x| = 1}`` with the round metric and the uniform base."""
from __future__ import annotations

import math
from typing import final

import torch
from torch import Tensor

from .base import AbstractManifold, safe_norm
from .euclidean import _check_dim


@final
class Sphere(AbstractManifold):
    """``Sⁿ ⊂ Rⁿ⁺¹`` (points of shape ``(b, n + 1)``), metric induced from ``Rⁿ⁺¹``.

    * ``exp_x(u) = cos(|u|) x + sin(|u|) u / |u|``;
    * ``log_x(y) = θ w / |w|`` with ``w = y - ⟨x, y⟩ x`` and ``θ = atan2(|w|, ⟨x, y⟩)`` (the atan2 form
      is accurate for nearby and for nearly antipodal points; at ``y = -x`` the direction is arbitrary);
    * base: uniform, ``log p = -log |Sⁿ|``, ``|Sⁿ| = 2π^{(n+1)/2} / Γ((n+1)/2)`` (``4π`` for ``S²``).
    """

    def __init__(self, n: int = 2) -> None:
        self.dim = _check_dim(n, "sphere dimension n")
        self.shape = (n + 1,)
        self.name = f"sphere{n}"
        self.log_area = math.log(2.0) + 0.5 * (n + 1) * math.log(math.pi) - math.lgamma(0.5 * (n + 1))

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        r = safe_norm(u)
        # sin(r)/r = sinc(r/π): smooth through r = 0
        y = torch.cos(r) * x + torch.sinc(r / math.pi) * u
        return y / safe_norm(y)  # remove round-off drift off the sphere

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        c = (x * y).sum(-1, keepdim=True)
        w = y - c * x
        s = safe_norm(w)
        return torch.atan2(s, c) / s * w

    def projx(self, x: Tensor) -> Tensor:
        return x / safe_norm(x)

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        return u - (x * u).sum(-1, keepdim=True) * x

    def inner(self, x: Tensor, u: Tensor, w: Tensor) -> Tensor:
        return (u * w).sum(-1)

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        c = (x * y).sum(-1, keepdim=True)
        return torch.atan2(safe_norm(y - c * x), c).squeeze(-1)

    def random_base(self, n, generator=None, *, dtype=torch.float32, device=None):
        """Uniform on ``Sⁿ``: a normalised standard Gaussian in ``Rⁿ⁺¹``."""
        z = torch.randn((n, self.dim + 1), generator=generator, dtype=dtype, device=device or "cpu")
        return z / safe_norm(z)

    def base_log_prob(self, x: Tensor) -> Tensor:
        return torch.full(x.shape[:1], -self.log_area, dtype=x.dtype, device=x.device)

    def tangent_basis(self, x: Tensor) -> Tensor:
        """Columns 1..n of the Householder reflection ``H`` that sends ``e_0`` to ``-sign(x_0) x``."""
        e0 = torch.zeros_like(x)
        e0[:, 0] = 1.0
        sign = torch.where(x[:, :1] >= 0, 1.0, -1.0).to(x)
        w = x + sign * e0  # |w|² = 2 (1 + |x_0|) ≥ 2: never degenerate
        eye = torch.eye(self.dim + 1, dtype=x.dtype, device=x.device)
        H = eye - 2 * w[:, :, None] * w[:, None, :] / (w * w).sum(-1)[:, None, None]
        return H[:, :, 1:]

    def residual(self, x: Tensor) -> Tensor:
        return ((x * x).sum(-1) - 1).abs()

    def geodesic_velocity(self, x: Tensor, u: Tensor, t: Tensor) -> Tensor:
        """``d/dt exp_x(t u) = -|u| sin(t|u|) x + cos(t|u|) u``."""
        r = safe_norm(u)
        tr = t.reshape(-1, 1).to(x) * r
        return -r * torch.sin(tr) * x + torch.cos(tr) * u
