"""Steering: training-free control of trained flows through the one sampler loop.

Every method is an :class:`AbstractGuidance` passed as ``steerflow.sample(v, x_0, guidance=...)``;
operators describe measurements ``y = A(x) + noise`` with the noise model kept apart from ``A``.
"""
from .base import AbstractGuidance, Compose
from .cfg import CLASSIFIER_INPUTS, ClassifierFreeGuidance, ClassifierGuidance
from .guidance import (DDS, DPS, GUIDANCES, OTODE, DFlow, Dreamguider, EnKG, ExactPosteriorGuidance, FlowChef,
                       Lookahead, Measurement, PnPFlow, SteerflowDefault, get_guidance, measurement)
from .inversion import ControlledEditing, ControlledInversion, RectifiedSDE, edit, invert
from .operators import (OPERATORS, AbstractLinearOperator, AbstractOperator, AvgPool, Blur, Colorize, Dense, GaussianNoise,
                        Identity, Mask, NonLinear, conjugate_gradient, get_operator, operator_norm)

__all__ = ["AbstractGuidance", "Compose", "CLASSIFIER_INPUTS", "ClassifierFreeGuidance", "ClassifierGuidance",
           "DDS", "DPS", "GUIDANCES", "OTODE", "DFlow", "Dreamguider", "EnKG", "ExactPosteriorGuidance",
           "FlowChef", "Lookahead", "Measurement", "PnPFlow", "SteerflowDefault", "get_guidance", "measurement",
           "ControlledEditing", "ControlledInversion", "RectifiedSDE", "edit", "invert", "OPERATORS",
           "AbstractLinearOperator", "AbstractOperator", "AvgPool", "Blur", "Dense", "GaussianNoise", "Identity",
           "Mask", "NonLinear", "Colorize", "conjugate_gradient", "get_operator", "operator_norm"]
