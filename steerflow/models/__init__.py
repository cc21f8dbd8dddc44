"""Velocity-field networks: MLPs for low-dimensional data, a small class-conditional U-Net.

Every model is ``forward(x, t, cond=None)`` with ``t`` of shape (b,), carries ``name`` and a JSON-able
``config``, and is rebuilt by ``build_model(name, **config)`` (the contract checkpoints rely on).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .base import (ACTIVATIONS, AbstractVelocityModel, LabelEmbedding, SinusoidalTimeEmbedding, get_activation)
from .mlp import EndpointMLP, MLPVelocity, SeluMLP
from .population import ConditionedVelocityMLP, PopulationVelocity, SetEncoder
from .potential import ICNN, PotentialMLP, PotentialVelocity, QuadraticPotential
from .unet import UNetVelocity, count_parameters

MODELS: dict[str, type[nn.Module]] = {"mlp": MLPVelocity, "mlp-endpoint": EndpointMLP, "mlp-selu": SeluMLP,
                                      "unet": UNetVelocity}


def build_model(name: str, **config: Any) -> nn.Module:
    """Construct the registered model ``name`` from its ``config`` (``build_model(m.name, **m.config)``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    try:
        return MODELS[name](**config)
    except TypeError as e:
        raise TypeError(f"bad config for model {name!r}: {e}") from e


def model_name(model: nn.Module) -> str | None:
    """Registry name of ``model`` (unwrapping DistributedDataParallel / compiled modules), or None."""
    model = unwrap_model(model)
    name = getattr(model, "name", None)
    if isinstance(name, str) and MODELS.get(name) is type(model):
        return name
    for key, cls in MODELS.items():
        if type(model) is cls:
            return key
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under ``DistributedDataParallel(.module)`` / ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


__all__ = ["MODELS", "build_model", "model_name", "unwrap_model", "count_parameters", "AbstractVelocityModel",
           "MLPVelocity", "EndpointMLP", "SeluMLP", "UNetVelocity", "SinusoidalTimeEmbedding", "LabelEmbedding",
           "ACTIVATIONS", "get_activation", "ConditionedVelocityMLP", "PopulationVelocity", "SetEncoder", "ICNN",
           "PotentialMLP", "PotentialVelocity", "QuadraticPotential"]

