"""Ensemble Kalman guidance: derivative-free, forward-model evaluations only."""
from __future__ import annotations

import torch

from ...metrics.cost import Cost
from ...paths.affine import AffinePath
from ...solvers.sample import sample
from .._common import _count, _displace, _integer, _number, _Steering, _t0, measurement
from ..base import check_path, check_window

__all__ = ["EnKG"]


class EnKG(_Steering):
    """Ensemble Kalman guidance (Zheng et al. 2024): derivative-free, forward-model evaluations only.

    Particles ``x^j`` (the batch, or consecutive groups of ``ensemble_size``) predict ``x̂_1^j`` (one step,
    ``x + (1 − t) v``, or ``predictor_steps`` Euler steps to 1), measure ``ŷ^j = A(x̂_1^j)`` and move by the
    ensemble preconditioned gradient ``x^j ← x^j − η Σ_k ⟨ŷ^j − y, ŷ^k − ŷ̄⟩ (x^k − x̄) / J`` with the
    normalised step ``η = scale / ‖C‖_F``, ``C_jk = ⟨ŷ^j − y, ŷ^k − ŷ̄⟩ / J`` (as in the official code).
    The base velocity at ``x`` is held fixed for the step ("update, then step": needs a fixed-step solver).
    With one predictor step ``x̂_1`` is the model's path's data prediction.
    """

    fixed_step_only = True

    def __init__(self, operator, y, sigma: float = 0.0, *, scale: float = 0.05, ensemble_size: int | None = None,
                 predictor_steps: int = 1, n_updates: int = 1, path: AffinePath | str | None = None,
                 window: tuple[float, float] = (0.0, 1.0)) -> None:
        self.path = check_path(path)
        self.window = check_window(window)
        self.meas = measurement(operator, y, sigma)
        self.J = _integer(ensemble_size, "ensemble_size", low=2, optional=True)
        self.k, self.n_updates = _integer(predictor_steps, "predictor_steps"), _integer(n_updates, "n_updates")
        self.scale = _number(scale, "scale")

    def settings(self):
        return {"scale": self.scale, "n_updates": self.n_updates}

    def _predict(self, v, x, t, v_t, path):
        if self.k == 1:
            return path.x1_from_velocity(v_t, x, t)
        t0 = _t0(t)  # one Euler step with v_t, then k − 1 more of the flow to t = 1
        h = (1 - t0) / self.k
        return sample(v, x + h * v_t, ts=torch.linspace(t0 + h, 1.0, self.k, dtype=torch.float64), cost=Cost())

    def _steer(self, v, x, t, dt, path, c, *, generator, cost):
        v_t = v(x, t)
        b = x.shape[0]
        J = self.J or b
        if J < 2:
            raise ValueError("EnKG needs an ensemble of at least 2 particles; the batch holds 1 (pass several "
                             "particles per measurement, grouped consecutively, and ensemble_size=J)")
        if b % J:
            raise ValueError(f"the batch ({b}) must be a multiple of ensemble_size ({J})")
        x_cur = x
        with torch.no_grad():
            for u in range(self.n_updates):
                vu = v_t if u == 0 else v(x_cur, t)
                x1 = self._predict(v, x_cur, t, vu, path)
                self._predicted(x1)
                yh = self.meas.operator(x1)
                _count(cost, operator_calls=1)
                err = (yh - self.meas.y_like(yh)).reshape(b // J, J, -1)
                yd = yh.reshape(b // J, J, -1)
                yd = yd - yd.mean(1, keepdim=True)
                xd = x_cur.reshape(b // J, J, -1)
                xd = xd - xd.mean(1, keepdim=True)
                # C = err ydᵀ / J (J × J) is never formed: C xd = err (ydᵀ xd) / J, ‖C‖_F² = Σ (errᵀerr) ⊙ (ydᵀyd) / J²
                dx = err @ (yd.transpose(1, 2) @ xd) / J
                cf = ((err.transpose(1, 2) @ err) * (yd.transpose(1, 2) @ yd)).sum((1, 2)).clamp_min(1e-30).sqrt() / J
                eta = (self.scale / cf).reshape(-1, 1, 1)
                x_cur = x_cur - (eta * dx).reshape(x.shape)
        return _displace(v_t, x, x_cur, dt)
