"""Time grids: where the solver steps. Increasing grids generate (noise → data), decreasing invert."""
from __future__ import annotations

import torch
from torch import Tensor


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def uniform_grid(steps: int, t0: float = 0.0, t1: float = 1.0, *, dtype=torch.float64) -> Tensor:
    """``steps + 1`` equally spaced times from ``t0`` to ``t1``."""
    _check_steps(steps)
    return torch.linspace(t0, t1, steps + 1, dtype=dtype)


def shifted_grid(steps: int, shift: float = 3.0, *, dtype=torch.float64) -> Tensor:
    """SD3-style time-shifted grid (Esser et al. 2024, eq. 23), written for ``t = 1`` data.

    In the noise level ``sigma = 1 - t``: ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``; a shift
    above 1 spends more steps near the noise end, where high-resolution images need them.
    """
    _check_steps(steps)
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    sigma = torch.linspace(1.0, 0.0, steps + 1, dtype=dtype)
    sigma = shift * sigma / (1 + (shift - 1) * sigma)
    return 1 - sigma


def power_grid(steps: int, rho: float = 2.0, *, dtype=torch.float64) -> Tensor:
    """``t_i = 1 - (1 - i / steps)^rho``: denser near the data end for ``rho > 1``."""
    _check_steps(steps)
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=dtype)
    return 1 - (1 - u) ** rho


GRIDS = {"uniform": uniform_grid, "shifted": shifted_grid, "power": power_grid}


def check_grid(ts: Tensor) -> Tensor:
    """Validate a time grid: 1-D, at least 2 points, strictly monotone, finite."""
    if not torch.is_tensor(ts):
        ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"a time grid must be 1-D with at least 2 points, got shape {tuple(ts.shape)}")
    if not torch.isfinite(ts).all():
        raise ValueError("the time grid holds non-finite values")
    d = ts[1:] - ts[:-1]
    if not ((d > 0).all() or (d < 0).all()):
        raise ValueError("the time grid must be strictly increasing (generation) or strictly decreasing (inversion)")
    return ts
