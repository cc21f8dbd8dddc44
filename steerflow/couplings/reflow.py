"""The reflow coupling of Rectified Flow: pair noise with the endpoint a trained flow sends it to."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import AbstractCoupling


class ReflowCoupling(AbstractCoupling):
    """``(x_0, ψ_1(x_0))`` where ``ψ_1`` integrates a trained velocity ``v`` from ``t = 0`` to ``1``.

    Rectified Flow (Liu et al. 2022, "Flow straight and fast", §2.3): the k-th reflow trains on the
    coupling ``(Z_0, Z_1) = (x_0, ODE[v^{k-1}](x_0))``, which has the same marginals as the previous
    flow's and a transport cost that does not increase; its flows are straighter.

    The given ``x_1`` is **ignored** (only its shape is checked): the new target is generated from
    ``x_0``. ``x_0`` keeps its order. The solve runs under ``torch.no_grad()`` in chunks of
    ``batch_size`` to bound memory, with :func:`steerflow.solvers.sample`.

    Args:
        v: velocity field ``v(x, t)`` (or ``v(x, t, cond)``).
        steps, method: the solve (see :func:`steerflow.solvers.sample`).
        cond: a condition passed to ``v`` for every sample. Per-sample ``labels`` given at call time
            are passed instead (chunked with the batch); giving both is an error.
        batch_size: largest chunk integrated at once (``None``: the whole batch).
    """

    def __init__(self, v: Any, *, steps: int = 100, method: str = "euler", cond: Any = None,
                 batch_size: int | None = None) -> None:
        if not callable(v):
            raise TypeError(f"v must be a velocity field v(x, t), got {type(v).__name__}")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.v, self.steps, self.method, self.cond, self.batch_size = v, steps, method, cond, batch_size

    def __repr__(self) -> str:
        return f"ReflowCoupling(steps={self.steps}, method={self.method!r}, batch_size={self.batch_size})"

    def _couple(self, x_0: Tensor, x_1: Tensor, labels: Tensor | None, generator) -> tuple[Tensor, Tensor]:
        from ..solvers import sample

        if labels is not None and self.cond is not None:
            raise ValueError("ReflowCoupling got both a fixed cond and per-sample labels; give one")
        b = x_0.shape[0]
        chunk = self.batch_size or b
        outs = []
        with torch.no_grad():
            for s in range(0, b, chunk):
                cond = labels[s:s + chunk] if labels is not None else self.cond
                outs.append(sample(self.v, x_0[s:s + chunk], steps=self.steps, method=self.method,
                                   generator=generator, cond=cond))
        return x_0, torch.cat(outs).to(x_1.dtype)
