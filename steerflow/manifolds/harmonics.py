"""Real spherical harmonics on ``S²`` as input features for a network on the sphere.

For ``x = (sin θ cos φ, sin θ sin φ, cos θ)`` the real, orthonormal (w.r.t. the area measure) harmonics of
degree ``l`` and order ``|m| ≤ l`` are (no Condon–Shortley phase)

    ``Y_l^0 = N_l^0 P_l^0(z)``,  ``Y_l^{m} = √2 N_l^m P_l^m(z) cos mφ``,
    ``Y_l^{−m} = √2 N_l^m P_l^m(z) sin mφ``  (``0 < m ≤ l``),
    ``N_l^m = √((2l + 1)/(4π) · (l − m)!/(l + m)!)``.

Writing ``P_l^m(z) = sin^m θ · Q_l^m(z)`` and ``sin^m θ e^{imφ} = (x + i y)^m`` makes every feature a
polynomial in ``(x, y, z)`` (smooth everywhere, also off the sphere), with the recurrences

    ``Q_m^m = (2m − 1)!!``,  ``Q_{m+1}^m = (2m + 1) z Q_m^m``,
    ``(l − m) Q_l^m = (2l − 1) z Q_{l−1}^m − (l + m − 1) Q_{l−2}^m``.
"""
from __future__ import annotations

import math
from typing import final

import torch
from torch import Tensor, nn


@final
class SphericalHarmonics(nn.Module):
    """``x (b, 3) ↦ (Y_l^m(x))_{0 ≤ l ≤ L, |m| ≤ l}`` of width ``(L + 1)²``; use as
    ``TangentVelocity(MLPVelocity(3, in_dim=SphericalHarmonics(L).out_dim), Sphere(2), embed=SphericalHarmonics(L))``.

    Columns are ordered by degree, then ``m = −l, …, l``. The features are orthonormal on ``S²``:
    ``∫ Y_a Y_b dA = δ_ab``. ``scale`` multiplies every feature (default ``√(4π)``, so ``Y_0^0 = 1``).
    """

    def __init__(self, degree: int, scale: float = math.sqrt(4 * math.pi)) -> None:
        super().__init__()
        if not isinstance(degree, int) or degree < 0:
            raise ValueError(f"degree must be an int ≥ 0, got {degree!r}")
        self.degree, self.scale = degree, float(scale)
        self.out_dim = (degree + 1) ** 2
        # N_l^m (times √2 for m > 0), in float64
        norm = {}
        for l in range(degree + 1):
            for m in range(l + 1):
                c = (2 * l + 1) / (4 * math.pi) * math.exp(math.lgamma(l - m + 1) - math.lgamma(l + m + 1))
                norm[l, m] = math.sqrt(c) * (math.sqrt(2.0) if m > 0 else 1.0)
        self._norm = norm

    def extra_repr(self) -> str:
        return f"degree={self.degree}, out_dim={self.out_dim}"

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != 3:
            raise ValueError(f"x must have shape (b, 3) (points on S² in R³), got {tuple(x.shape)}")
        L = self.degree
        px, py, z = x[:, 0], x[:, 1], x[:, 2]
        # (x + i y)^m = c_m + i s_m
        cos_m, sin_m = [torch.ones_like(z)], [torch.zeros_like(z)]
        for _ in range(L):
            c, s = cos_m[-1], sin_m[-1]
            cos_m.append(c * px - s * py)
            sin_m.append(c * py + s * px)
        Q: dict[tuple[int, int], Tensor] = {}
        for m in range(L + 1):
            Q[m, m] = torch.full_like(z, float(math.prod(range(1, 2 * m, 2))))
            if m + 1 <= L:
                Q[m + 1, m] = (2 * m + 1) * z * Q[m, m]
            for l in range(m + 2, L + 1):
                Q[l, m] = ((2 * l - 1) * z * Q[l - 1, m] - (l + m - 1) * Q[l - 2, m]) / (l - m)
        cols = []
        for l in range(L + 1):
            for m in range(-l, l + 1):
                a = abs(m)
                trig = cos_m[a] if m >= 0 else sin_m[a]
                cols.append(self._norm[l, a] * Q[l, a] * trig)
        return self.scale * torch.stack(cols, dim=1)
