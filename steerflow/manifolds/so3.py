"""The rotation group ``SO(3)`` with its bi-invariant metric and the Haar (uniform) base."""
from __future__ import annotations

import math
from typing import final

import torch
from torch import Tensor

from .base import AbstractManifold


def hat(omega: Tensor) -> Tensor:
    """``ω ↦ [ω]×``, the skew matrix with ``[ω]× v = ω × v``: (..., 3) → (..., 3, 3)."""
    z = torch.zeros_like(omega[..., 0])
    w1, w2, w3 = omega[..., 0], omega[..., 1], omega[..., 2]
    return torch.stack([torch.stack([z, -w3, w2], -1),
                        torch.stack([w3, z, -w1], -1),
                        torch.stack([-w2, w1, z], -1)], -2)


def vee(K: Tensor) -> Tensor:
    """Inverse of :func:`hat` on the skew part: (..., 3, 3) → (..., 3)."""
    return 0.5 * torch.stack([K[..., 2, 1] - K[..., 1, 2], K[..., 0, 2] - K[..., 2, 0],
                              K[..., 1, 0] - K[..., 0, 1]], -1)


def rodrigues(omega: Tensor) -> Tensor:
    """``expm([ω]×) = I + (sin θ / θ) K + ((1 - cos θ) / θ²) K²``, ``θ = |ω|``, ``K = [ω]×``.

    Both coefficients use their Taylor series below ``θ = 1e-3`` (finite value and gradient at 0).
    """
    th2 = (omega * omega).sum(-1)[..., None, None]
    small = th2 < 1e-6
    th2_safe = torch.where(small, torch.ones_like(th2), th2)
    th = torch.sqrt(th2_safe)
    a = torch.where(small, 1 - th2 / 6 + th2 * th2 / 120, torch.sin(th) / th)
    b = torch.where(small, 0.5 - th2 / 24 + th2 * th2 / 720, (1 - torch.cos(th)) / th2_safe)
    K = hat(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device)
    return eye + a * K + b * (K @ K)


def rotation_log(Q: Tensor) -> Tensor:
    """Rotation vector ``ω`` (..., 3) with ``expm([ω]×) = Q`` and ``|ω| = θ ∈ [0, π]``.

    ``θ = atan2(|s|, (tr Q - 1) / 2)`` with ``s = vee(Q - Qᵀ) / 2 = sin θ n``. Away from ``π``:
    ``ω = θ / sin θ · s`` (series ``1 + θ²/6`` near 0). Near ``π`` the skew part vanishes, so the axis is
    read from the symmetric part ``(Q + Qᵀ)/2 = cos θ I + (1 - cos θ) n nᵀ`` (largest column of
    ``n nᵀ``, sign chosen to agree with ``s``); at exactly ``π`` both signs are the same rotation.
    """
    s = vee(Q)
    sn = torch.sqrt(torch.clamp_min((s * s).sum(-1), 1e-30))
    c = 0.5 * (Q.diagonal(dim1=-2, dim2=-1).sum(-1) - 1)
    th = torch.atan2(sn, c)
    small = th < 1e-3
    th_safe = torch.where(small, torch.ones_like(th), th)
    ratio = torch.where(small, 1 + th * th / 6, th_safe / torch.sin(th_safe).clamp_min(1e-30))
    omega_generic = ratio[..., None] * s
    # near π: n nᵀ = (sym(Q) - c I) / (1 - c)
    one_minus_c = torch.clamp_min(1 - c, 1e-12)[..., None, None]
    eye = torch.eye(3, dtype=Q.dtype, device=Q.device)
    nn_t = (0.5 * (Q + Q.transpose(-1, -2)) - c[..., None, None] * eye) / one_minus_c
    diag = nn_t.diagonal(dim1=-2, dim2=-1)
    k = diag.argmax(-1)
    col = torch.gather(nn_t, -1, k[..., None, None].expand(*nn_t.shape[:-1], 1)).squeeze(-1)
    nk = torch.sqrt(torch.clamp_min(torch.gather(diag, -1, k[..., None]), 1e-30))
    n = col / nk
    sign = torch.where((n * s).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(Q)
    omega_pi = sign * th[..., None] * n
    near_pi = (th > math.pi - 1e-2)[..., None]
    return torch.where(near_pi, omega_pi, omega_generic)


@final
class SO3(AbstractManifold):
    """Rotation matrices ``R`` (shape ``(b, 3, 3)``), ``RᵀR = I``, ``det R = 1``.

    Tangent vectors at ``R`` are ``R Ω`` with ``Ω`` skew; the metric ``⟨U, W⟩_R = ½ tr(Uᵀ W)`` makes
    ``|R [ω]×| = |ω|``, so ``d(R, S)`` is the rotation angle of ``RᵀS`` (in ``[0, π]``) and the volume
    of ``SO(3)`` is ``8π²``. ``exp_R(U) = R expm(RᵀU)`` (Rodrigues), ``log_R(S) = R [log(RᵀS)]×``.
    Base: Haar measure, ``log p = -log 8π²``; sampled as unit quaternions (uniform on ``S³``).
    """

    dim = 3
    shape = (3, 3)
    name = "so3"

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        R = x @ rodrigues(vee(x.transpose(-1, -2) @ u))
        # one Björck step R (3I - RᵀR)/2 removes round-off drift; smooth, unlike an SVD
        eye = torch.eye(3, dtype=x.dtype, device=x.device)
        return 0.5 * R @ (3 * eye - R.transpose(-1, -2) @ R)

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        return x @ hat(rotation_log(x.transpose(-1, -2) @ y))

    def projx(self, x: Tensor) -> Tensor:
        """Nearest rotation in Frobenius norm: ``U diag(1, 1, det(UVᵀ)) Vᵀ`` from the SVD."""
        U, _, Vh = torch.linalg.svd(x)
        d = torch.det(U @ Vh)
        D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
        return U @ D @ Vh

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        A = x.transpose(-1, -2) @ u
        return x @ (0.5 * (A - A.transpose(-1, -2)))

    def inner(self, x: Tensor, u: Tensor, w: Tensor) -> Tensor:
        return 0.5 * (u * w).sum((-1, -2))

    def covector(self, x: Tensor, u: Tensor) -> Tensor:
        return 0.5 * u

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        return rotation_log(x.transpose(-1, -2) @ y).norm(dim=-1)

    def random_base(self, n, generator=None, *, dtype=torch.float32, device=None):
        q = torch.randn((n, 4), generator=generator, dtype=dtype, device=device or "cpu")
        return quaternion_to_matrix(q / q.norm(dim=-1, keepdim=True))

    def base_log_prob(self, x: Tensor) -> Tensor:
        return torch.full(x.shape[:1], -math.log(8 * math.pi ** 2), dtype=x.dtype, device=x.device)

    def tangent_basis(self, x: Tensor) -> Tensor:
        """``R [e_i]×`` for ``i = 1, 2, 3``, flattened: orthonormal for ``½ tr(UᵀW)``."""
        E = hat(torch.eye(3, dtype=x.dtype, device=x.device))  # (3, 3, 3): E[i] = [e_i]×
        B = x[:, None] @ E[None]  # (b, 3, 3, 3)
        return B.reshape(x.shape[0], 3, 9).transpose(1, 2)

    def residual(self, x: Tensor) -> Tensor:
        eye = torch.eye(3, dtype=x.dtype, device=x.device)
        orth = (x.transpose(-1, -2) @ x - eye).abs().amax((-1, -2))
        return orth + (torch.det(x) - 1).abs()

    def geodesic_velocity(self, x: Tensor, u: Tensor, t: Tensor) -> Tensor:
        """``d/dt R expm(t Ω) = R expm(t Ω) Ω`` with ``Ω = Rᵀ u``."""
        Omega = x.transpose(-1, -2) @ u
        omega = vee(Omega)
        return x @ rodrigues(t.reshape(-1, 1).to(x) * omega) @ hat(omega)


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """Unit quaternion ``(w, x, y, z)`` (..., 4) → rotation matrix (..., 3, 3)."""
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)
