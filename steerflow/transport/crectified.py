"""c-rectified flow: rectification for a convex cost ``c`` (Liu 2022, "Rectified Flow: A Marginal
Preserving Approach to Optimal Transport", §3, Algorithm 1).

Given a coupling ``(X_0, X_1)`` and ``X_t = t X_1 + (1 - t) X_0``, the c-rectified flow restricts the
velocity to the *c-conservative* form ``v(x, t) = ∇c*(∇f(x, t))`` for a scalar potential ``f`` and fits it by

    min_f  ∫_0^1 E[ c*(∇f(X_t, t)) - ⟨X_1 - X_0, ∇f(X_t, t)⟩ + c(X_1 - X_0) ] dt        (Liu 2022, eq. 9)

(a Fenchel–Young gap, ``≥ 0`` and ``= 0`` iff ``∇c*(∇f) = X_1 - X_0``; for ``c = ½|·|²`` it is
``½ E|∇f - (X_1 - X_0)|²``). The new coupling ``(X_0, Z_1)`` with ``Z_1`` the flow of ``v`` from ``X_0``
keeps both marginals and does not increase ``E c(X_1 - X_0)`` (Liu 2022, Theorem 3.3); iterating the
rectification reaches a c-optimal coupling at its fixed points (Theorem 3.4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .._types import expand_t
from ..models.potential import PotentialVelocity
from ..solvers.sample import sample
from ..training import train
from ..training.loss import AbstractTrainingLoss
from ..training.pairs import Batch, seed_from
from .costs import AbstractConvexCost, get_cost


def c_conservative_velocity(potential: nn.Module, cost: str | AbstractConvexCost = "quadratic") -> PotentialVelocity:
    """``v(x, t) = ∇c*(∇_x f(x, t))`` as a velocity model (Liu 2022, eq. 8)."""
    cost = get_cost(cost)
    return PotentialVelocity(potential, link=None if cost.name == "quadratic" else cost.grad_conjugate)


def c_rectification_loss(model: PotentialVelocity, x_0: Tensor, x_1: Tensor, t: Tensor,
                         cost: str | AbstractConvexCost = "quadratic") -> Tensor:
    """The c-rectification objective (scalar) on a batch of pairs ``x_0, x_1`` (b, *d) at times ``t`` (b,).

    ``E[c*(∇f(x_t, t)) - ⟨x_1 - x_0, ∇f(x_t, t)⟩ + c(x_1 - x_0)]`` with ``x_t = t x_1 + (1 - t) x_0``.
    """
    cost = get_cost(cost)
    if x_0.shape != x_1.shape:
        raise ValueError(f"x_0 and x_1 must have the same shape, got {tuple(x_0.shape)} and {tuple(x_1.shape)}")
    if t.shape != (x_0.shape[0],):
        raise ValueError(f"t must have shape ({x_0.shape[0]},), got {tuple(t.shape)}")
    z = x_1 - x_0
    x_t = x_0 + expand_t(t, x_0) * z
    g = model.gradient(x_t, t)
    inner = (g * z).reshape(z.shape[0], -1).sum(-1)
    return (cost.conjugate(g) - inner + cost(z)).mean()


@dataclass(frozen=True)
class CRectificationLoss(AbstractTrainingLoss):
    """:func:`c_rectification_loss` on a batch of pairs with ``t ~ U[0, 1]``, as a training loss."""

    cost: str | AbstractConvexCost = "quadratic"

    def __call__(self, model: Any, batch: Batch, generator: torch.Generator) -> Tensor:
        x_0 = batch.x_0
        t = torch.rand(x_0.shape[0], generator=generator, device=x_0.device, dtype=x_0.dtype)
        return c_rectification_loss(model, x_0, batch.x_1, t, self.cost)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def fit_c_rectified(potential: nn.Module, x_0: Tensor, x_1: Tensor, cost: str | AbstractConvexCost = "quadratic", *,
                    steps: int = 2000, batch_size: int = 256, lr: float = 1e-3,
                    generator: torch.Generator | None = None, log: list | None = None) -> PotentialVelocity:
    """Fit the c-conservative field ``∇c*(∇f)`` to the pairs ``(x_0, x_1)`` (n, *d) by :func:`~steerflow.training.train`
    (Adam, cosine learning rate from ``lr`` down to ``lr / 10``), minibatches of ``min(batch_size, n)`` pairs.

    Returns the trained :class:`PotentialVelocity` (in eval mode). ``log`` (a list), when given, receives the
    loss of every step. ``generator`` seeds the run (one draw; torch's global RNG when None).
    """
    if x_0.shape != x_1.shape or x_0.ndim < 2:
        raise ValueError(f"x_0 and x_1 must be paired batches (n, *d), got {tuple(x_0.shape)} and {tuple(x_1.shape)}")
    if not isinstance(steps, int) or steps < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive integers, got {steps!r}, {batch_size!r}")
    cost = get_cost(cost)
    model = c_conservative_velocity(potential, cost)
    res = train(model, (x_0, x_1), loss=CRectificationLoss(cost), steps=steps, batch_size=min(batch_size, x_0.shape[0]),
                lr=lr, lr_schedule="cosine", lr_floor=0.1, seed=seed_from(generator), device=_device_of(model),
                progress=False, distributed=False)
    if log is not None:
        log.extend(res.losses.tolist())
    model.eval()
    return model


@dataclass(frozen=True)
class RectificationRound:
    """Statistics of one coupling: ``round`` (0 = the input coupling), ``transport_cost = E c(x_1 - x_0)``,
    and the final training ``loss`` of the field fitted to it (``nan`` for the last coupling)."""

    round: int
    transport_cost: float
    loss: float


@dataclass(frozen=True)
class CRectifiedFlow:
    """Result of :func:`c_rectified_flow`: the fitted fields (one per round), per-round statistics, and the
    final coupling ``(x_0, x_1)``."""

    models: tuple[PotentialVelocity, ...]
    rounds: tuple[RectificationRound, ...]
    x_0: Tensor
    x_1: Tensor


def c_rectified_flow(x_0: Tensor, x_1: Tensor, make_potential: Callable[[], nn.Module],
                     cost: str | AbstractConvexCost = "quadratic", *, rounds: int = 3, steps: int = 2000,
                     batch_size: int = 256, lr: float = 1e-3, ode_steps: int = 32, method: str = "rk4",
                     generator: torch.Generator | None = None,
                     callback: Callable[[int, PotentialVelocity, Tensor, Tensor], None] | None = None) -> CRectifiedFlow:
    """Iterate c-rectification (Liu 2022, Algorithm 1) ``rounds`` times starting from the pairs ``(x_0, x_1)``.

    Round ``k`` fits ``v_k = ∇c*(∇f_k)`` (a fresh ``make_potential()``) to the current pairs, then re-pairs
    ``x_1 ← ODE_{v_k}(x_0)``. ``callback(k, model, x_0, new_x_1)`` runs after each round (for evaluation).
    """
    cost = get_cost(cost)
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    stats, models = [], []
    cur = x_1
    for k in range(rounds):
        log: list[float] = []
        model = fit_c_rectified(make_potential(), x_0, cur, cost, steps=steps, batch_size=batch_size, lr=lr,
                                generator=generator, log=log)
        tail = log[-max(1, len(log) // 10):]
        stats.append(RectificationRound(k, float(cost(cur - x_0).mean()), sum(tail) / len(tail)))
        with torch.no_grad():
            new = torch.cat([sample(model, x_0[i:i + 4096], steps=ode_steps, method=method)
                             for i in range(0, x_0.shape[0], 4096)])
        if callback is not None:
            callback(k, model, x_0, new)
        models.append(model)
        cur = new
    stats.append(RectificationRound(rounds, float(cost(cur - x_0).mean()), float("nan")))
    return CRectifiedFlow(models=tuple(models), rounds=tuple(stats), x_0=x_0, x_1=cur)
