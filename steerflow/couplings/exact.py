"""Exact minibatch optimal transport: the optimal permutation of a square assignment problem.

For uniform weights on two batches of equal size ``n`` the optimal transport plan is a permutation
(Birkhoff–von Neumann), so exact minibatch OT (Pooladian et al. 2023; Tong et al. 2024, OT-CFM) is the
linear assignment problem

    σ* = argmin_σ Σ_j C[σ(j), j],   C_ij = c(x_0[i], x_1[j]).

Solvers. ``"auction-jv"`` (the default wherever steerflow's optional C extension ``_lap.c`` is built)
first lets each row take a free column of least cost (when that succeeds the matching attains the sum of row
minima, a lower bound: x_0 = x_1 up to order and all-equal batches end there), else runs ε-scaling phases of
Bertsekas' forward auction (Bertsekas 1988) to get near-optimal column duals, then Jonker–Volgenant's augmenting
row reduction and shortest augmenting paths (Jonker & Volgenant 1987) from those duals: the auction is only a warm
start (skipped below 64 points and on costs with many ties, where it is slower), exactness rests on the augmenting
paths, which end with a perfect matching and feasible duals (an optimality certificate; the tests check it entry
by entry). For the built-in costs on CPU batches of small dimension it forms the costs itself, in C, from explicit
differences. It is faster than POT's network simplex at every size from 2 to 4096 points and on degenerate
batches (benchmarks/results/ot_coupling.md, section ``pot``). Without the extension: ``"emd"`` uses POT's
network simplex (optional dependency), run to convergence and checked to be a permutation; ``"lsa"`` is
``scipy.optimize.linear_sum_assignment`` (a shortest-augmenting-path Jonker–Volgenant method, Crouse
2016), exact but slow from a cold start at large ``n``; ``"auction-lsa"`` first runs the auction
(Jacobi bidding, vectorised in torch on the cost matrix's device) to get prices ``p`` and hands the
*reduced* matrix ``C_ij + p_j`` to scipy. Adding a constant to a column adds the same amount to every
assignment's total, so the optimal permutation is unchanged; the prices only make the augmenting paths
short. In floating point the reduction perturbs costs by ~1e-16 relative, so on exact ties the
returned permutation may differ from a cold solve while having the same total cost to ~1e-12.
``"auto"`` takes ``auction-jv`` when built, else ``emd`` when POT is installed, else ``auction-lsa``
for ``n >= auction_min_size`` and ``lsa`` below.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from . import _native
from .base import AbstractIndexCoupling, CostSpec, all_finite, cost_matrix, resolve_cost

SOLVERS = ("auto", "auction-jv", "lsa", "auction-lsa", "emd")


def _auction_prices(C: Tensor, *, eps_final: float = 1e-5, eps_start: float = 1e-2, theta: float = 10.0,
                    stop_fraction: float = 0.01, n_candidates: int = 16, max_rounds: int = 100_000) -> Tensor:
    """Column prices ``p`` (m,) from ε-scaling forward auction on ``min Σ C_{i σ(i)}`` (C (n, m), n ≤ m).

    Person ``i`` values object ``j`` at ``C_ij + p_j``; an unassigned person bids for its best object
    ``j₁`` raising its price by ``w₂ − w₁ + ε`` (best and second-best values), the highest bid wins and
    the previous owner is evicted (Bertsekas 1988). Each phase ends when at most ``stop_fraction · n``
    persons are unassigned (the exact solver finishes the job), then ``ε ← ε / θ`` from
    ``eps_start · range(C)`` down to ``eps_final · range(C)``; persons still ε-complementary-slack
    keep their object. Top-2 values are found from a cached list of each person's ``n_candidates``
    best objects: prices only rise, so the cached K-th value bounds every non-candidate from below and a
    full row scan is needed only when the second best exceeds that bound (the result is exact).
    """
    n, m = C.shape
    K = min(n_candidates, m)
    scale = float(C.max() - C.min())
    p = torch.zeros(m, dtype=C.dtype, device=C.device)
    if scale == 0.0 or m < 2:
        return p
    eps = eps_start * scale
    eps_end = eps_final * scale
    vals, cand = torch.topk(C, K, dim=1, largest=False)
    bound = vals[:, -1].clone()
    owner = torch.full((m,), -1, dtype=torch.long, device=C.device)
    assigned = torch.full((n,), -1, dtype=torch.long, device=C.device)
    rows = torch.arange(n, device=C.device)
    k_stop = int(stop_fraction * n)
    neg_inf = torch.full((m,), -math.inf, dtype=C.dtype, device=C.device)
    no_bidder = torch.full((m,), -1, dtype=torch.long, device=C.device)
    rounds = 0
    first = True
    while True:
        if not first:
            # keep the persons whose object is still within ε of their best value
            a = assigned.clamp_min(0)
            cur = C[rows, a] + p[a]
            best_lb = torch.minimum((C.gather(1, cand) + p[cand]).min(1).values, bound)
            drop = (assigned >= 0) & (cur > best_lb + eps)
            owner[assigned[drop]] = -1
            assigned[drop] = -1
        first = False
        U = torch.nonzero(assigned < 0).squeeze(1)
        while U.numel() > k_stop and rounds < max_rounds:
            rounds += 1
            cu = cand[U]
            cv = C[U[:, None], cu] + p[cu]
            w, jj = torch.topk(cv, 2, dim=1, largest=False)
            stale = w[:, 1] > bound[U]
            if bool(stale.any()):
                us = U[stale]
                vk, ck = torch.topk(C.index_select(0, us).add_(p), K, dim=1, largest=False)
                cand[us], bound[us] = ck, vk[:, -1]
                cu = cand[U]
                cv = C[U[:, None], cu] + p[cu]
                w, jj = torch.topk(cv, 2, dim=1, largest=False)
            j1 = cu.gather(1, jj[:, :1]).squeeze(1)
            bid = p[j1] + (w[:, 1] - w[:, 0]) + eps
            best = neg_inf.clone().scatter_reduce_(0, j1, bid, "amax")
            win = bid == best[j1]
            winner = no_bidder.clone().scatter_reduce_(0, j1[win], U[win], "amax")
            objs = torch.nonzero(winner >= 0).squeeze(1)
            prev = owner[objs]
            assigned[prev[prev >= 0]] = -1
            owner[objs] = winner[objs]
            assigned[winner[objs]] = objs
            p[objs] = best[objs]
            U = torch.nonzero(assigned < 0).squeeze(1)
        if eps <= eps_end or rounds >= max_rounds:
            return p
        eps = max(eps / theta, eps_end)


def _have_pot() -> bool:
    try:
        import ot  # noqa: F401
    except ImportError:
        return False
    return True


def _lsa(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(C)


def _emd_permutation(C: np.ndarray) -> np.ndarray | None:
    """Network simplex (POT) on uniform marginals; its basic optimal plan is a permutation matrix.

    Calls POT's compiled solver ``emd_c`` directly (the ``ot.emd`` wrapper adds backend dispatch,
    marginal checks and copies that cost ~20 % at n = 1024); falls back to ``ot.emd`` where that
    entry point is missing. Returns ``σ`` with ``P[σ[j], j] = 1/n``, or None if the solver stopped
    short of optimality or the plan is not a vertex (the caller then uses the assignment solver).
    """
    try:
        import ot
    except ImportError as e:
        raise ImportError("solver='emd' needs POT: pip install 'steerflow[ot]'") from e
    n = C.shape[0]
    w = np.full(n, 1.0 / n)
    # torchcfm's default of 1e5 iterations stops short of optimality at n = 4096; allow enough pivots
    max_iter = max(100_000, 1000 * n)
    try:
        from ot.lp.emd_wrap import emd_c

        P, _, _, _, code = emd_c(w, w, C, max_iter, 1)
        optimal = code == 1  # POT's ProblemType::OPTIMAL
    except (ImportError, TypeError, ValueError):  # another POT layout or signature (tested by hiding emd_c)
        P, log = ot.emd(w, w, C, numItermax=max_iter, log=True)
        optimal = not log.get("warning")
    if not optimal:
        return None  # not converged: fall back to the assignment solver
    # a permutation plan has n entries 1/n, one per row and column (degenerate pivots may leave ~1e-19 dust)
    flat = np.flatnonzero(P > 0.5 / n)
    if flat.size != n:
        return None  # not a vertex
    rows, cols = np.divmod(flat, n)
    mass = P.ravel()[flat]
    if (np.bincount(cols, minlength=n).max() != 1 or np.bincount(rows, minlength=n).max() != 1
            or not np.allclose(mass, 1.0 / n) or abs(P.sum() - mass.sum()) > 1e-9):
        return None
    perm = np.empty(n, dtype=np.int64)
    perm[cols] = rows
    return perm


def solve_assignment(C: Tensor, *, solver: str = "auto", auction_min_size: int = 2048) -> Tensor:
    """Exact optimal permutation of a square cost matrix.

    Args:
        C: (n, n) finite costs, ``C[i, j]`` the cost of pairing source ``i`` with target ``j``; any
            device (the auction warm start runs there, the exact solve on CPU in float64).
        solver: ``"auction-jv"`` (steerflow's compiled auction + Jonker–Volgenant solver, exact; needs
            the C extension), ``"lsa"`` (scipy's exact Jonker–Volgenant from a cold start),
            ``"auction-lsa"`` (auction prices, then the same exact solver on ``C_ij + p_j``), ``"emd"``
            (POT's network simplex, optional dependency; its optimal vertex is a permutation, checked,
            with a fallback to ``auction-lsa`` if it stops early) or ``"auto"`` (``auction-jv`` when
            built; else ``emd`` when POT is installed; else ``auction-lsa`` for
            ``n >= auction_min_size`` and ``lsa`` below).

    Returns:
        σ (n,) long on ``C``'s device with ``σ = argmin_σ Σ_j C[σ[j], j]`` over permutations.
    """
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be a square (n, n) matrix, got {tuple(C.shape)}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {list(SOLVERS)}")
    if not all_finite(C):
        raise ValueError("the cost matrix holds NaN or inf")
    return _assign(C, solver, auction_min_size)


def _assign(C: Tensor, solver: str, auction_min_size: int) -> Tensor:
    """:func:`solve_assignment` on an already checked square, finite ``C`` and a known ``solver``."""
    n = C.shape[0]
    if solver == "auto":
        solver = "auction-jv" if _native.available() else "emd" if _have_pot() else "auto"
    if n <= 1:
        return torch.zeros(n, dtype=torch.long, device=C.device)
    C64 = C.detach().to(device="cpu", dtype=torch.float64).numpy()
    if solver == "auction-jv":
        _, perm, _, _ = _native.solve(np.ascontiguousarray(C64))  # perm[j]: the row assigned to column j
        return torch.from_numpy(perm).to(C.device)
    # a power-of-two scale is exact and brings costs of any magnitude (1e-16 … 1e16) to the range [-1, 1]
    # that POT's and scipy's tolerances expect
    e = math.frexp(float(np.abs(C64).max()))[1]
    C64 = np.ldexp(C64, -e)
    use_auction = solver == "auction-lsa" or (solver == "auto" and n >= auction_min_size)
    if solver == "emd":
        perm = _emd_permutation(np.ascontiguousarray(C64))
        if perm is not None:
            return torch.from_numpy(perm).to(C.device)
        use_auction = True
    if use_auction:
        # float32 suffices for a warm start (ε_final ≫ float32 rounding) and halves memory traffic
        p = _auction_prices(C.detach().to(torch.float32))  # on C's device
        C64 = C64 + np.ldexp(p.cpu().numpy().astype(np.float64), -e)
    rows, cols = _lsa(C64)
    perm = np.empty(n, dtype=np.int64)
    perm[cols] = rows
    return torch.from_numpy(perm).to(C.device)


# CPU batches of at most this many values per sample, or n²·D terms in all, go to the compiled solver as points: it
# forms the costs from explicit differences in C; larger ones go as a cost matrix formed by torch's matrix product.
_POINTS_MAX_DIM, _POINTS_MAX_TERMS = 16, 1 << 19


def _float64_rows(x: Tensor) -> np.ndarray:
    """A CPU batch (b, *d) as a C-contiguous float64 array (b, D), converted by numpy (cheaper than torch for
    small batches; numpy has no bfloat16)."""
    x = x.detach().flatten(1)
    return np.ascontiguousarray(x.numpy() if x.dtype != torch.bfloat16 else x.float().numpy(), dtype=np.float64)


class ExactOT(AbstractIndexCoupling):
    """Exact minibatch OT coupling: ``(x_0[σ*], x_1)`` with ``σ*`` the optimal permutation.

    ``σ* = argmin_σ (1/b) Σ_j c(x_0[σ(j)], x_1[j])`` over permutations of the batch — a true
    permutation, so every source point is used exactly once and both empirical marginals are preserved
    exactly (OT-CFM, Tong et al. 2024; Multisample FM, Pooladian et al. 2023). Deterministic given the
    inputs (the generator is unused). The built-in costs are formed without cancellation (see
    :func:`~steerflow.couplings.base.cost_matrix`), so the permutation stays optimal for batches far from
    the origin and at any scale.

    Args:
        cost: ``"sqeuclidean"`` (``|x_0 − x_1|²``, default), ``"euclidean"`` or a callable
            ``c(a, b) -> (n, m)`` on flattened samples ``a`` (n, D), ``b`` (m, D).
        solver: see :func:`solve_assignment`.
    """

    def __init__(self, cost: CostSpec = "sqeuclidean", *, solver: str = "auto", auction_min_size: int = 2048) -> None:
        resolve_cost(cost)
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; expected one of {list(SOLVERS)}")
        self.cost, self.solver, self.auction_min_size = cost, solver, auction_min_size

    def __repr__(self) -> str:
        cost = self.cost if isinstance(self.cost, str) else getattr(self.cost, "__name__", "callable")
        return f"ExactOT(cost={cost!r}, solver={self.solver!r})"

    def _indices(self, x_0, x_1, labels, generator):
        n, D = x_0.shape[0], math.prod(x_0.shape[1:])
        if (x_0.is_cpu and isinstance(self.cost, str) and self.solver in ("auto", "auction-jv")
                and (D <= _POINTS_MAX_DIM or n * n * D <= _POINTS_MAX_TERMS) and _native.available()):
            _, sigma, _, _ = _native.solve_points(_float64_rows(x_0), _float64_rows(x_1), self.cost)
            return torch.from_numpy(sigma)
        C = cost_matrix(self.cost, x_0, x_1)  # square and checked finite: no second check
        return _assign(C, self.solver, self.auction_min_size)
