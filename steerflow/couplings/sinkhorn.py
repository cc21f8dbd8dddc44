"""Entropic optimal transport by log-domain Sinkhorn iterations, batched over leading dimensions.

Problem (Cuturi 2013; log-domain updates: Peyré & Cuturi 2019, "Computational OT", §4.4):

    P* = argmin_{P ∈ Π(a, b)} ⟨P, C⟩ − ε H(P),   P*_ij = exp((f_i + g_j − C_ij) / ε) a_i b_j,

with the dual potentials updated alternately by soft-min (``logsumexp``) steps

    f_i ← −ε log Σ_j b_j exp((g_j − C_ij) / ε),    g_j ← −ε log Σ_i a_i exp((f_i − C_ij) / ε).

After each ``g`` step the column marginal is exact; convergence is declared when the row-marginal
violation ``‖P 1 − a‖₁`` falls below ``tol``. As ``ε → 0`` the plan's cost tends to the exact OT cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import AbstractIndexCoupling, CostSpec, _random_device, _refuse_empty, cost_matrix, resolve_cost
from .exact import solve_assignment


@dataclass(frozen=True)
class SinkhornResult:
    """A Sinkhorn solve, for problems batched over ``*B``.

    Attributes:
        plan: (*B, n, m) transport plan ``P`` (sums to 1 per problem).
        f, g: (*B, n), (*B, m) dual potentials in the units of the (possibly normalised) cost.
        n_iter: (*B,) iterations used per problem.
        converged: (*B,) bool, marginal violation below ``tol``.
        marginal_error: (*B,) final ``‖P 1 − a‖₁``.
        cost_scale: (*B,) the factor ``C`` was divided by (1 when not normalised).
    """

    plan: Tensor
    f: Tensor
    g: Tensor
    n_iter: Tensor
    converged: Tensor
    marginal_error: Tensor
    cost_scale: Tensor


def sinkhorn(C: Tensor, *, reg: float = 0.05, a: Tensor | None = None, b: Tensor | None = None,
             max_iter: int = 1000, tol: float = 1e-6, normalize_cost: bool = True,
             check_every: int = 1) -> SinkhornResult:
    """Log-domain Sinkhorn on cost matrices ``C`` (*B, n, m), any device and float dtype.

    Args:
        reg: entropic regularisation ``ε`` (relative to ``max C`` when ``normalize_cost``).
        a, b: marginals (*B, n) / (*B, m) or (n,) / (m,); uniform by default.
        max_iter: iteration cap; ``tol``: threshold on ``‖P 1 − a‖₁``, checked every ``check_every``
            iterations. Each problem stops on its own (its potentials are frozen once it converges),
            so a batched solve equals the per-problem solves.
        normalize_cost: divide each problem's ``C`` by its maximum, making ``reg`` scale-free.
    """
    if C.ndim < 2:
        raise ValueError(f"C must have shape (*B, n, m), got {tuple(C.shape)}")
    if not C.is_floating_point():
        raise TypeError(f"C must be floating point, got {C.dtype}")
    if not torch.isfinite(C).all():
        raise ValueError("the cost matrix holds NaN or inf")
    if not reg > 0:
        raise ValueError(f"reg must be positive, got {reg}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    *B, n, m = C.shape
    if n == 0 or m == 0:
        raise ValueError(f"C must have at least one row and one column (the marginals are probability vectors), "
                         f"got shape {tuple(C.shape)}")
    if normalize_cost:
        scale = C.amax(dim=(-2, -1)).clamp_min(torch.finfo(C.dtype).tiny)
    else:
        scale = torch.ones(B, dtype=C.dtype, device=C.device)
    # the Gibbs kernel's log, formed once: every update then adds one potential and reduces (one n × m temporary)
    log_K = C / (-reg * scale)[..., None, None]
    log_a = _log_marginal(a, (*B, n), C, "a")
    log_b = _log_marginal(b, (*B, m), C, "b")
    f = torch.zeros(*B, n, dtype=C.dtype, device=C.device)
    g = torch.zeros(*B, m, dtype=C.dtype, device=C.device)
    active = torch.ones(B, dtype=torch.bool, device=C.device)
    n_iter = torch.zeros(B, dtype=torch.long, device=C.device)
    err = torch.full(B, math.inf, dtype=C.dtype, device=C.device)
    a_ = log_a.exp()
    for it in range(1, max_iter + 1):
        f_new = -reg * torch.logsumexp(log_K + (g / reg + log_b)[..., None, :], dim=-1)
        g_new = -reg * torch.logsumexp(log_K + (f_new / reg + log_a)[..., :, None], dim=-2)
        f = torch.where(active[..., None], f_new, f)
        g = torch.where(active[..., None], g_new, g)
        n_iter = n_iter + active.long()
        if it % check_every == 0 or it == max_iter:
            row = torch.exp(log_K + (f / reg + log_a)[..., :, None] + (g / reg + log_b)[..., None, :]).sum(-1)
            err = torch.where(active, (row - a_).abs().sum(-1), err)
            active = active & ~(err < tol)
            if not bool(active.any()):
                break
    plan = torch.exp(log_K + (f / reg + log_a)[..., :, None] + (g / reg + log_b)[..., None, :])
    return SinkhornResult(plan=plan, f=f, g=g, n_iter=n_iter, converged=err < tol, marginal_error=err,
                          cost_scale=scale)


def _log_marginal(w: Tensor | None, shape: tuple, C: Tensor, name: str) -> Tensor:
    if w is None:
        return torch.full(shape, -math.log(shape[-1]), dtype=C.dtype, device=C.device)
    w = torch.as_tensor(w, dtype=C.dtype, device=C.device)
    if w.shape[-1] != shape[-1]:
        raise ValueError(f"{name} must have last dimension {shape[-1]}, got shape {tuple(w.shape)}")
    if (w < 0).any() or not torch.allclose(w.sum(-1), torch.ones((), dtype=C.dtype, device=C.device), atol=1e-6):
        raise ValueError(f"{name} must be non-negative and sum to 1 along its last dimension")
    return torch.log(w).expand(shape)


class Sinkhorn(AbstractIndexCoupling):
    """Entropic minibatch OT coupling (Tong et al. 2024; the ``"sinkhorn"`` plan of OT-CFM).

    ``plan(x_0, x_1)`` solves entropic OT for the cost between the batches (see :func:`sinkhorn`). As a
    coupling, for each target ``x_1[j]`` it draws one source index ``σ(j) ~ P[:, j] / b_j`` from the
    plan's column with the generator: **with replacement**, so some ``x_0`` may be used twice and
    others not at all (the ``x_1`` marginal is exact; the ``x_0`` marginal only in expectation).
    With ``hard=True`` the plan is rounded to a permutation by an exact assignment on ``−log P``. Since
    ``−log P_ij = (C_ij − f_i − g_j)/ε + const`` differs from ``C/ε`` only by row and column constants,
    this rounding is the *exact* OT permutation (solved with the Sinkhorn potentials as warm start).

    The last solve's diagnostics are kept in ``last_result`` (a :class:`SinkhornResult`): iterations
    used, ``converged`` and the marginal error.

    Args:
        reg: entropic regularisation ``ε`` (relative to the largest cost when ``normalize_cost``).
        max_iter, tol: iteration cap and tolerance on ``‖P 1 − a‖₁``.
        normalize_cost: divide the cost by its maximum (``reg`` becomes scale-free).
        cost: ``"sqeuclidean"``, ``"euclidean"`` or a callable ``c(a, b) -> (n, m)``.
        hard: return the rounded permutation instead of sampling the plan.
        dtype: compute dtype of the cost and the iterations (float64 by default; float32 halves memory).
    """

    def __init__(self, reg: float = 0.05, max_iter: int = 1000, tol: float = 1e-6, normalize_cost: bool = True,
                 *, cost: CostSpec = "sqeuclidean", hard: bool = False, check_every: int = 1,
                 dtype: torch.dtype = torch.float64) -> None:
        if not reg > 0:
            raise ValueError(f"reg must be positive, got {reg}")
        resolve_cost(cost)
        self.reg, self.max_iter, self.tol, self.normalize_cost = reg, max_iter, tol, normalize_cost
        self.cost, self.hard, self.check_every, self.dtype = cost, hard, check_every, dtype
        self.last_result: SinkhornResult | None = None

    def __repr__(self) -> str:
        return f"Sinkhorn(reg={self.reg}, max_iter={self.max_iter}, tol={self.tol}, hard={self.hard})"

    def solve(self, x_0: Tensor, x_1: Tensor, *, batch_dims: int = 0) -> SinkhornResult:
        """Solve entropic OT between ``x_0`` (*B, n, *d) and ``x_1`` (*B, m, *d); ``batch_dims = len(B)``."""
        if x_0.shape[:batch_dims] != x_1.shape[:batch_dims] or x_0.shape[batch_dims + 1:] != x_1.shape[batch_dims + 1:]:
            raise ValueError(f"x_0 and x_1 must share batch dims and sample shape, got {tuple(x_0.shape)} and "
                             f"{tuple(x_1.shape)} with batch_dims={batch_dims}")
        _refuse_empty(x_0, x_1)
        for name, x in (("x_0", x_0), ("x_1", x_1)):
            if x.ndim < batch_dims + 2:
                raise ValueError(f"{name} must have shape (*B, n, *d) with {batch_dims} batch dims, got {tuple(x.shape)}")
            if not torch.isfinite(x).all():
                raise ValueError(f"{name} holds NaN or inf")
        C = cost_matrix(self.cost, x_0, x_1, batch_dims=batch_dims, dtype=self.dtype)
        res = sinkhorn(C, reg=self.reg, max_iter=self.max_iter, tol=self.tol, normalize_cost=self.normalize_cost,
                       check_every=self.check_every)
        self.last_result = res
        return res

    def plan(self, x_0: Tensor, x_1: Tensor, *, batch_dims: int = 0) -> Tensor:
        """The entropic plan ``P`` (*B, n, m), each problem summing to 1 (uniform marginals ``1/n``, ``1/m``)."""
        return self.solve(x_0, x_1, batch_dims=batch_dims).plan

    def _indices(self, x_0, x_1, labels, generator):
        C = cost_matrix(self.cost, x_0, x_1, dtype=self.dtype)
        res = sinkhorn(C, reg=self.reg, max_iter=self.max_iter, tol=self.tol, normalize_cost=self.normalize_cost,
                       check_every=self.check_every)
        self.last_result = res
        if self.hard:
            # −log P = (C/s − f − g)/ε + const: finite even where P underflows to 0
            return solve_assignment((C / res.cost_scale - res.f[:, None] - res.g[None, :]) / self.reg)
        cols = res.plan.T  # (m, n): row j is the unnormalised law of σ(j)
        dev = _random_device(generator, cols.device)
        idx = torch.multinomial(cols.to(device=dev, dtype=torch.float64), 1, generator=generator).squeeze(1)
        return idx.to(x_0.device)
