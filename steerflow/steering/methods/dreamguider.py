"""Dreamguider-style guidance: a time-varying factor and an automatic step scale, no network VJP."""
from __future__ import annotations

from ...paths.affine import AffinePath
from .._common import _data_grad, _displace, _number, _require_differentiable, _Steering, measurement
from ..base import check_path, check_window

__all__ = ["Dreamguider"]


class Dreamguider(_Steering):
    """Dreamguider-style guidance (Nair & Patel 2024): no network backpropagation, a time-varying factor and
    an automatic step scale.

    The gradient is taken at the data prediction, ``g = ∇_{x̂_1} ½‖y − A x̂_1‖²``, and carried to ``x_t`` by the
    time-varying factor ``λ_t = t / (t² + (1 − t)²)`` (the Jacobian ``∂x̂_1/∂x_t`` for unit-variance Gaussian
    data; ``α / (α² + σ²)`` on an affine path). The step is scaled automatically per sample so that the guidance
    move is a fraction ``scale`` of the flow's own move: ``x' = x − scale · (|dt| ‖v‖ / ‖λ_t g‖) · λ_t g``. Our
    reading of the paper's description (its code is not public); documented as "-style". "Update, then step":
    needs a fixed-step solver.
    """

    fixed_step_only = True

    def __init__(self, operator, y, sigma: float = 0.0, *, scale: float = 0.5,
                 path: AffinePath | str | None = None,
                 window: tuple[float, float] = (0.0, 1.0)) -> None:
        self.path = check_path(path)
        self.window = check_window(window)
        self.meas = measurement(operator, y, sigma)
        _require_differentiable(self.meas, "Dreamguider")
        self.scale = _number(scale, "scale")

    def settings(self):
        return {"scale": self.scale}

    def _steer(self, v, x, t, dt, path, c, *, generator, cost):
        v_t = v(x, t)
        x1 = path.x1_from_velocity(v_t, x, t)
        self._predicted(x1)
        g = c.gain * _data_grad(self.meas, x1, cost)
        b = x.shape[0]
        gn = g.reshape(b, -1).norm(dim=-1).clamp_min(1e-12)
        vn = v_t.reshape(b, -1).norm(dim=-1)
        eta = self.scale * abs(float(dt)) * vn / gn
        return _displace(v_t, x, x - eta.reshape(-1, *([1] * (x.ndim - 1))) * g, dt)
