"""Time grids: where the solver steps. Increasing grids generate (noise → data), decreasing invert."""
from __future__ import annotations

import math

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

    This is the paper's formula on a uniform grid, *not* the grid diffusers' ``FlowMatchEulerDiscreteScheduler``
    integrates (that one starts from a different base spacing and ends with a jump to ``sigma = 0``): for a
    diffusers model use :func:`flow_match_grid` or :meth:`steerflow.adapters.FlowPipeline.time_grid`.
    """
    _check_steps(steps)
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    sigma = torch.linspace(1.0, 0.0, steps + 1, dtype=dtype)
    sigma = shift * sigma / (1 + (shift - 1) * sigma)
    return 1 - sigma


def flow_match_grid(steps: int, shift: float = 1.0, *, mu: float | None = None, spacing: str = "sd3",
                    num_train_timesteps: int = 1000, dtype=torch.float64) -> Tensor:
    """The grid ``1 − σ`` of diffusers' ``FlowMatchEulerDiscreteScheduler`` (default options), without diffusers.

    Base noise levels: ``spacing="sd3"`` — ``σ = linspace(1, σ_min, steps)`` with ``σ_min`` the scheduler's
    smallest training level (``1/N``, shifted when the shift is static; ``N = num_train_timesteps``);
    ``spacing="flux"`` — ``σ = linspace(1, 1/steps, steps)`` (what ``FluxPipeline`` passes). Then the static
    shift ``shift σ / (1 + (shift − 1) σ)``, or with ``mu`` the resolution-dependent one
    ``e^μ / (e^μ + 1/σ − 1)``, and a last step to ``σ = 0``. Matches the scheduler to float32 rounding
    (``tests/test_adapters.py``).
    """
    _check_steps(steps)
    if spacing not in ("sd3", "flux"):
        raise ValueError(f"unknown spacing {spacing!r}; expected 'sd3' or 'flux'")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")

    def shifted(s):
        if mu is not None:
            return math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        return shift * s / (1 + (shift - 1) * s)

    if spacing == "flux":
        base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    else:
        s_min = 1.0 / num_train_timesteps
        s_min = s_min if mu is not None else shifted(s_min)
        base = torch.linspace(1.0, s_min, steps, dtype=torch.float64)
    sigma = torch.cat([shifted(base), torch.zeros(1, dtype=torch.float64)])
    return (1 - sigma).to(dtype)


def power_grid(steps: int, rho: float = 2.0, *, dtype=torch.float64) -> Tensor:
    """``t_i = 1 - (1 - i / steps)^rho``: denser near the data end for ``rho > 1``."""
    _check_steps(steps)
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=dtype)
    return 1 - (1 - u) ** rho


GRIDS = {"uniform": uniform_grid, "shifted": shifted_grid, "power": power_grid, "flow_match": flow_match_grid}


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
