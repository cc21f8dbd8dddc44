"""The contract between the one sampler loop and every steering method.

A guidance is never a sampler of its own. ``steerflow.sample(v, x_0, guidance=g)`` calls, for each
grid interval ``[t, t + dt]``:

1. once before the loop, ``g.initial(v, x_0, ts, generator=, cost=) -> x_0'`` (e.g. D-Flow optimises the
   start noise through whole solves);
2. at every solver stage, ``g.velocity(v, x, t, dt, generator=, cost=) -> v'`` in place of ``v(x, t)``
   (DPS, FlowChef, classifier-free guidance, EnKG, OT-ODE, ...; inside the method's window, below);
3. after the step, ``g.after_step(v, x_next, t_next, t=, generator=, cost=) -> x_next'`` (DDS's
   conjugate-gradient data consistency, PnP-Flow's projection, ...).

``v`` is the counted base field ``v(x, t)`` with ``t`` of shape ``(b,)``; ``cost`` is the
:class:`~steerflow.metrics.cost.Cost` of the solve, where methods add their VJPs and operator calls.

**The window.** Every method acts on a window of time ``(start, stop)`` (``window=`` of its constructor, default
``(0, 1)``: all of ``[0, 1]``): :meth:`AbstractGuidance.velocity`, the hook the loop calls, returns the method's
:meth:`~AbstractGuidance.guided_velocity` where ``start <= t < stop`` (``stop = 1`` includes ``t = 1``) and the base
field ``v(x, t)`` elsewhere, so outside the window the solve is the unguided flow. A method implements
``guided_velocity`` (and, where it needs them, ``initial`` / ``after_step``, which run at every step: they also keep
the bookkeeping of a solve); the window is decided here, once. The window is tested at each solver stage's
time, so a multi-stage step that ends at ``start`` (heun, rk4) evaluates its last stage guided; with euler and
midpoint steps the state at ``start`` is exactly the unguided one. A method that acts at the start of the solve
only (D-Flow) acts when the grid's first time lies in its window. Guidances that override ``velocity`` itself
(classifier-free guidance, the RF-Inversion controllers with their closed ``[t_start, t_end]``, :class:`Compose`)
decide time themselves.

Before integrating, the loop calls ``g.check(v, solver=solver)`` once: a method refuses there a solver or a
model path its formulas do not hold for. The path is the one the model was trained with: ``v.model.path`` when
the model carries one (an :class:`~steerflow.paths.AffinePath` or its name), else the guidance's ``path=``
argument, else the linear path.

A guided solve that leaves a sane range stops: ``after_step`` (of this base, or called by an override through
:meth:`AbstractGuidance._check_state`) raises one ``FloatingPointError`` naming the method and its step settings
when the state is non-finite or has grown ``max_growth`` times beyond its starting scale (the start state, the
first data prediction and the measurement, at least 1, the scale of the standard-normal source).
"""
from __future__ import annotations

import math
import numbers
from abc import ABC
from typing import Any, Callable

import torch
from torch import Tensor

from ..metrics.cost import Cost
from ..paths.affine import AffinePath, LinearPath, get_path

Field = Callable[[Tensor, Tensor], Tensor]

_LINEAR = LinearPath()


def _is_adaptive(solver: Any) -> bool:
    """An adaptive solver (dopri5) hands the hooks the whole grid interval as ``dt``, not its own steps."""
    if isinstance(solver, str):
        return solver == "dopri5"
    return solver is not None and hasattr(solver, "integrate") and not hasattr(solver, "step")


def carried_path(v: Any) -> AffinePath | None:
    """The path a velocity model records as ``model.path`` (behind the sampler's counted field), if any."""
    model = getattr(v, "model", v)
    path = getattr(model, "path", None)
    if path is None:
        return None
    if isinstance(path, str):
        return get_path(path)
    if not isinstance(path, AffinePath):
        raise TypeError(f"the model's path is {path!r}; steering reads x̂_1 from an affine path "
                        "x_t = alpha_t x_1 + sigma_t x_0 with a Gaussian source (steerflow.paths.AffinePath)")
    return path


def same_path(a: AffinePath, b: AffinePath) -> bool:
    """Whether two affine paths have the same schedule (type and parameters)."""
    sa, sb = a.schedule, b.schedule
    return type(sa) is type(sb) and getattr(sa, "__dict__", {}) == getattr(sb, "__dict__", {})


def resolve_path(path: AffinePath | None, v: Any, *, who: str, carried: AffinePath | None = None) -> AffinePath:
    """The path a guidance reads x̂_1 from: the model's (``carried_path(v)``, else ``carried``, the path resolved at
    the start of the solve), else ``path``, else linear; a ``path`` that differs from the model's is an error."""
    model_path = carried_path(v)
    if model_path is None:
        model_path = carried
    if path is None:
        return model_path if model_path is not None else _LINEAR
    if model_path is not None and not same_path(model_path, path):
        raise ValueError(f"{who} was given path={path!r} but the model was trained with {model_path!r}; "
                         "x̂_1 and x̂_0 must be read from the model's own path")
    return path


FULL_WINDOW = (0.0, 1.0)
"""The default window of a guidance: all of ``[0, 1]``."""


def check_window(window: Any) -> tuple[float, float]:
    """Validate a guidance's ``window=(start, stop)``: two numbers with ``0 <= start < stop <= 1`` (t = 0 noise)."""
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__"):
        raise TypeError(f"window must be a pair (start, stop) of times in [0, 1], got {window!r}")
    if len(window) != 2:
        raise ValueError(f"window must be a pair (start, stop) of times in [0, 1], got {len(window)} values")
    for w in window:
        if isinstance(w, bool) or not (isinstance(w, numbers.Real) or torch.is_tensor(w) and w.numel() == 1):
            raise TypeError(f"window must hold two numbers (start, stop), got {window!r}")
    start, stop = float(window[0]), float(window[1])
    if not 0.0 <= start < stop <= 1.0:  # NaN fails every comparison
        raise ValueError(f"window must satisfy 0 <= start < stop <= 1 (t = 0 noise, t = 1 data), "
                         f"got ({start:g}, {stop:g})")
    return start, stop


def check_path(path: Any) -> AffinePath | None:
    """Validate a guidance's ``path=``: ``None``, a name (``"linear"``, ``"cosine"``, ...) or an affine path."""
    if path is None or isinstance(path, AffinePath):
        return path
    if isinstance(path, str):
        return get_path(path)
    raise TypeError(f"path must be an affine path (steerflow.paths.AffinePath) or its name, got {path!r}: "
                    "steering reads x̂_1 and x̂_0 from x_t = alpha_t x_1 + sigma_t x_0 with a Gaussian source")


class AbstractGuidance(ABC):
    """Base of all steering methods; every hook defaults to "no change" (and the range check)."""

    #: "update, then step" methods whose velocity is ``v + (x' − x) / dt`` need ``dt`` to be the solver's step
    fixed_step_only: bool = False
    #: a solve is stopped when ``max |x|`` exceeds this factor times its starting scale
    max_growth: float = 1e3
    #: where the method acts: ``start <= t < stop`` (``stop = 1`` includes ``t = 1``); ``window=`` of a constructor
    window: tuple[float, float] = FULL_WINDOW

    def acts_at(self, t: Tensor | float) -> bool:
        """Whether the method acts at time ``t`` (a float, or a batch of times (b,) with one common value)."""
        start, stop = self.window
        if start <= 0.0 and stop >= 1.0:  # the whole of [0, 1]: no need to read t (no device synchronisation)
            return True
        if torch.is_tensor(t):
            if t.numel() == 0:
                return True  # an empty batch: the method itself reports it
            t = t.reshape(-1)[0]
        s = float(t)
        return start <= s and (s < stop or stop >= 1.0)

    def check(self, v: Field | None = None, *, solver: Any = None) -> None:
        """Refuse, before integrating, a solver this method is not valid for (``sample`` calls it once)."""
        if self.fixed_step_only and _is_adaptive(solver):
            name = type(self).__name__
            raise ValueError(f"{name} moves the state and then takes the solver's step (v' = v + (x' − x) / dt), "
                             f"so it needs a fixed-step solver (euler, midpoint, heun, rk4); an adaptive solver "
                             f"({getattr(solver, 'name', solver)}) passes the whole grid interval as dt and "
                             f"{name}'s update would change meaning. Use method='euler' with more steps")

    def initial(self, v: Field, x: Tensor, ts: Tensor, *, generator: torch.Generator | None = None,
                cost: Cost | None = None) -> Tensor:
        self._watch(x)
        return x

    def velocity(self, v: Field, x: Tensor, t: Tensor, dt: Tensor, *, generator: torch.Generator | None = None,
                 cost: Cost | None = None) -> Tensor:
        """The velocity the loop integrates at a solver stage: :meth:`guided_velocity` inside the window, the base
        field ``v(x, t)`` outside it."""
        if not self.acts_at(t):
            return v(x, t)
        return self.guided_velocity(v, x, t, dt, generator=generator, cost=cost)

    def guided_velocity(self, v: Field, x: Tensor, t: Tensor, dt: Tensor, *,
                        generator: torch.Generator | None = None, cost: Cost | None = None) -> Tensor:
        """The method's velocity at a stage inside its window (this base: ``v(x, t)`` unchanged)."""
        return v(x, t)

    def after_step(self, v: Field, x: Tensor, t_next: Tensor, *, t: Tensor,
                   generator: torch.Generator | None = None, cost: Cost | None = None) -> Tensor:
        self._check_state(x, t_next, t=t)
        return x

    # --- the range check ----------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The settings that set the size of this method's moves (named in a divergence error)."""
        return {}

    def _watch(self, x: Tensor) -> None:
        """Start a solve: its scale is ``max(1, max |x|)`` (1: the standard-normal source)."""
        s = float(x.detach().abs().max()) if x.numel() else 0.0
        self._scale = max(1.0, s if math.isfinite(s) else 1.0)

    def _note_scale(self, s: float | Tensor) -> None:
        """Widen the scale of the solve by a data prediction or a measurement (e.g. ``max |x̂_1|`` at the start)."""
        s = float(s.detach().abs().max()) if torch.is_tensor(s) else abs(float(s))
        if math.isfinite(s):
            self._scale = max(getattr(self, "_scale", 1.0), s)

    def _check_state(self, x: Tensor, t_next: Tensor, *, t: Tensor | None = None) -> None:
        """Stop with one error naming the method and its step settings if ``x`` is non-finite or exploded."""
        if x.numel() == 0:
            return
        scale = getattr(self, "_scale", None)
        if scale is None:
            self._watch(x)
            scale = self._scale
        top = float(x.detach().abs().max())
        if math.isfinite(top) and top <= self.max_growth * scale:
            return
        step = ("" if t is None else f"{float(t.reshape(-1)[0]):.4g} → ") + f"{float(t_next.reshape(-1)[0]):.4g}"
        kv = ", ".join(f"{k}={val!r}" for k, val in self.settings().items())
        if not math.isfinite(top):
            what = f"the state became non-finite in the step t = {step}"
        else:
            what = (f"the state reached max |x| = {top:.3g} in the step t = {step}, over {self.max_growth:g} × the "
                    f"scale of the solve ({scale:.3g}: start state, first data prediction, measurement)")
        raise FloatingPointError(f"{type(self).__name__}({kv}) diverged: {what}. Its step is too large for this "
                                 "problem: lower it or take more grid steps")


class PathGuidance(AbstractGuidance):
    """A guidance that reads x̂_1 / x̂_0 from the path the model was trained with.

    Subclasses set ``self.path`` (``check_path(path)``) and call :meth:`_start_path` with the sampler's base field
    at the start of a solve; the path is resolved there once and :meth:`_path_for` hands it back at every step.
    """

    path: AffinePath | None = None

    def check(self, v: Field | None = None, *, solver: Any = None) -> None:
        super().check(v, solver=solver)
        if v is not None:
            resolve_path(self.path, v, who=type(self).__name__)  # refuses a path= that differs from the model's

    def _start_path(self, v: Field) -> None:
        """At the start of a solve: resolve the path once, for the sampler's base field ``v``."""
        self._base, self._solve_path = v, resolve_path(self.path, v, who=type(self).__name__)

    def _path_for(self, v: Field) -> AffinePath:
        """The path for ``v``: the one resolved at the start of the solve when ``v`` is its base field; otherwise
        (inside :class:`Compose`, another guidance's field; a direct call outside a solve) resolved from ``v``,
        with the solve's path standing in for a field that carries none."""
        if v is getattr(self, "_base", None):
            return self._solve_path
        return resolve_path(self.path, v, who=type(self).__name__, carried=getattr(self, "_solve_path", None))


class Compose(AbstractGuidance):
    """Apply several guidances in order: velocities are chained, corrections are applied in turn."""

    def __init__(self, *guidances: AbstractGuidance) -> None:
        self.guidances = guidances

    def initial(self, v, x, ts, *, generator=None, cost=None):
        for g in self.guidances:
            x = g.initial(v, x, ts, generator=generator, cost=cost)
        return x

    def velocity(self, v, x, t, dt, *, generator=None, cost=None):
        field = v
        for g in self.guidances:
            field = (lambda g_, f_: lambda x_, t_: g_.velocity(f_, x_, t_, dt, generator=generator, cost=cost))(g, field)
        return field(x, t)

    def after_step(self, v, x, t_next, *, t, generator=None, cost=None):
        for g in self.guidances:
            x = g.after_step(v, x, t_next, t=t, generator=generator, cost=cost)
        return x

    def check(self, v=None, *, solver=None):
        for g in self.guidances:
            if hasattr(g, "check"):
                g.check(v, solver=solver)
