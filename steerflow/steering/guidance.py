"""The guidance methods under their first address, ``steerflow.steering.guidance``.

The methods live one per module in :mod:`steerflow.steering.methods`, steerflow's own method in
:mod:`steerflow.steering.default`, the shared measurement plumbing in :mod:`steerflow.steering._common` and the
registry in :mod:`steerflow.steering.registry`; this module re-exports them, so ``from
steerflow.steering.guidance import DPS`` keeps working (``from steerflow.steering import DPS`` is the usual form).
"""
from ._common import Measurement, measurement
from .default import SteerflowDefault
from .methods import DDS, DPS, OTODE, DFlow, Dreamguider, EnKG, ExactPosteriorGuidance, FlowChef, Lookahead, PnPFlow
from .registry import GUIDANCES, get_guidance

__all__ = ["Measurement", "measurement", "ExactPosteriorGuidance", "FlowChef", "DPS", "Lookahead", "DFlow",
           "Dreamguider", "EnKG", "DDS", "OTODE", "PnPFlow", "SteerflowDefault", "GUIDANCES", "get_guidance"]
