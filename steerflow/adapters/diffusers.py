"""Convert diffusers' flow-matching convention to steerflow's, in this one place.

diffusers' flow schedulers (``FlowMatchEulerDiscreteScheduler``, SD3, Flux) use the noise level
``sigma = 1 - t``: ``x_sigma = (1 - sigma) x_data + sigma ε``, and the network predicts
``dx/dsigma = ε - x_data`` at ``timestep = sigma * num_train_timesteps``. steerflow integrates
``dx/dt`` with ``t = 0`` noise and ``t = 1`` data, so

    v(x, t) = -model(x, timestep=(1 - t) * num_train_timesteps),   ts = 1 - scheduler.sigmas.

With these two conversions ``steerflow.sample(v, noise, ts=ts, method="euler")`` reproduces the
scheduler's Euler loop step for step (pinned by ``tests/test_adapters.py``), and every steerflow
solver and steering method applies to a diffusers model unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

DiffusersModelFn = Callable[[Tensor, Tensor], Tensor]
"""``model(x, timestep) -> ε - x_data`` with ``timestep = sigma * num_train_timesteps`` of shape (b,)."""


def velocity_from_diffusers(model: DiffusersModelFn, *, num_train_timesteps: float = 1000.0):
    """Return ``v(x, t)`` in steerflow's convention from a diffusers-convention predictor."""

    def v(x: Tensor, t: Tensor) -> Tensor:
        return -model(x, (1 - t) * num_train_timesteps)

    return v


def diffusers_from_velocity(v: Callable[[Tensor, Tensor], Tensor], *, num_train_timesteps: float = 1000.0):
    """Inverse of :func:`velocity_from_diffusers`: expose a steerflow field to diffusers' loops."""

    def model(x: Tensor, timestep: Tensor) -> Tensor:
        timestep = torch.as_tensor(timestep, dtype=x.dtype, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(x.shape[0])
        return -v(x, 1 - timestep / num_train_timesteps)

    return model


def grid_from_scheduler(scheduler: Any) -> Tensor:
    """steerflow time grid ``1 - sigmas`` (increasing, float64) of a diffusers flow scheduler after
    ``scheduler.set_timesteps(n)``."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or len(sigmas) < 2:
        raise ValueError("the scheduler has no sigmas: call scheduler.set_timesteps(n) first "
                         "(a diffusers flow-matching scheduler is expected)")
    return 1 - torch.as_tensor(sigmas, dtype=torch.float64)


class DiffusersTransformerVelocity:
    """Wrap a bare diffusers transformer (e.g. ``SD3Transformer2DModel``) as a steerflow velocity field.

    ``conditioning`` (``encoder_hidden_states``, ``pooled_projections``, ...) is passed through on every
    call; the output's ``.sample`` is negated as in :func:`velocity_from_diffusers`. ``num_train_timesteps``
    is the scale of the ``timestep`` input: 1000 for SD3-style transformers, 1 for Flux (which takes ``σ`` and
    scales it itself); ``None`` picks it from the transformer's class. ``v(x, t, cond)`` with a dict ``cond``
    overrides the conditioning for that call (what :class:`~steerflow.steering.ClassifierFreeGuidance` passes).

    For a whole pipeline (prompts, CFG, Flux packing, the scheduler's grid, the VAE) use
    :class:`steerflow.adapters.FlowPipeline` instead.
    """

    def __init__(self, transformer: Any, *, num_train_timesteps: float | None = None, **conditioning: Any) -> None:
        if num_train_timesteps is None:
            num_train_timesteps = 1.0 if type(transformer).__name__.startswith("Flux") else 1000.0
        self.transformer, self.num_train_timesteps, self.conditioning = transformer, num_train_timesteps, conditioning

    def __call__(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        if cond is not None and not isinstance(cond, dict):
            raise TypeError(f"cond must be a dict of conditioning keyword arguments, got {type(cond).__name__}")
        kwargs = dict(self.conditioning, **(cond or {}))
        out = self.transformer(hidden_states=x, timestep=(1 - t) * self.num_train_timesteps, **kwargs)
        out = getattr(out, "sample", out[0] if isinstance(out, (tuple, list)) else out)
        return -out
