"""Every steering method by name: ``GUIDANCES`` and :func:`get_guidance` (the CLI's ``--method`` choices)."""
from __future__ import annotations

from .base import AbstractGuidance
from .default import SteerflowDefault
from .methods import DDS, DPS, OTODE, DFlow, Dreamguider, EnKG, ExactPosteriorGuidance, FlowChef, Lookahead, PnPFlow

__all__ = ["GUIDANCES", "get_guidance"]


GUIDANCES: dict[str, type] = {
    "exact": ExactPosteriorGuidance, "flowchef": FlowChef, "dps": DPS, "lookahead": Lookahead, "dflow": DFlow,
    "dreamguider": Dreamguider, "enkg": EnKG, "dds": DDS, "otode": OTODE, "pnpflow": PnPFlow,
    "default": SteerflowDefault,
}


def get_guidance(name: str, *args, **kwargs) -> AbstractGuidance:
    """Build a guidance by name (see ``GUIDANCES``), e.g. ``get_guidance("dps", A, y, 0.1, scale=0.3)``."""
    if name not in GUIDANCES:
        raise ValueError(f"unknown guidance {name!r}; expected one of {sorted(GUIDANCES)}")
    return GUIDANCES[name](*args, **kwargs)
