"""D-Flow: the source noise optimised through the differentiable solve."""
from __future__ import annotations

import torch

from ...metrics.cost import Cost
from ...paths.affine import AffinePath
from ...solvers.sample import sample
from .._common import _count, _integer, _number, _require_differentiable, _Steering, measurement
from ..base import AbstractGuidance, check_path, check_window

__all__ = ["DFlow"]


class DFlow(_Steering):
    """D-Flow (Ben-Hamu et al. 2024): optimise the source noise through the differentiable solve.

    ``x_0* = argmin_{x_0} ‖y − A(φ(x_0))‖² / 2σ² + λ R(x_0)`` with ``φ`` an ``inner_steps``-step Euler solve
    (:func:`steerflow.sample`, differentiated through) and ``R(x_0) = ‖x_0‖²/2 − (d/2 − 1) log ‖x_0‖²`` the
    χ²-norm regulariser (negative log density of ``‖x_0‖²`` under ``N(0, I)``), minimised by L-BFGS in
    ``initial``; the outer loop then solves from ``x_0*``. Each backward pass costs ``inner_steps`` VJPs.
    The method acts at one time only, the start of the grid: a ``window`` that does not hold ``ts[0]`` leaves the
    solve unguided.
    """

    def __init__(self, operator, y, sigma: float = 0.0, *, inner_steps: int = 10, n_iter: int = 10,
                 reg: float = 1.0, lr: float = 1.0, path: AffinePath | str | None = None,
                 window: tuple[float, float] = (0.0, 1.0)) -> None:
        self.path = check_path(path)  # the method solves the flow's own ODE: valid on any path
        self.window = check_window(window)
        self.meas = measurement(operator, y, sigma)
        _require_differentiable(self.meas, "DFlow")
        inner_steps, n_iter = _integer(inner_steps, "inner_steps"), _integer(n_iter, "n_iter")
        reg, lr = _number(reg, "reg"), _number(lr, "lr", open_low=True)
        self.inner_steps, self.n_iter, self.reg, self.lr = inner_steps, n_iter, reg, lr

    def settings(self):
        return {"lr": self.lr, "reg": self.reg, "n_iter": self.n_iter}

    guided_velocity = AbstractGuidance.guided_velocity  # after initial() the solve is the plain flow from x_0*

    def initial(self, v, x, ts, *, generator=None, cost=None):
        self._start(v, x)
        if not self.acts_at(ts[0]):
            return x
        w = 1.0 / (2 * max(self.meas.sigma, 1e-3) ** 2)
        d = x[0].numel()
        x0 = x.detach().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([x0], lr=self.lr, max_iter=self.n_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            with torch.enable_grad():
                x1 = sample(v, x0, steps=self.inner_steps, cost=Cost(), check_finite=False, enable_grad=True)
                r = self.meas.residual(x1, cost)
                n2 = (x0**2).reshape(x0.shape[0], -1).sum(-1)
                loss = w * (r**2).sum() + self.reg * (0.5 * n2 - (0.5 * d - 1) * torch.log(n2)).sum()
                loss.backward()
            _count(cost, vjp=self.inner_steps, operator_calls=1)
            return loss

        opt.step(closure)
        return x0.detach()
