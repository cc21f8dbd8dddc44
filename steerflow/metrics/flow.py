"""Metrics of a flow itself: straightness of its trajectories and the transport cost of its coupling."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._types import VelocityField
from ..solvers import sample


def _check_pair(x_0: Tensor, x_1: Tensor) -> None:
    for name, x in (("x_0", x_0), ("x_1", x_1)):
        if not torch.is_tensor(x):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"{name} must have shape (b, *d), got {tuple(x.shape)}")
    if x_0.shape != x_1.shape:
        raise ValueError(f"x_0 and x_1 must have the same shape, got {tuple(x_0.shape)} and {tuple(x_1.shape)}")


def transport_cost(x_0: Tensor, x_1: Tensor) -> float:
    """Expected squared displacement ``E |x_1 - x_0|²`` of a coupling (sum over ``*d``, mean over the batch).

    For the endpoints of a flow, ``x_1 = ψ_1(x_0)``, this is the transport cost of the coupling it
    induces (Liu et al. 2022, "Flow Straight and Fast", §3: rectification never increases it); its
    minimum over couplings is ``W₂²`` of the marginals.

    Args:
        x_0: (b, *d) start states; x_1: (b, *d) the matched end states.
    """
    _check_pair(x_0, x_1)
    diff = (x_1.detach() - x_0.detach()).to(torch.float64)
    return float(diff.reshape(diff.shape[0], -1).square().sum(1).mean())


@torch.no_grad()
def straightness(v: VelocityField, x_0: Tensor, *, steps: int = 100, method: str = "rk4",
                 ts: Tensor | None = None, cond: Any = None) -> float:
    """Straightness ``S(Z) = ∫₀¹ E |(Z_1 - Z_0) - v(Z_t, t)|² dt`` of the flow ``dZ_t = v(Z_t, t) dt``.

    Liu et al. 2022, "Flow Straight and Fast" (§2.2): ``S(Z) = 0`` iff every trajectory is a straight
    line travelled at constant speed, and then one Euler step is exact. The trajectory is the flow's
    own ODE solution from ``x_0`` (:func:`steerflow.sample` with ``return_trajectory=True``); the field
    is re-evaluated at every grid state ``(Z_{t_i}, t_i)`` and the time integral is the trapezoid rule
    on the grid (``steps + 1`` extra network evaluations). Summed over ``*d``, averaged over the batch.

    Args:
        v: velocity field ``v(x, t)`` (``v(x, t, cond)`` with ``cond``), ``t`` of shape ``(b,)``.
        x_0: (b, *d) start states (source samples).
        steps: uniform steps on ``[0, 1]`` (ignored when ``ts`` is given).
        method: ODE step rule, see :func:`steerflow.sample`.
        ts: an explicit increasing grid from 0 to 1, shape (n+1,).
        cond: conditioning passed to ``v``.

    Returns:
        ``S(Z)`` as a float.
    """
    if ts is not None:
        ts = torch.as_tensor(ts)
        if ts.ndim != 1 or ts.numel() < 2 or not (ts.diff() > 0).all():
            raise ValueError("ts must be a strictly increasing 1-D grid for straightness")
    traj = sample(v, x_0, steps=steps, ts=ts, method=method, cond=cond, return_trajectory=True)
    x_0, x_1 = traj.xs[0], traj.xs[-1]
    chord = x_1 - x_0
    residuals = []
    for t, x_t in zip(traj.ts, traj.xs):
        t_b = t.to(dtype=x_t.dtype).expand(x_t.shape[0])
        v_t = v(x_t, t_b) if cond is None else v(x_t, t_b, cond)
        r = (chord - v_t).to(torch.float64)
        residuals.append(r.reshape(r.shape[0], -1).square().sum(1).mean())
    residuals = torch.stack(residuals)
    return float(torch.trapezoid(residuals, traj.ts.to(torch.float64)))
