"""OT-ODE / ΠGDM guidance: a Gaussian likelihood of the data prediction, one VJP through the network."""
from __future__ import annotations

import torch

from ...paths.affine import AffinePath
from .._common import _GUIDANCE_CG_ITERS, _At, _count, _number, _require_linear, _Steering, _t0, measurement
from ..base import check_path, check_window

__all__ = ["OTODE"]


class OTODE(_Steering):
    """OT-ODE / ΠGDM guidance for flows (Pokle et al. 2024; Song et al. 2023 ΠGDM).

    ``∇ log p(y | x_t) ≈ (∂x̂_1/∂x)ᵀ Aᵀ (r_t² A Aᵀ + σ² I)⁻¹ (y − A x̂_1)`` (a VJP through the network) with
    ``r_t² = (1 − t)² / (t² + (1 − t)²)``, and ``v' = v + scale · ((1 − t)/t) ∇ log p(y | x_t)``
    (``r_t² = σ² / (α² + σ²)`` and ``b_t`` on the model's affine path).
    """

    def __init__(self, operator, y, sigma: float = 0.0, *, scale: float = 1.0, t_min: float = 1e-2,
                 path: AffinePath | str | None = None,
                 window: tuple[float, float] = (0.0, 1.0)) -> None:
        self.path = check_path(path)
        self.window = check_window(window)
        self.meas = measurement(operator, y, sigma)
        self.A = _require_linear(self.meas, "OTODE")
        t_min = _number(t_min, "t_min", high=1.0, open_low=True, open_high=True)
        self.scale, self.t_min = _number(scale, "scale"), t_min

    def settings(self):
        return {"scale": self.scale}

    def _steer(self, v, x, t, dt, path, c, *, generator, cost):
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            v_t = v(x_, t)
            x1 = path.x1_from_velocity(v_t, x_, t)
            self._predicted(x1)
            r = self.meas.residual(x1.detach(), cost)
            w = self.A.adjoint(self.A.solve_normal(c.r2, self.meas.sigma**2, r, n_iter=_GUIDANCE_CG_ITERS))
            (g,) = torch.autograd.grad(x1, x_, grad_outputs=w)
        _count(cost, vjp=1, operator_calls=2)
        return v_t.detach() + self.scale * _At.of(path, max(_t0(t), self.t_min)).score_factor * g
