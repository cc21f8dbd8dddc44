"""Convex transport costs ``c(x_1 - x_0)`` with their convex conjugates (Liu 2022, §3).

``c*(y) = sup_z ⟨y, z⟩ - c(z)``; for strictly convex ``c`` the maps ``∇c`` and ``∇c*`` are inverse to each
other, so a c-conservative velocity ``v = ∇c*(∇f)`` can represent any displacement ``z = ∇c*(∇c(z))``.

* quadratic: ``c(z) = ½|z|²``, ``c* = c``, ``∇c* = id``;
* ℓp (``p > 1``): ``c(z) = ‖z‖_p^p / p = Σ_i |z_i|^p / p``, ``c*(y) = ‖y‖_q^q / q`` with ``1/p + 1/q = 1``,
  ``∇c*(y)_i = sign(y_i) |y_i|^{q-1}``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


def _flat(z: Tensor) -> Tensor:
    return z.reshape(z.shape[0], -1)


class AbstractConvexCost(ABC):
    """A convex cost ``c: R^d → R`` applied to displacements, summed over all but the batch dimension."""

    name: str

    @abstractmethod
    def __call__(self, z: Tensor) -> Tensor:
        """``c(z)`` (b,) for displacements ``z`` (b, *d)."""

    @abstractmethod
    def conjugate(self, y: Tensor) -> Tensor:
        """``c*(y)`` (b,)."""

    @abstractmethod
    def grad(self, z: Tensor) -> Tensor:
        """``∇c(z)`` (b, *d)."""

    @abstractmethod
    def grad_conjugate(self, y: Tensor) -> Tensor:
        """``∇c*(y)`` (b, *d): the link from a potential's gradient to a velocity."""


class QuadraticCost(AbstractConvexCost):
    """``c(z) = ½|z|²`` (its optimal map is Brenier's: the gradient of a convex function)."""

    name = "quadratic"

    def __repr__(self) -> str:
        return "QuadraticCost()"

    def __call__(self, z):
        return 0.5 * _flat(z).pow(2).sum(-1)

    def conjugate(self, y):
        return 0.5 * _flat(y).pow(2).sum(-1)

    def grad(self, z):
        return z

    def grad_conjugate(self, y):
        return y


class LpCost(AbstractConvexCost):
    """``c(z) = Σ_i |z_i|^p / p`` for ``p > 1``; ``c*(y) = Σ_i |y_i|^q / q``, ``q = p / (p - 1)``."""

    name = "lp"

    def __init__(self, p: float = 1.5) -> None:
        if not p > 1:
            raise ValueError(f"LpCost needs p > 1 (strictly convex), got p={p}")
        self.p = float(p)
        self.q = self.p / (self.p - 1)

    def __repr__(self) -> str:
        return f"LpCost(p={self.p:g})"

    def __call__(self, z):
        return _flat(z).abs().pow(self.p).sum(-1) / self.p

    def conjugate(self, y):
        return _flat(y).abs().pow(self.q).sum(-1) / self.q

    def grad(self, z):
        return torch.sign(z) * z.abs().pow(self.p - 1)

    def grad_conjugate(self, y):
        return torch.sign(y) * y.abs().pow(self.q - 1)


COSTS = {"quadratic": QuadraticCost, "lp": LpCost}


def get_cost(cost: str | AbstractConvexCost, **options) -> AbstractConvexCost:
    """Look a cost up by name (``quadratic``, ``lp`` with ``p=``) or pass one through."""
    if isinstance(cost, AbstractConvexCost):
        return cost
    if cost not in COSTS:
        raise ValueError(f"unknown cost {cost!r}; expected one of {sorted(COSTS)}")
    return COSTS[cost](**options)
