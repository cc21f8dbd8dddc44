"""FlowChef: gradient skipping on the data prediction, no backpropagation through the network."""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from ...paths.affine import AffinePath
from .._common import _data_grad, _displace, _loss_grad, _number, _require_differentiable, _Steering, _t0, measurement
from ..base import check_path, check_window

__all__ = ["FlowChef"]


class FlowChef(_Steering):
    """FlowChef (Patel et al. 2024, "Steering Rectified Flow Models in the Vector Field"): gradient skipping.

    With ``v = v(x, t)`` held fixed, ``K`` inner steps ``x ← x − s_t ∇_{x̂_1} L(x̂_1)``, ``x̂_1 = x + (1 − t) v``
    (no backpropagation through the network: ``∂x̂_1/∂x`` is taken as ``I``), then the Euler step with ``v``.
    ``L`` is ``loss_fn(x̂_1)`` (any differentiable (b,) loss, e.g. a classifier's ``−log p(c | x̂_1)``) or the
    measurement loss ``½‖y − A x̂_1‖²``. Step schedule ``s_t = step_size · w(t)`` with ``w`` constant or
    ``1 − t`` (``schedule="linear"``). ``x̂_1`` is read from the model's path (``path=``, default linear).
    "Update, then step": needs a fixed-step solver.
    """

    fixed_step_only = True

    def __init__(self, operator=None, y=None, sigma: float = 0.0, *, loss_fn: Callable[[Tensor], Tensor] | None = None,
                 step_size: float = 0.1, n_inner: int = 1, schedule: str = "constant",
                 path: AffinePath | str | None = None,
                 window: tuple[float, float] = (0.0, 1.0)) -> None:
        if (operator is None) == (loss_fn is None):
            raise ValueError("FlowChef needs exactly one of (operator, y) or loss_fn")
        self.path = check_path(path)
        self.window = check_window(window)
        self.meas = measurement(operator, y, sigma) if operator is not None else None
        if self.meas is not None:
            _require_differentiable(self.meas, "FlowChef")
        if schedule not in ("constant", "linear"):
            raise ValueError(f"unknown schedule {schedule!r}; expected 'constant' or 'linear'")
        if n_inner < 1:
            raise ValueError(f"n_inner must be at least 1, got {n_inner}")
        step_size = _number(step_size, "step_size")
        self.loss_fn, self.step_size, self.n_inner, self.schedule = loss_fn, step_size, int(n_inner), schedule

    def settings(self):
        return {"step_size": self.step_size, "n_inner": self.n_inner, "schedule": self.schedule}

    def _steer(self, v, x, t, dt, path, c, *, generator, cost):
        v_t = v(x, t)
        s = self.step_size * ((1 - _t0(t)) if self.schedule == "linear" else 1.0)
        x_new = x
        for _ in range(self.n_inner):
            x1 = path.x1_from_velocity(v_t, x_new, t)
            self._predicted(x1)
            g = _data_grad(self.meas, x1, cost) if self.meas is not None else _loss_grad(self.loss_fn, x1)
            x_new = x_new - s * g
        return _displace(v_t, x, x_new, dt)
