"""The coupling contract, input checks and ground costs shared by every coupling.

A coupling re-pairs a batch ``(x_0, x_1)`` before the flow-matching loss (Pooladian et al. 2023,
"Multisample Flow Matching"; Tong et al. 2024, "Improving and generalizing flow-based generative
models with minibatch optimal transport"). Convention of steerflow: a coupling **re-orders x_0** (the
source/noise batch) and keeps ``x_1`` in place, so per-sample labels or conditions of ``x_1`` stay
aligned with it.
"""
from __future__ import annotations

import abc
import math
from typing import Callable, Union

import torch
from torch import Tensor

from .._types import check_batch

CostFn = Callable[[Tensor, Tensor], Tensor]
CostSpec = Union[str, CostFn]  # a name in COSTS or a callable (x_0, x_1) -> (n, m) cost matrix


def _check_pair(x_0: Tensor, x_1: Tensor, labels: Tensor | None) -> None:
    check_batch(x_0, "x_0", finite=False)
    check_batch(x_1, "x_1", finite=False)
    if x_0.shape != x_1.shape:
        raise ValueError(f"x_0 and x_1 must have the same shape (b, *d); got {tuple(x_0.shape)} and "
                         f"{tuple(x_1.shape)}")
    _refuse_empty(x_0, x_1)
    if x_0.device != x_1.device:
        raise ValueError(f"x_0 and x_1 must be on the same device; got {x_0.device} and {x_1.device}")
    for name, x in (("x_0", x_0), ("x_1", x_1)):
        if not all_finite(x):
            raise ValueError(f"{name} holds NaN or inf")
    if labels is not None:
        if not torch.is_tensor(labels):
            raise TypeError(f"labels must be a torch.Tensor of shape (b,) or (b, *k), got {type(labels).__name__}")
        if labels.ndim < 1 or labels.shape[0] != x_1.shape[0]:
            raise ValueError(f"labels must have shape ({x_1.shape[0]},) or ({x_1.shape[0]}, *k) to match x_1, "
                             f"got {tuple(labels.shape)}")


def _refuse_empty(x_0: Tensor, x_1: Tensor) -> None:
    """Raise a ValueError naming the shapes when either batch holds no value: the batches stand for empirical
    distributions (1/b) Σ δ_x, and there is none of zero samples (or of samples with no values)."""
    if x_0.numel() == 0 or x_1.numel() == 0:
        raise ValueError(f"x_0 and x_1 must hold at least one sample with at least one value each; got the empty "
                         f"batches of shapes {tuple(x_0.shape)} and {tuple(x_1.shape)}")


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
# Problems with at most this many n·m·D terms take explicit differences; larger ones the matrix product.
_EXPLICIT_TERMS = 1 << 15
# The product form keeps an entry when it exceeds this fraction of |a|² + |b|² (it lost at most 10 bits to
# cancellation): its relative error is then below (D + 2)·2⁻⁵³·2¹⁰, 1e-10 at D = 784. The rest are recomputed.
_RESOLVED = 2.0 ** -10
_FIX_CHUNK = 1 << 22  # differences recomputed at once, in values


def _sqeuclidean(a: Tensor, b: Tensor) -> Tensor:
    """``|a_i − b_j|²`` for ``a`` (..., n, D) and ``b`` (..., m, D), each entry to a relative 1e-10 or better.

    Small problems take explicit differences. Larger ones use ``|a|² + |b|² − 2 a·b`` (one matrix product), which
    cancels when the points lie far from the origin compared with their distances (an offset of 1e8 on unit data
    leaves no correct digit), so both batches are first shifted by their common mean (the cost is shift-invariant),
    and the entries that still cancel (near-duplicate pairs) are recomputed from explicit differences of the
    unshifted points (one rounding per coordinate, where the shifted ones would carry two).
    """
    n, m, D = a.shape[-2], b.shape[-2], a.shape[-1]
    if n * m * D <= _EXPLICIT_TERMS:
        return (a.unsqueeze(-2) - b.unsqueeze(-3)).square().sum(-1)
    shift = (a.mean(-2) * (n / (n + m)) + b.mean(-2) * (m / (n + m)))[..., None, :]
    a_s, b_s = a - shift, b - shift
    na, nb = (a_s * a_s).sum(-1), (b_s * b_s).sum(-1)
    # one fused multiply-add and one in-place pass (half the memory traffic of the plain expression)
    c = torch.baddbmm(na.reshape(-1, n, 1), a_s.reshape(-1, n, D), b_s.reshape(-1, m, D).transpose(-1, -2),
                      alpha=-2.0)
    c = c.reshape(*a.shape[:-1], m).add_(nb[..., None, :])
    *batch, rows, cols = torch.nonzero(c < _RESOLVED * (na[..., :, None] + nb[..., None, :]), as_tuple=True)
    step = max(1, _FIX_CHUNK // D)
    for s in range(0, rows.numel(), step):
        k = tuple(t[s:s + step] for t in batch)
        i, j = rows[s:s + step], cols[s:s + step]
        c[(*k, i, j)] = (a[(*k, i)] - b[(*k, j)]).square().sum(-1)
    return c


def _euclidean(a: Tensor, b: Tensor) -> Tensor:
    return _sqeuclidean(a, b).sqrt_()


COSTS: dict[str, CostFn] = {"sqeuclidean": _sqeuclidean, "euclidean": _euclidean}


def resolve_cost(cost: CostSpec) -> CostFn:
    """Return the ground cost ``c(a, b) -> (..., n, m)`` for ``a`` (..., n, D) and ``b`` (..., m, D)."""
    if callable(cost):
        return cost
    if isinstance(cost, str):
        if cost not in COSTS:
            raise ValueError(f"unknown cost {cost!r}; expected one of {sorted(COSTS)} or a callable")
        return COSTS[cost]
    raise TypeError(f"cost must be a string or a callable c(a, b) -> (n, m), got {type(cost).__name__}")


def cost_matrix(cost: CostSpec, x_0: Tensor, x_1: Tensor, *, batch_dims: int = 0,
                dtype: torch.dtype | None = torch.float64) -> Tensor:
    """Pairwise cost ``C_ij = c(x_0[i], x_1[j])`` of flattened samples, computed in torch on their device.

    The built-in costs are accurate entry by entry (to a relative 1e-10 in float64) wherever the batches lie:
    they do not cancel for points far from the origin compared with their distances (see ``_sqeuclidean``).

    Args:
        x_0: (*B, n, *d) and x_1: (*B, m, *d) with ``batch_dims = len(B)`` leading problem dimensions.
        dtype: compute dtype (float64 by default so exact solvers see exact-enough costs; ``None``
            keeps the input dtype).

    Returns:
        C (*B, n, m), finite.
    """
    fn = resolve_cost(cost)
    k = batch_dims + 1
    a, b = (x.flatten(k) if x.ndim > k else x.unsqueeze(-1) for x in (x_0, x_1))
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
    x = x.detach()
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def _random_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    """Draw random numbers where the generator lives (a CUDA generator cannot drive CPU draws)."""
    return generator.device if generator is not None else fallback
