"""Step rules: how one step ``x(t) → x(t + dt)`` of ``dx/dt = f(x, t)`` is taken.

Each step works on a geometry (flat space by default, a manifold or a constrained domain otherwise).
On an embedded manifold (``geometry.projection_stages``) the stages are formed in the ambient space,
each slope made tangent where it is evaluated, and the step's result projected with ``projx``: the
standard projection method, which keeps the rule's order (Hairer, Lubich & Wanner, GNI §IV.4; the
projected steps of Chen & Lipman 2024, §3.3). On other geometries every stage state is formed with
``geometry.retract(x, dx)`` and every slope projected at the base point: in a box ``retract`` reflects,
so every stage of every rule stays in the domain (Xie et al. 2024, "Reflected Flow Matching").
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Protocol

import torch
from torch import Tensor

StepField = Callable[[Tensor, Tensor], Tensor]
"""``f(x, t)`` with ``t`` a 0-dim tensor: the field the step rule sees."""


class Geometry(Protocol):
    def retract(self, x: Tensor, dx: Tensor) -> Tensor: ...

    def projx(self, x: Tensor) -> Tensor: ...

    def proju(self, x: Tensor, v: Tensor) -> Tensor: ...


class Flat:
    """Euclidean space: ``retract(x, dx) = x + dx``, velocities unchanged."""

    projection_stages = False

    def projx(self, x: Tensor) -> Tensor:
        return x

    def retract(self, x: Tensor, dx: Tensor) -> Tensor:
        return x + dx

    def proju(self, x: Tensor, v: Tensor) -> Tensor:
        return v

    def __repr__(self) -> str:
        return "Flat()"


FLAT = Flat()


class AbstractSolver(ABC):
    """A fixed-step rule of global order ``order`` using ``stages`` field evaluations per step."""

    order: int
    stages: int
    name: str

    @abstractmethod
    def step(self, f: StepField, x: Tensor, t: Tensor, dt: Tensor, geometry: Geometry = FLAT,
             generator: torch.Generator | None = None) -> Tensor: ...


def _projects(geometry: Geometry) -> bool:
    """Embedded manifolds set ``projection_stages``: stages are taken in the ambient space and only the
    step's result is projected (Hairer, Lubich & Wanner, GNI §IV.4, standard projection method), which
    keeps the full order of the Runge–Kutta rule on curved manifolds. Other geometries (flat space,
    reflected domains) form every stage with ``retract``."""
    return bool(getattr(geometry, "projection_stages", False))


def _stage(geometry: Geometry, x: Tensor, dx: Tensor) -> Tensor:
    return x + dx if _projects(geometry) else geometry.retract(x, dx)


def _slope(geometry: Geometry, x: Tensor, x_i: Tensor, k: Tensor) -> Tensor:
    # the field is made tangent where it is evaluated (projection) or at the step's base point
    return geometry.proju(x_i, k) if _projects(geometry) else geometry.proju(x, k)


def _finish(geometry: Geometry, x: Tensor, dx: Tensor) -> Tensor:
    return geometry.projx(x + dx) if _projects(geometry) else geometry.retract(x, dx)


class ExplicitRK(AbstractSolver):
    """An explicit Runge–Kutta rule given by its Butcher tableau ``(a, b, c)``."""

    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]

    def step(self, f, x, t, dt, geometry=FLAT, generator=None):
        ks: list[Tensor] = []
        for i, (a_i, c_i) in enumerate(zip(self.a, self.c)):
            x_i = x if i == 0 else _stage(geometry, x, dt * sum(a * k for a, k in zip(a_i, ks) if a != 0))
            ks.append(_slope(geometry, x, x_i, f(x_i, t + c_i * dt)))
        return _finish(geometry, x, dt * sum(b * k for b, k in zip(self.b, ks) if b != 0))


class Euler(ExplicitRK):
    """``x + dt f(x, t)``."""

    order, stages, name = 1, 1, "euler"
    a, b, c = ((),), (1.0,), (0.0,)


class Midpoint(ExplicitRK):
    """Explicit midpoint: ``k = f(x + dt/2 f(x, t), t + dt/2)``, ``x + dt k``."""

    order, stages, name = 2, 2, "midpoint"
    a, b, c = ((), (0.5,)), (0.0, 1.0), (0.0, 0.5)


class Heun(ExplicitRK):
    """Heun's method (explicit trapezoid): average of the slopes at both ends."""

    order, stages, name = 2, 2, "heun"
    a, b, c = ((), (1.0,)), (0.5, 0.5), (0.0, 1.0)


class RK4(ExplicitRK):
    """Classical fourth-order Runge–Kutta."""

    order, stages, name = 4, 4, "rk4"
    a, b, c = ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6), (0.0, 0.5, 0.5, 1.0)


# Dormand–Prince 5(4) tableau (Dormand & Prince 1980), first-same-as-last.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


class SolveBreakdown(FloatingPointError):
    """An adaptive solve that cannot go on: its error estimate turned non-finite or its step size collapsed."""


class Dopri5:
    """Adaptive Dormand–Prince 5(4) with a PI step-size controller (Hairer, Nørsett & Wanner II.4).

    The error of a step is ``||(x5 - x4) / (atol + rtol * max(|x|, |x5|))||_RMS`` over the whole batch;
    a step is accepted when it is at most 1. Not a fixed-step rule: ``sample`` calls :meth:`integrate`
    between consecutive grid times.
    """

    order, name = 5, "dopri5"

    def __init__(self, atol: float = 1e-5, rtol: float = 1e-5, max_steps: int = 10_000,
                 safety: float = 0.9, first_step: float | None = None) -> None:
        if not (atol > 0 and rtol >= 0):
            raise ValueError(f"dopri5 needs atol > 0 and rtol >= 0, got atol={atol}, rtol={rtol}")
        self.atol, self.rtol, self.max_steps, self.safety, self.first_step = atol, rtol, max_steps, safety, first_step

    def integrate(self, f: StepField, x: Tensor, t0: Tensor, t1: Tensor, geometry: Geometry = FLAT) -> Tensor:
        """Integrate from ``t0`` to ``t1`` (either direction) with adaptive steps."""
        span = float(t1 - t0)
        if span == 0.0:
            return x
        direction = 1.0 if span > 0 else -1.0
        t = float(t0)
        k1 = _slope(geometry, x, x, f(x, t0))
        h = self.first_step or self._initial_step(x, k1, abs(span))
        h = min(h, abs(span))
        err_prev = 1.0
        for _ in range(self.max_steps):
            remaining = float(t1) - t
            if abs(remaining) <= 1e-12 * max(1.0, abs(float(t1))):
                return x
            h = min(h, abs(remaining))
            dt = direction * h
            ks = [k1]
            for i in range(1, 7):
                dx = sum(a * k for a, k in zip(_DP_A[i], ks))
                ti = torch.as_tensor(t + _DP_C[i] * dt, dtype=t0.dtype)
                x_i = _stage(geometry, x, dt * dx)
                ks.append(_slope(geometry, x, x_i, f(x_i, ti)))
            x5 = _finish(geometry, x, dt * sum(b * k for b, k in zip(_DP_B5, ks)))
            err_vec = dt * sum((b5 - b4) * k for b5, b4, k in zip(_DP_B5, _DP_B4, ks))
            scale = self.atol + self.rtol * torch.maximum(x.abs(), x5.abs())
            err = float(torch.sqrt(torch.mean((err_vec.detach() / scale.detach()) ** 2)))
            if err != err:  # NaN
                raise SolveBreakdown(f"dopri5 produced non-finite values at t={t:.4g}")
            if err <= 1.0:
                t_new = t + dt
                x = x5
                if _projects(geometry):  # the accepted state was projected: re-evaluate there
                    k1 = _slope(geometry, x, x, f(x, torch.as_tensor(t_new, dtype=t0.dtype)))
                else:
                    k1 = ks[-1]  # first same as last: stage 7 is f at the accepted state
                t = t_new
                factor = self.safety * max(err, 1e-10) ** (-0.7 / 5) * max(err_prev, 1e-4) ** (0.4 / 5)
                h = h * min(10.0, max(0.2, factor))
                err_prev = max(err, 1e-4)
            else:
                h = h * max(0.1, self.safety * err ** (-1 / 5))
            if h < 1e-10:
                raise SolveBreakdown(f"dopri5 step size underflow at t={t:.6g}")
        raise RuntimeError(f"dopri5 exceeded max_steps={self.max_steps} before reaching t={float(t1):.4g}")

    def _initial_step(self, x: Tensor, k1: Tensor, span: float) -> float:
        scale = self.atol + self.rtol * x.abs()
        d0 = float(torch.sqrt(torch.mean((x.detach() / scale) ** 2)))
        d1 = float(torch.sqrt(torch.mean((k1.detach() / scale) ** 2)))
        h = 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-3
        return min(max(h, 1e-4), 0.1 * span if span > 0 else h)


SOLVERS: dict[str, type] = {"euler": Euler, "midpoint": Midpoint, "heun": Heun, "rk4": RK4, "dopri5": Dopri5}


def get_solver(method: str | AbstractSolver | Dopri5, **options) -> AbstractSolver | Dopri5:
    """Look a solver up by name; ``options`` (e.g. ``atol``, ``rtol``) go to adaptive solvers."""
    if isinstance(method, (AbstractSolver, Dopri5)):
        return method
    if method not in SOLVERS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(SOLVERS)}")
    cls = SOLVERS[method]
    if options and cls is not Dopri5:
        raise ValueError(f"method {method!r} takes no options, got {sorted(options)}")
    return cls(**options)
