"""DPS and its look-ahead / end-to-end variant: the measurement loss differentiated through the network."""
from __future__ import annotations

import torch
from torch import Tensor

from ...metrics.cost import Cost
from ...paths.affine import AffinePath
from ...solvers.sample import sample
from .._common import Measurement, _At, _count, _number, _require_differentiable, _Steering, _t0, measurement
from ..base import check_path, check_window

__all__ = ["DPS", "Lookahead"]


def _posterior_step(meas: Measurement, v, x: Tensor, t: Tensor, k: int, cost: Cost | None, *, normalize: bool,
                    path: AffinePath):
    """Predict ``x̂_1`` with autograd on, return ``(v(x,t), ∇_x L, x̂_1)``: ``k = 1`` the path's data prediction,
    ``k > 1`` ``k`` Euler steps of the flow from ``(x, t)`` to 1.

    ``L = ‖y − A x̂_1(x)‖`` (``normalize``, DPS's ``ζ / ‖y − A x̂‖`` step) or ``‖y − A x̂_1(x)‖² / 2σ²``.
    """
    with torch.enable_grad():
        x_ = x.detach().requires_grad_(True)
        v_t = v(x_, t)
        if k == 1:
            x1 = path.x1_from_velocity(v_t, x_, t)
        else:  # one Euler step with v_t, then k − 1 more of the flow to t = 1
            t0 = _t0(t)
            h = (1 - t0) / k
            ts = torch.linspace(t0 + h, 1.0, k, dtype=torch.float64)
            x1 = sample(v, x_ + h * v_t, ts=ts, cost=Cost(), check_finite=False, enable_grad=True)
        r = meas.residual(x1, cost)
        sq = (r**2).reshape(r.shape[0], -1).sum(-1)
        loss = sq.clamp_min(1e-30).sqrt().sum() if normalize else sq.sum() / (2 * max(meas.sigma, 1e-12) ** 2)
        (g,) = torch.autograd.grad(loss, x_)
    _count(cost, vjp=k, operator_calls=1)
    return v_t.detach(), g, x1.detach()


class _BackpropGuidance(_Steering):
    """Shared body of :class:`DPS` and :class:`Lookahead`: gradient of the measurement loss on a predicted
    ``x̂_1``, differentiated through the network."""

    def __init__(self, operator, y, sigma: float = 0.0, *, scale: float = 0.05, normalize: bool = True,
                 t_min: float = 1e-2, path: AffinePath | str | None = None,
                 window: tuple[float, float] = (0.0, 1.0)) -> None:
        self.path = check_path(path)
        self.window = check_window(window)
        self.meas = measurement(operator, y, sigma)
        _require_differentiable(self.meas, type(self).__name__)
        if not normalize and self.meas.sigma == 0:
            raise ValueError("normalize=False weights by 1/σ² and needs sigma > 0")
        scale, t_min = _number(scale, "scale"), _number(t_min, "t_min", high=1.0, open_low=True, open_high=True)
        self.scale, self.normalize, self.t_min = scale, bool(normalize), t_min

    def _k(self, t, dt) -> int:
        return 1

    def settings(self):
        return {"scale": self.scale, "normalize": self.normalize}

    def _steer(self, v, x, t, dt, path, c, *, generator, cost):
        v_t, g, x1 = _posterior_step(self.meas, v, x, t, self._k(t, dt), cost, normalize=self.normalize, path=path)
        self._predicted(x1)
        if self.normalize:
            return v_t - (self.scale / abs(float(dt))) * g
        return v_t - self.scale * _At.of(path, max(_t0(t), self.t_min)).score_factor * g


class DPS(_BackpropGuidance):
    """Diffusion posterior sampling adapted to flows (Chung et al. 2023; "posterior guidance").

    ``x̂_1 = x + (1 − t) v(x, t)`` (the model's path's ``x̂_1``) is differentiated through the network:
    ``v' = v − (ζ / |dt|) ∇_x ‖y − A x̂_1(x)‖`` — DPS's per-step move ``−ζ ∇‖y − A x̂‖`` with ``ζ = scale``
    (``normalize=True``), or with ``normalize=False`` ``v' = v − ζ ((1 − t)/t) ∇_x ‖y − A x̂_1‖² / 2σ²``,
    the Tweedie-plug-in approximation of ``((1 − t)/t) ∇ log p(y | x_t)`` (``b_t`` on other paths). One VJP
    per stage.
    """


class Lookahead(_BackpropGuidance):
    """DPS with a ``k``-step look-ahead: ``x̂_1`` from ``k`` Euler steps of the flow from ``(x, t)`` to 1,
    differentiated through all of them (``k = 1`` is DPS; ``k=None`` solves the whole remaining grid, i.e.
    end-to-end guidance; Wang et al., "Greed is Good"). Costs ``k`` NFE and ``k`` VJPs per stage."""

    def __init__(self, operator, y, sigma: float = 0.0, *, k: int | None = 4, scale: float = 0.05,
                 normalize: bool = True, t_min: float = 1e-2, path: AffinePath | str | None = None,
                 window: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__(operator, y, sigma, scale=scale, normalize=normalize, t_min=t_min, path=path,
                         window=window)
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive integer or None (end-to-end), got {k!r}")
        self.k = k

    def settings(self):
        return {**super().settings(), "k": self.k}

    def _k(self, t, dt) -> int:
        if self.k is not None:
            return self.k
        return max(1, int(round((1 - _t0(t)) / abs(float(dt)))))
