"""Velocity-field networks: MLPs for low-dimensional data, a small class-conditional U-Net, potentials,
population fields, and a wrapper for networks of your own.

Every model is ``forward(x, t, cond=None)`` with ``t`` of shape (b,), carries ``name`` and a JSON-able
``config``, is rebuilt by ``build_model(name, **config)``, and saves and loads as a folder
(``model.save_pretrained(dir)``, ``from_pretrained(dir)``; see :mod:`steerflow.models.pretrained`).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .base import (ACTIVATIONS, AbstractVelocityModel, LabelEmbedding, SinusoidalTimeEmbedding, get_activation)
from .external import ExternalVelocity
from .mlp import EndpointMLP, MLPVelocity, SeluMLP
from .onestep import OneStep, one_step
from .population import ConditionedVelocityMLP, PopulationVelocity, SetEncoder
from .potential import ICNN, PotentialMLP, PotentialVelocity, QuadraticPotential
from .pretrained import (DEFINED_ELSEWHERE, REGISTRY, PretrainedMixin, build_from_spec, from_pretrained, lookup_class,
                         model_spec, registered_name, save_pretrained, spec_or_none, unwrap_model)
from .unet import UNetVelocity, count_parameters

MODELS: dict[str, type[nn.Module]] = REGISTRY
"""Every registered model class by name (the velocity networks ``mlp``, ``mlp-endpoint``, ``mlp-selu``, ``unet``,
the potentials, population fields, ``one-step``, ``external``; ``tangent`` once :mod:`steerflow.manifolds` is
imported)."""


def build_model(name: str, **config: Any) -> nn.Module:
    """Construct the registered model ``name`` from its ``config`` (``build_model(m.name, **m.config)``); child
    models in ``config`` are given as ``{"class", "config"}`` specs."""
    if name not in REGISTRY and name not in DEFINED_ELSEWHERE:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(REGISTRY)}")
    cls = lookup_class(name, "build_model")
    try:
        return cls.from_config(config)
    except TypeError as e:
        raise TypeError(f"bad config for model {name!r}: {e}") from e


def model_name(model: nn.Module) -> str | None:
    """Registry name of ``model`` (unwrapping DistributedDataParallel / compiled modules), or None."""
    return registered_name(unwrap_model(model))


__all__ = ["MODELS", "build_model", "model_name", "unwrap_model", "count_parameters", "AbstractVelocityModel",
           "MLPVelocity", "EndpointMLP", "SeluMLP", "UNetVelocity", "SinusoidalTimeEmbedding", "LabelEmbedding",
           "ACTIVATIONS", "get_activation", "ConditionedVelocityMLP", "PopulationVelocity", "SetEncoder", "ICNN",
           "PotentialMLP", "PotentialVelocity", "QuadraticPotential", "ExternalVelocity", "OneStep", "one_step",
           "PretrainedMixin",
           "save_pretrained", "from_pretrained", "model_spec", "spec_or_none", "build_from_spec"]
