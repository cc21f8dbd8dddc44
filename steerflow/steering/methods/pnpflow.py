"""PnP-Flow: gradient step, re-interpolation and denoising on the loop's grid."""
from __future__ import annotations

import torch

from ...paths.affine import AffinePath
from .._common import _At, _data_grad, _number, _require_differentiable, _Steering, _t0, measurement
from ..base import check_path, check_window

__all__ = ["PnPFlow"]


class PnPFlow(_Steering):
    """PnP-Flow (Martin et al. 2025): gradient step, interpolation, denoising — on the loop's grid.

    At grid time ``t`` with state ``z̃`` (a point of the path): denoise ``x = D_t(z̃) = z̃ + (1 − t) v(z̃, t)``,
    take a data-fidelity step ``z = x − γ_t Aᵀ(A x − y)`` with ``γ_t = step_size (1 − t)^α``, and
    re-interpolate with fresh noise ``z̃_{t+dt} = (t + dt) z + (1 − t − dt) ε`` (``x̂_1`` and
    ``α_{t+dt} z + σ_{t+dt} ε`` on the model's path). Returned as the velocity of that jump, so it is exact for
    ``method="euler"`` (the algorithm is not an ODE) and needs a fixed-step solver. A step
    ``step_size ≳ 2 / ‖A‖²`` makes the gradient step expand; the solve then stops with an error.
    """

    fixed_step_only = True

    def __init__(self, operator, y, sigma: float = 0.0, *, step_size: float = 1.0, alpha: float = 0.5,
                 path: AffinePath | str | None = None,
                 window: tuple[float, float] = (0.0, 1.0)) -> None:
        self.path = check_path(path)
        self.window = check_window(window)
        self.meas = measurement(operator, y, sigma)
        _require_differentiable(self.meas, "PnPFlow")
        self.step_size, self.alpha = _number(step_size, "step_size"), _number(alpha, "alpha")

    def settings(self):
        return {"step_size": self.step_size, "alpha": self.alpha}

    def _steer(self, v, x, t, dt, path, c, *, generator, cost):
        v_t = v(x, t)
        t0, h = _t0(t), float(dt)
        x1 = path.x1_from_velocity(v_t, x, t)
        self._predicted(x1)
        z = x1 - self.step_size * (1 - t0) ** self.alpha * _data_grad(self.meas, x1, cost)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        c_next = _At.of(path, t0 + h)
        x_next = c_next.alpha * z + c_next.sigma * eps
        return (x_next - x) / h
