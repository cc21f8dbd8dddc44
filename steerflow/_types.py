"""Shape aliases used in docstrings and signatures across steerflow.

Conventions (see README, "Time convention"): ``t`` in ``[0, 1]``; ``t = 0`` is the source (noise),
``t = 1`` is the data. A velocity field is any callable ``v(x, t) -> Tensor`` with ``x`` of shape
``(b, *d)`` and ``t`` of shape ``(b,)``.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

Batch = Tensor
"""A batch of states, shape ``(b, *d)``."""
Time = Tensor
"""Per-sample times, shape ``(b,)``."""
Grid = Tensor
"""A monotone time grid, shape ``(n + 1,)``; increasing for generation, decreasing for inversion."""

VelocityField = Callable[[Tensor, Tensor], Tensor]


class ConditionalVelocity(Protocol):
    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor: ...


def expand_t(t: Tensor | float, x: Tensor) -> Tensor:
    """Return ``t`` broadcastable against ``x``: shape ``(b, 1, ..., 1)``."""
    if not torch.is_tensor(t):
        t = torch.tensor(float(t), dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(dtype=x.dtype)


def batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Return ``t`` as a ``(b,)`` tensor matching ``x``'s batch, dtype and device."""
    if not torch.is_tensor(t):
        t = torch.tensor(float(t))
    t = t.to(dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def check_batch(x: Tensor, name: str, *, finite: bool = True) -> None:
    """Refuse anything but a floating-point tensor of shape ``(b, *d)`` (finite unless ``finite=False``)."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (b, *d) with a batch dimension, got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sample, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if finite and not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf")


def check_finite(x: Tensor, what: str) -> None:
    """Raise a ``FloatingPointError`` naming ``what`` when ``x`` holds NaN or inf."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"non-finite values in {what}")
