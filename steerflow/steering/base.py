"""The contract between the one sampler loop and every steering method.

A guidance is never a sampler of its own. ``steerflow.sample(v, x_0, guidance=g)`` calls, for each
grid interval ``[t, t + dt]``:

1. once before the loop, ``g.initial(v, x_0, ts, generator=, cost=) -> x_0'`` (e.g. D-Flow optimises the
   start noise through whole solves);
2. at every solver stage, ``g.velocity(v, x, t, dt, generator=, cost=) -> v'`` in place of ``v(x, t)``
   (DPS, FlowChef, classifier-free guidance, EnKG, OT-ODE, ...);
3. after the step, ``g.after_step(v, x_next, t_next, t=, generator=, cost=) -> x_next'`` (DDS's
   conjugate-gradient data consistency, PnP-Flow's projection, ...).

``v`` is the counted base field ``v(x, t)`` with ``t`` of shape ``(b,)``; ``cost`` is the
:class:`~steerflow.metrics.cost.Cost` of the solve, where methods add their VJPs and operator calls.
"""
from __future__ import annotations

from abc import ABC
from typing import Callable

import torch
from torch import Tensor

from ..metrics.cost import Cost

Field = Callable[[Tensor, Tensor], Tensor]


class AbstractGuidance(ABC):
    """Base of all steering methods; every hook defaults to "no change"."""

    def initial(self, v: Field, x: Tensor, ts: Tensor, *, generator: torch.Generator | None = None,
                cost: Cost | None = None) -> Tensor:
        return x

    def velocity(self, v: Field, x: Tensor, t: Tensor, dt: Tensor, *, generator: torch.Generator | None = None,
                 cost: Cost | None = None) -> Tensor:
        return v(x, t)

    def after_step(self, v: Field, x: Tensor, t_next: Tensor, *, t: Tensor,
                   generator: torch.Generator | None = None, cost: Cost | None = None) -> Tensor:
        return x


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
