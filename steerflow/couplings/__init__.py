"""Couplings: re-pair a minibatch ``(x_0, x_1)`` before the flow-matching loss.

Convention: a coupling re-orders ``x_0`` (the source) and keeps ``x_1`` (and its labels) in place.

========================  =========================================================================
``"independent"``         :class:`Independent` — ``x_0 ⟂ x_1`` (I-CFM)
``"exact-ot"``            :class:`ExactOT` — the optimal permutation (OT-CFM, Multisample FM)
``"sinkhorn"``            :class:`Sinkhorn` — entropic plan, sampled per ``x_1`` (or rounded, ``hard``)
``"conditional-ot"``      :class:`ConditionalOT` — OT within each label/condition group
``"reflow"``              :class:`ReflowCoupling` — ``(x_0, ψ_1(x_0))`` of a trained flow (needs ``v``)
========================  =========================================================================
"""
from __future__ import annotations

from .base import COSTS, AbstractCoupling, AbstractIndexCoupling, cost_matrix, resolve_cost
from .conditional import ConditionalOT
from .exact import ExactOT, solve_assignment
from .independent import Independent
from .reflow import ReflowCoupling
from .sinkhorn import Sinkhorn, SinkhornResult, sinkhorn

COUPLINGS: dict[str, type[AbstractCoupling]] = {
    "independent": Independent,
    "exact-ot": ExactOT,
    "sinkhorn": Sinkhorn,
    "conditional-ot": ConditionalOT,
    "reflow": ReflowCoupling,
}


def get_coupling(name: str | AbstractCoupling, **kw) -> AbstractCoupling:
    """Build a coupling by name (``COUPLINGS``) with keyword arguments; a coupling instance passes through."""
    if isinstance(name, AbstractCoupling):
        if kw:
            raise ValueError("keyword arguments are only accepted with a coupling name")
        return name
    if not isinstance(name, str):
        raise TypeError(f"coupling must be a name or an AbstractCoupling, got {type(name).__name__}")
    if name not in COUPLINGS:
        raise ValueError(f"unknown coupling {name!r}; expected one of {sorted(COUPLINGS)}")
    return COUPLINGS[name](**kw)


__all__ = ["COSTS", "COUPLINGS", "AbstractCoupling", "AbstractIndexCoupling", "ConditionalOT", "ExactOT",
           "Independent", "ReflowCoupling", "Sinkhorn", "SinkhornResult", "cost_matrix", "get_coupling",
           "resolve_cost", "sinkhorn", "solve_assignment"]
