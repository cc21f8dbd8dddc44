"""Decomposed diffusion sampling: conjugate-gradient data consistency on the data prediction, then re-noising."""
from __future__ import annotations

import math

import torch

from ...paths.affine import AffinePath
from .._common import _At, _count, _integer, _require_linear, _Steering, _t0, measurement
from ..base import check_path, check_window
from ..operators import conjugate_gradient

__all__ = ["DDS"]


class DDS(_Steering):
    """Decomposed diffusion sampling (Chung et al. 2024).

    Data consistency on the data prediction by at most ``n_cg`` conjugate-gradient steps on
    ``(Aᵀ A + γ I) x̂_1' = Aᵀ y + γ x̂_1`` started at ``x̂_1`` (a Krylov-subspace proximal step; stopped at a
    relative residual in the input's precision, and where ``Aᵀ A`` has no curvature left, so a rank-deficient
    ``A`` with ``γ = 0`` converges instead of stepping along rounding noise), then the path-consistent
    re-noising ``x_{t+dt} = (t + dt) x̂_1' + (1 − t − dt) x̂_0'`` (``α_{t+dt} x̂_1' + σ_{t+dt} x̂_0'`` on the model's
    path) with ``x̂_0' = √(1 − η²) x̂_0 + η ε`` (DDIM-η; ``eta=0`` deterministic), returned as the velocity of
    that jump: it needs a fixed-step solver.
    """

    fixed_step_only = True

    def __init__(self, operator, y, sigma: float = 0.0, *, n_cg: int = 5, gamma: float = 0.0, eta: float = 0.0,
                 path: AffinePath | str | None = None,
                 window: tuple[float, float] = (0.0, 1.0)) -> None:
        self.path = check_path(path)
        self.window = check_window(window)
        self.meas = measurement(operator, y, sigma)
        self.A = _require_linear(self.meas, "DDS")
        n_cg = _integer(n_cg, "n_cg")
        if not (0.0 <= eta <= 1.0):
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if not (gamma >= 0 and math.isfinite(gamma)):
            raise ValueError(f"gamma must be finite and non-negative, got {gamma}")
        self.n_cg, self.gamma, self.eta = n_cg, float(gamma), float(eta)

    def settings(self):
        return {"n_cg": self.n_cg, "gamma": self.gamma, "eta": self.eta}

    def _steer(self, v, x, t, dt, path, c, *, generator, cost):
        v_t = v(x, t)
        h = float(dt)
        x1, x0 = path.x1_from_velocity(v_t, x, t), path.x0_from_velocity(v_t, x, t)
        self._predicted(x1)
        A, g = self.A, self.gamma
        Aty = A.adjoint(self.meas.y_like(A(x1)))
        rhs = Aty + g * x1
        applied = []  # conjugate gradients stop early on the tolerance: count the products they make

        def normal(z):
            applied.append(1)
            return A.adjoint(A(z)) + g * z

        x1_new = conjugate_gradient(normal, rhs, x1, n_iter=self.n_cg)
        _count(cost, operator_calls=2 + 2 * len(applied))
        if self.eta > 0:
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x0 = math.sqrt(1 - self.eta**2) * x0 + self.eta * eps
        c_next = _At.of(path, _t0(t) + h)
        x_next = c_next.alpha * x1_new + c_next.sigma * x0
        return (x_next - x) / h
