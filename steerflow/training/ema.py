"""Exponential moving average of model weights (Polyak & Juditsky 1992; used by DDPM, EDM, Karras et al.)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``θ̄ ← β θ̄ + (1 − β) θ`` after every optimiser step, on a detached copy of the model.

    Buffers (e.g. normalisation statistics) are copied, not averaged. With a constant ``β`` and weights
    ``θ_1 … θ_n`` from an initial ``θ̄_0``: ``θ̄_n = β^n θ̄_0 + (1 − β) Σ_k β^(n−k) θ_k``.

    ``warmup=True`` (default) uses ``β_n = min(β, (1 + n) / (10 + n))`` at update ``n`` (counted from 0),
    so a short run's average is not dominated by the random initialisation (with ``β = 0.999`` the
    plain average still holds 74% of the initial weights after 300 steps).
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._src = [p.detach() for p in model.parameters()]  # views: follow in-place updates
        self._dst = [p for p in self.module.parameters()]
        self._src_buf = [b for b in model.buffers()]
        self._dst_buf = [b for b in self.module.buffers()]
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step toward the live weights of the model given at construction."""
        if self._dst:
            torch._foreach_lerp_(self._dst, self._src, 1.0 - self.current_decay())
        for d, s in zip(self._dst_buf, self._src_buf):
            d.copy_(s)
        self.num_updates += 1

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
