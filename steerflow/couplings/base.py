"""The coupling contract, input checks and ground costs shared by every coupling.

A coupling re-pairs a batch ``(x_0, x_1)`` before the flow-matching loss (Pooladian et al. 2023,
"Multisample Flow Matching"; Tong et al. 2024, "Improving and generalizing flow-based generative
models with minibatch optimal transport"). Convention of steerflow: a coupling **re-orders x_0** (the
source/noise batch) and keeps ``x_1`` in place, so per-sample labels or conditions of ``x_1`` stay
aligned with it.
"""
from __future__ import annotations

import abc
from typing import Callable, Union

import torch
from torch import Tensor

from .._types import check_batch

CostFn = Callable[[Tensor, Tensor], Tensor]
Cost = Union[str, CostFn]


def _check_pair(x_0: Tensor, x_1: Tensor, labels: Tensor | None) -> None:
    check_batch(x_0, "x_0")
    check_batch(x_1, "x_1")
    if x_0.shape != x_1.shape:
        raise ValueError(f"x_0 and x_1 must have the same shape (b, *d); got {tuple(x_0.shape)} and "
                         f"{tuple(x_1.shape)}")
    if x_0.device != x_1.device:
        raise ValueError(f"x_0 and x_1 must be on the same device; got {x_0.device} and {x_1.device}")
    if labels is not None:
        if not torch.is_tensor(labels):
            raise TypeError(f"labels must be a torch.Tensor of shape (b,) or (b, *k), got {type(labels).__name__}")
        if labels.ndim < 1 or labels.shape[0] != x_1.shape[0]:
            raise ValueError(f"labels must have shape ({x_1.shape[0]},) or ({x_1.shape[0]}, *k) to match x_1, "
                             f"got {tuple(labels.shape)}")


class AbstractCoupling(abc.ABC):
    """A re-pairing of a minibatch ``(x_0, x_1)``, each of shape ``(b, *d)``, on any device.

    ``coupling(x_0, x_1, labels=None, generator=None) -> (x_0', x_1')``. Index couplings return
    ``(x_0[σ], x_1)`` for a permutation (or, for stochastic plans, an index map) ``σ`` of shape ``(b,)``;
    ``x_1`` and its ``labels`` keep their order. Inputs are checked here, once, for every coupling.
    """

    def __call__(self, x_0: Tensor, x_1: Tensor, *, labels: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        _check_pair(x_0, x_1, labels)
        return self._couple(x_0, x_1, labels, generator)

    @abc.abstractmethod
    def _couple(self, x_0: Tensor, x_1: Tensor, labels: Tensor | None,
                generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Return the re-paired batch; inputs already validated."""


class AbstractIndexCoupling(AbstractCoupling):
    """A coupling that re-orders ``x_0`` by an index map ``σ`` (b,): it returns ``(x_0[σ], x_1)``."""

    def indices(self, x_0: Tensor, x_1: Tensor, *, labels: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Return ``σ`` (b,) long on ``x_0``'s device: ``x_0[σ[j]]`` is paired with ``x_1[j]``."""
        _check_pair(x_0, x_1, labels)
        return self._indices(x_0, x_1, labels, generator)

    @abc.abstractmethod
    def _indices(self, x_0: Tensor, x_1: Tensor, labels: Tensor | None,
                 generator: torch.Generator | None) -> Tensor:
        """Return ``σ`` (b,); inputs already validated."""

    def _couple(self, x_0, x_1, labels, generator):
        return x_0[self._indices(x_0, x_1, labels, generator)], x_1


# --- ground costs ------------------------------------------------------------------------------
def _sqeuclidean(a: Tensor, b: Tensor) -> Tensor:
    # |a|² + |b|² - 2 a·b, clamped: rounding can make it slightly negative on near-duplicates.
    # One fused multiply-add and two in-place passes (half the memory traffic of the plain expression).
    c = torch.baddbmm((a * a).sum(-1)[..., :, None].reshape(-1, a.shape[-2], 1),
                      a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]).transpose(-1, -2), alpha=-2.0)
    c = c.reshape(*a.shape[:-1], b.shape[-2])
    return c.add_((b * b).sum(-1)[..., None, :]).clamp_min_(0.0)


def _euclidean(a: Tensor, b: Tensor) -> Tensor:
    return _sqeuclidean(a, b).sqrt_()


COSTS: dict[str, CostFn] = {"sqeuclidean": _sqeuclidean, "euclidean": _euclidean}


def resolve_cost(cost: Cost) -> CostFn:
    """Return the ground cost ``c(a, b) -> (..., n, m)`` for ``a`` (..., n, D) and ``b`` (..., m, D)."""
    if callable(cost):
        return cost
    if isinstance(cost, str):
        if cost not in COSTS:
            raise ValueError(f"unknown cost {cost!r}; expected one of {sorted(COSTS)} or a callable")
        return COSTS[cost]
    raise TypeError(f"cost must be a string or a callable c(a, b) -> (n, m), got {type(cost).__name__}")


def cost_matrix(cost: Cost, x_0: Tensor, x_1: Tensor, *, batch_dims: int = 0,
                dtype: torch.dtype | None = torch.float64) -> Tensor:
    """Pairwise cost ``C_ij = c(x_0[i], x_1[j])`` of flattened samples, computed in torch on their device.

    Args:
        x_0: (*B, n, *d) and x_1: (*B, m, *d) with ``batch_dims = len(B)`` leading problem dimensions.
        dtype: compute dtype (float64 by default so exact solvers see exact-enough costs; ``None``
            keeps the input dtype).

    Returns:
        C (*B, n, m), finite.
    """
    fn = resolve_cost(cost)
    k = batch_dims + 1
    a = x_0.reshape(*x_0.shape[:k], -1)
    b = x_1.reshape(*x_1.shape[:k], -1)
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    C = fn(a, b)
    expected = (*x_0.shape[:k], x_1.shape[batch_dims])
    if not torch.is_tensor(C) or tuple(C.shape) != expected:
        got = tuple(C.shape) if torch.is_tensor(C) else type(C).__name__
        raise ValueError(f"the cost function must return a tensor of shape {expected}, got {got}")
    if not all_finite(C):
        raise ValueError("the cost matrix holds NaN or inf")
    return C


def all_finite(x: Tensor) -> bool:
    """Whether every entry is finite; one summing pass (a NaN or ±inf makes the sum non-finite), with the
    element-wise check only when the sum is not finite (it can also overflow on huge finite entries)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _random_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    """Draw random numbers where the generator lives (a CUDA generator cannot drive CPU draws)."""
    return generator.device if generator is not None else fallback
