"""The small regression loop shared by reflow (flow matching on fixed pairs) and distillation.

Both straightening steps train on a *fixed* finite set of pairs ``(x_0, x_1)``, so they need neither a
data loader nor a coupling: a minibatch is a random index set into the pair tensors. The loss is
supplied as ``loss_fn(model, x_0, x_1, generator) -> scalar``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class FitResult:
    """What a fit did: per-step losses, the number of steps, wall-clock seconds."""

    losses: tuple[float, ...]
    steps: int
    seconds: float

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 10% of steps (the noisy last step alone says little)."""
        k = max(1, len(self.losses) // 10)
        return float(sum(self.losses[-k:]) / k)


LossFn = Callable[[nn.Module, Tensor, Tensor, torch.Generator], Tensor]


def check_fit_args(steps: int, batch_size: int, lr: float) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")


def fit_pairs(model: nn.Module, x_0: Tensor, x_1: Tensor, loss_fn: LossFn, *, steps: int, batch_size: int,
              lr: float, generator: torch.Generator, cosine: bool = True, grad_clip: float | None = 1.0,
              progress: bool = False, what: str = "fit") -> FitResult:
    """Minimise ``loss_fn`` over minibatches of the fixed pairs ``x_0, x_1`` (n, *d) with Adam.

    ``cosine`` anneals the learning rate to 0 (a fixed pair set is a finite regression problem; the
    annealing removes the minibatch noise floor at the end). A non-finite loss stops with the step number.
    """
    check_fit_args(steps, batch_size, lr)
    if x_0.shape != x_1.shape:
        raise ValueError(f"x_0 and x_1 must have the same shape, got {tuple(x_0.shape)} and {tuple(x_1.shape)}")
    n = x_0.shape[0]
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if cosine else None
    losses: list[float] = []
    model.train()
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=what, unit="step", leave=False)
    t0 = time.perf_counter()
    for step in it:
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        loss = loss_fn(model, x_0[idx].to(device), x_1[idx].to(device), generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{what}: non-finite loss at step {step + 1}/{steps}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return FitResult(losses=tuple(losses), steps=steps, seconds=time.perf_counter() - t0)
