"""Optimal transport within each label or condition (class-conditional minibatch OT)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import AbstractIndexCoupling, _random_device
from .exact import ExactOT


class ConditionalOT(AbstractIndexCoupling):
    """Pair ``x_0`` with ``x_1`` only inside each condition group, by a base OT coupling.

    Semantics. ``labels`` (b,) or (b, *k) are the conditions of ``x_1`` (classes, or any per-sample
    condition tensor; equal rows form a group). The source batch ``x_0`` is drawn *unlabelled* and
    independently of the condition, so it is first split into groups with the same counts as the labels
    by a **uniformly random** partition drawn with the generator (independent of the values of ``x_0``),
    and then each group ``G_c`` is coupled by ``base`` (exact OT by default):

        σ|_{G_c} = base(x_0[S_c], x_1[G_c]),   |S_c| = |G_c|,  S_c a random subset of the batch.

    The partition is random rather than optimal on purpose: choosing it by transport cost would make the
    source law depend on the condition, while a conditional flow ``v(x, t, c)`` is trained to start
    from ``x_0 ~ N(0, I)`` for every ``c``. Each ``x_0`` is used exactly once; ``x_1`` and ``labels``
    keep their order. Without labels this is ``base`` on the whole batch.
    """

    def __init__(self, base: AbstractIndexCoupling | None = None) -> None:
        base = ExactOT() if base is None else base
        if not isinstance(base, AbstractIndexCoupling):
            raise TypeError(f"base must be an index coupling (ExactOT, Sinkhorn, Independent), got {type(base).__name__}")
        self.base = base

    def __repr__(self) -> str:
        return f"ConditionalOT(base={self.base!r})"

    def _indices(self, x_0: Tensor, x_1: Tensor, labels: Tensor | None, generator) -> Tensor:
        if labels is None:
            return self.base._indices(x_0, x_1, None, generator)
        b = x_0.shape[0]
        flat = labels.reshape(b, -1) if labels.ndim > 1 else labels
        _, group = torch.unique(flat.to(x_1.device), dim=0 if labels.ndim > 1 else None, return_inverse=True)
        # a uniformly random source subset per group, with the groups' sizes
        src = torch.randperm(b, generator=generator, device=_random_device(generator, x_0.device)).to(x_0.device)
        order = torch.argsort(group, stable=True)  # targets grouped by condition
        counts = torch.bincount(group).tolist()
        sigma = torch.empty(b, dtype=torch.long, device=x_0.device)
        start = 0
        for c in counts:
            tgt = order[start:start + c]
            s = src[start:start + c]
            local = self.base._indices(x_0[s], x_1[tgt], None, generator)
            sigma[tgt] = s[local]
            start += c
        return sigma
