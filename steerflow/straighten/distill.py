"""Distillation of a (rectified) flow into a one-step generator (Liu et al. 2022, §2.3; InstaFlow, Liu et al. 2024).

On the deterministic pairs ``(x_0, x_1 = ODE_v(x_0))`` of a flow, fit a one-step map
``T_θ(x_0) = x_0 + v_θ(x_0, 0)`` by regression:

    min_θ  E_{x_0 ~ π_0} || x_0 + v_θ(x_0, 0) - x_1 ||²                      (L2; InstaFlow uses LPIPS)

so that one Euler step of ``v_θ`` from ``t = 0`` reproduces the ODE's end point. The student keeps the
velocity network's signature ``v_θ(x, t)``, so it is saved and loaded like any flow and sampled with
``sample(v_θ, x_0, steps=1, method="euler")``. Distilling the straight 2-RF rather than 1-RF is what makes
this work: the 2-RF map is nearly affine along each path, and its pairs are what the student can fit.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._fit import FitResult, check_fit_args, fit_pairs
from .reflow import Pairs, generate_pairs

__all__ = ["DistillResult", "OneStep", "one_step", "one_step_loss", "distill"]


@dataclass(frozen=True)
class DistillResult:
    """The student ``model`` (a velocity network: ``x_1 = x_0 + model(x_0, 0)``), its ``pairs`` and ``fit``."""

    model: nn.Module
    pairs: Pairs
    fit: FitResult

    @property
    def generator(self) -> "OneStep":
        return OneStep(self.model)


class OneStep(nn.Module):
    """The one-step generator ``T(x_0) = x_0 + v(x_0, 0)`` of a distilled velocity network ``v``."""

    def __init__(self, v: nn.Module) -> None:
        super().__init__()
        self.v = v

    def forward(self, x_0: Tensor) -> Tensor:
        return one_step(self.v, x_0)


def one_step(v: Callable[..., Tensor], x_0: Tensor) -> Tensor:
    """``x_0 + v(x_0, 0)`` (b, *d): one Euler step of size 1 from ``t = 0``."""
    return x_0 + v(x_0, torch.zeros(x_0.shape[0], dtype=x_0.dtype, device=x_0.device))


def one_step_loss(model: nn.Module, x_0: Tensor, x_1: Tensor, generator: torch.Generator) -> Tensor:
    """``|| x_0 + v_θ(x_0, 0) - x_1 ||²`` averaged over batch and dimensions."""
    return ((one_step(model, x_0) - x_1) ** 2).mean()


def distill(v_or_model: Callable[..., Tensor] | None = None, *, pairs: Pairs | None = None, source: Any = None,
            n_pairs: int = 20000, steps: int | None = None, method: str = "dopri5", train_steps: int = 5000,
            batch_size: int = 256, lr: float = 1e-3, model: nn.Module | None = None,
            shape: tuple[int, ...] | None = None, generator: torch.Generator | None = None,
            seed: int | None = None, cosine: bool = True, progress: bool = False) -> DistillResult:
    """Distil a flow into a one-step generator by L2 regression on its ODE pairs.

    Args:
        v_or_model: the teacher flow (ideally a 2-RF); used to generate ``pairs`` when those are not given,
            and copied as the student's initialisation when ``model`` is not given.
        pairs: precomputed :class:`Pairs` (e.g. ``reflow(...).pairs``, the pairs the 2-RF was trained on);
            otherwise ``n_pairs`` pairs are generated from ``v_or_model`` and ``source`` with
            ``steps``/``method``.
        train_steps, batch_size, lr: Adam on the pairs (cosine-annealed when ``cosine``).
        model: the student network ``v_θ(x, t)`` (default: a copy of the teacher).
        generator / seed: all randomness.

    Returns:
        :class:`DistillResult`; sample with ``one_step(result.model, x_0)``.
    """
    check_fit_args(train_steps, batch_size, lr)
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    if pairs is None:
        if v_or_model is None or source is None:
            raise ValueError("distill needs pairs=, or a teacher flow and source= to generate them")
        pairs = generate_pairs(v_or_model, source, n_pairs, steps=steps, method=method, generator=generator,
                               shape=shape)
    elif not isinstance(pairs, Pairs):
        raise TypeError(f"pairs must be a Pairs, got {type(pairs).__name__}")
    if model is None:
        if not isinstance(v_or_model, nn.Module):
            raise TypeError("distill needs model= (the student network) when the teacher is not an nn.Module")
        model = copy.deepcopy(v_or_model)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    fit = fit_pairs(model, pairs.x_0, pairs.x_1, one_step_loss, steps=train_steps, batch_size=batch_size, lr=lr,
                    generator=generator, cosine=cosine, progress=progress, what="distill")
    return DistillResult(model=model.eval(), pairs=pairs, fit=fit)
