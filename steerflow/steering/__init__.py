"""Steering: training-free control of trained flows through the one sampler loop.

Every method is an :class:`AbstractGuidance` passed as ``steerflow.sample(v, x_0, guidance=...)``;
operators describe measurements ``y = A(x) + noise`` with the noise model kept apart from ``A``.

Layout: :mod:`.base` (the contract with the loop, the time window), :mod:`.methods` (one module per published
method), :mod:`.default` (steerflow's own method), :mod:`.registry` (methods by name), :mod:`.tasks` (inverse
tasks and methods by name, as the CLI and the benchmarks build them), :mod:`.operators`, :mod:`.cfg`,
:mod:`.inversion`; :mod:`.guidance` re-exports the methods under their first address.
"""
from ._common import Measurement, measurement
from .base import FULL_WINDOW, AbstractGuidance, Compose, check_window
from .cfg import CLASSIFIER_INPUTS, ClassifierFreeGuidance, ClassifierGuidance
from .default import SteerflowDefault
from .methods import DDS, DPS, OTODE, DFlow, Dreamguider, EnKG, ExactPosteriorGuidance, FlowChef, Lookahead, PnPFlow
from .registry import GUIDANCES, get_guidance
from .inversion import ControlledEditing, ControlledInversion, RectifiedSDE, edit, invert
from .operators import (OPERATORS, AbstractLinearOperator, AbstractOperator, AvgPool, Blur, Colorize, Dense,
                        GaussianNoise, Identity, Mask, NonLinear, conjugate_gradient, get_operator, operator_norm)

__all__ = ["AbstractGuidance", "Compose", "FULL_WINDOW", "check_window", "CLASSIFIER_INPUTS", "ClassifierFreeGuidance",
           "ClassifierGuidance",
           "DDS", "DPS", "GUIDANCES", "OTODE", "DFlow", "Dreamguider", "EnKG", "ExactPosteriorGuidance",
           "FlowChef", "Lookahead", "Measurement", "PnPFlow", "SteerflowDefault", "get_guidance", "measurement",
           "ControlledEditing", "ControlledInversion", "RectifiedSDE", "edit", "invert", "OPERATORS",
           "AbstractLinearOperator", "AbstractOperator", "AvgPool", "Blur", "Dense", "GaussianNoise", "Identity",
           "Mask", "NonLinear", "Colorize", "conjugate_gradient", "get_operator", "operator_norm"]
