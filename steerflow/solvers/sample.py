"""``sample``: the one integration loop. Every solver, grid, geometry and steering method runs through it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .._types import VelocityField, check_batch
from .cost import Cost
from .grids import check_grid, uniform_grid
from .steps import FLAT, AbstractSolver, Dopri5, Geometry, get_solver


@dataclass(frozen=True)
class Trajectory:
    """A solve's result: final state ``x`` (b, *d), states at grid times ``xs`` (n+1, b, *d), the grid
    ``ts`` (n+1,) and the number of network evaluations ``nfe``."""

    x: Tensor
    xs: Tensor
    ts: Tensor
    nfe: int


class CountedField:
    """Wrap ``v(x, t[, cond])`` as ``f(x, t)`` with ``t`` of shape ``(b,)``; count calls into ``cost.nfe``."""

    def __init__(self, v: Callable[..., Tensor], cost: Cost, cond: Any = None) -> None:
        self.v, self.cost, self.cond = v, cost, cond

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if t.ndim == 0:
            t = t.to(dtype=x.dtype, device=x.device).expand(x.shape[0])
        self.cost.nfe += 1
        out = self.v(x, t) if self.cond is None else self.v(x, t, self.cond)
        if out.shape != x.shape:
            raise ValueError(f"the velocity field returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        return out

    def call_with(self, x: Tensor, t: Tensor, cond: Any = None, *, nfe: int = 1) -> Tensor:
        """Call the wrapped model with a condition of the caller's choosing (classifier-free guidance
        evaluates conditional and null branches), counting ``nfe`` evaluations."""
        if self.cond is not None:
            raise ValueError("this field has a fixed cond= from sample(); a guidance that chooses its own "
                             "conditions must be used without cond= in sample(...)")
        self.cost.nfe += nfe
        return self.v(x, t) if cond is None else self.v(x, t, cond)

    @property
    def model(self) -> Callable[..., Tensor]:
        """The wrapped field or network."""
        return self.v


def sample(
    v: VelocityField,
    x_0: Tensor,
    *,
    steps: int | None = None,
    ts: Tensor | None = None,
    method: str | AbstractSolver | Dopri5 = "euler",
    generator: torch.Generator | None = None,
    guidance: Any = None,
    geometry: Geometry | None = None,
    cond: Any = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    return_trajectory: bool = False,
    cost: Cost | None = None,
    progress: bool = False,
    check_finite: bool = True,
    enable_grad: bool = False,
) -> Tensor | Trajectory:
    """Integrate ``dx/dt = v(x, t)`` from ``x_0`` along the grid ``ts`` and return the final state.

    Args:
        v: velocity field ``v(x, t) -> (b, *d)`` with ``t`` of shape ``(b,)`` (``v(x, t, cond)`` when
            ``cond`` is given).
        x_0: start state (b, *d). Noise for generation (increasing grid), data for inversion
            (decreasing grid, e.g. ``uniform_grid(32).flip(0)``).
        steps: number of uniform steps on ``[0, 1]`` (ignored when ``ts`` is given). Default: 100 for
            fixed-step methods, one adaptive span for ``dopri5``.
        ts: explicit time grid (n+1,), strictly monotone.
        method: ``euler``, ``midpoint``, ``heun``, ``rk4`` or ``dopri5`` (``atol``/``rtol``), or a solver.
        generator: randomness for stochastic steps and stochastic guidance.
        guidance: a steering method (see :mod:`steerflow.steering`); it may replace the start state
            (``initial``), transform the velocity (``velocity``) and correct each state (``after_step``).
        geometry: a manifold or constrained domain (``retract``/``proju``); flat space by default.
        return_trajectory: return a :class:`Trajectory` with the states at every grid time and the NFE.
        cost: a :class:`~steerflow.metrics.Cost` that accumulates NFE (and the guidance's own counts).
        progress: show a progress bar.
        check_finite: stop with an error naming the step when a state becomes NaN/inf.
        enable_grad: record the autograd graph of the solve (to differentiate the result with respect to
            ``x_0`` or the field's parameters). Off by default: plain sampling keeps no graph, whatever the
            caller's grad mode. Guidance methods that differentiate (DPS, OT-ODE, FlowChef's data gradient, ...)
            switch autograd on for their own computation inside their hooks.
    """
    check_batch(x_0, "x_0")
    solver = get_solver(method, atol=atol, rtol=rtol) if method == "dopri5" else get_solver(method)
    if ts is None:
        if steps is None:
            steps = 1 if isinstance(solver, Dopri5) else 100
        ts = uniform_grid(steps)
    ts = check_grid(ts).to(device=x_0.device, dtype=torch.float64 if x_0.dtype == torch.float64 else torch.float32)
    geometry = geometry or FLAT
    cost = cost if cost is not None else Cost()
    nfe_before = cost.nfe
    base = CountedField(v, cost, cond)
    if guidance is not None and hasattr(guidance, "check"):
        guidance.check(base, solver=solver)  # e.g. "update, then step" methods refuse adaptive solvers

    with torch.set_grad_enabled(bool(enable_grad)):
        x = x_0
        if guidance is not None and hasattr(guidance, "initial"):
            x = guidance.initial(base, x, ts, generator=generator, cost=cost)
        xs = [x] if return_trajectory else None
        n = ts.numel() - 1
        it = range(n)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="sampling", unit="step", leave=False)
        for i in it:
            t, t_next = ts[i], ts[i + 1]
            dt = t_next - t
            if guidance is not None and hasattr(guidance, "velocity"):
                def f(x_, t_, _dt=dt):
                    return guidance.velocity(base, x_, _expand(t_, x_), _dt, generator=generator, cost=cost)
            else:
                f = base
            if isinstance(solver, Dopri5):
                x = solver.integrate(f, x, t, t_next, geometry)
            else:
                x = solver.step(f, x, t, dt, geometry, generator)
            if guidance is not None and hasattr(guidance, "after_step"):
                x = guidance.after_step(base, x, _expand(t_next, x), t=_expand(t, x), generator=generator, cost=cost)
            if check_finite and not torch.isfinite(x).all():
                raise FloatingPointError(f"non-finite state after step {i + 1}/{n} "
                                         f"(t={float(t):.4f} → {float(t_next):.4f})")
            if xs is not None:
                xs.append(x)
        if return_trajectory:
            return Trajectory(x=x, xs=torch.stack(xs), ts=ts, nfe=cost.nfe - nfe_before)
        return x


def _expand(t: Tensor, x: Tensor) -> Tensor:
    return t.to(dtype=x.dtype, device=x.device).expand(x.shape[0]) if t.ndim == 0 else t
