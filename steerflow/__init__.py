"""steerflow: train, straighten, sample and steer flow-matching / rectified-flow models.

Time convention everywhere: ``t ∈ [0, 1]``, ``t = 0`` is the source (noise), ``t = 1`` the data.
"""
from __future__ import annotations

import importlib

from .metrics.cost import Cost
from .paths import AffinePath, LinearPath, PathSample, get_path
from .solvers import Trajectory, flow_match_grid, log_likelihood, sample, shifted_grid, uniform_grid

__version__ = "0.1.0"

_SUBPACKAGES = ("paths", "couplings", "models", "solvers", "steering", "manifolds", "data", "metrics",
                "training", "straighten", "transport", "adapters", "cli", "plotting")
"""Subpackages (and the ``plotting`` module) imported on first attribute access: ``steerflow.straighten``."""


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'steerflow' has no attribute {name!r}")


__all__ = ["Cost", "AffinePath", "LinearPath", "PathSample", "get_path", "Trajectory", "log_likelihood",
           "sample", "flow_match_grid", "shifted_grid", "uniform_grid", "__version__"]
