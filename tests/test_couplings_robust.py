"""Couplings on hard inputs: batches far from the origin and at extreme scales stay exactly optimal (against scipy on
costs from explicit float64 differences), degenerate batches (x_0 = x_1, ties, all-equal points) give optimal
permutations, empty batches are refused with a ValueError and single-sample batches work."""
from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from steerflow.couplings import (COUPLINGS, ConditionalOT, ExactOT, Independent, ReflowCoupling, Sinkhorn, cost_matrix,
                                 sinkhorn, solve_assignment)
from steerflow.couplings import _native

F64 = torch.float64
needs_native = pytest.mark.skipif(not _native.available(), reason="the C extension is not built (no compiler)")
HAVE_POT = importlib.util.find_spec("ot") is not None
SOLVERS = ["auto", "lsa", "auction-lsa",
           pytest.param("emd", marks=pytest.mark.skipif(not HAVE_POT, reason="needs POT"))]


def _explicit(x_0: torch.Tensor, x_1: torch.Tensor, cost: str = "sqeuclidean") -> np.ndarray:
    """The reference cost matrix: explicit float64 differences, no expansion (no cancellation)."""
    a = x_0.detach().double().reshape(len(x_0), -1).numpy()
    b = x_1.detach().double().reshape(len(x_1), -1).numpy()
    C = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return np.sqrt(C) if cost == "euclidean" else C


def _optimum(C: np.ndarray) -> float:
    r, c = linear_sum_assignment(C)
    return float(C[r, c].sum())


def _total(C: np.ndarray, sigma: torch.Tensor) -> float:
    return float(C[sigma.numpy(), np.arange(C.shape[0])].sum())


def _assert_perm(sigma: torch.Tensor, n: int) -> None:
    assert sigma.dtype == torch.long and sigma.shape == (n,)
    assert torch.equal(torch.sort(sigma).values, torch.arange(n))


def _batches(n: int, D: int, offset: float, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-spread source and target batches (the target shifted and narrower), moved by a common ``offset`` in every
    coordinate and multiplied by ``scale``: the optimal permutation does not change."""
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.randn(n, D, generator=g, dtype=F64)
    x_1 = 0.5 * torch.randn(n, D, generator=g, dtype=F64) + 0.3
    return (x_0 + offset) * scale, (x_1 + offset) * scale


# --- far from the origin, any scale --------------------------------------------------------------------------
@pytest.mark.parametrize("D,n,offset", [(2, 40, 1e8), (2, 300, 1e8), (784, 64, 1e6), (784, 64, 1e8), (16, 200, 1e7)])
@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
@pytest.mark.parametrize("solver", SOLVERS)
def test_exact_ot_is_optimal_far_from_the_origin_at_any_scale(D, n, offset, scale, solver):
    """A common offset cancels in ``|a|² + |b|² − 2 a·b`` (offset 1e8 in 2-D: a plan costing 10× the optimum); the
    returned permutation must be optimal to 1e-9 on costs from explicit differences, for every solver."""
    x_0, x_1 = _batches(n, D, offset, scale, seed=n + D)
    for cost in ("sqeuclidean", "euclidean"):
        C = _explicit(x_0, x_1, cost)
        sigma = ExactOT(cost, solver=solver).indices(x_0, x_1)
        _assert_perm(sigma, n)
        assert _total(C, sigma) == pytest.approx(_optimum(C), rel=1e-9, abs=0.0), cost


@pytest.mark.parametrize("offset", [0.0, 1e6, 1e8])
@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_cost_matrix_is_accurate_entry_by_entry(offset, scale):
    """Every entry of the built-in costs to 1e-10 relative of the explicit difference, including near-duplicate pairs
    (distance 1e-6 of the spread) whose expanded form cancels even after centring; large batches use the matrix
    product, small ones explicit differences."""
    for n, D in ((300, 3), (90, 784), (5, 2)):
        x_0, x_1 = _batches(n, D, offset, scale, seed=D)
        noise = torch.randn(n // 3, D, generator=torch.Generator().manual_seed(1), dtype=F64)
        x_1[: n // 3] = x_0[: n // 3] + 1e-6 * scale * noise
        x_1[n // 3] = x_0[n // 3]  # an exact duplicate: zero cost
        for cost in ("sqeuclidean", "euclidean"):
            ref = _explicit(x_0, x_1, cost)
            C = cost_matrix(cost, x_0, x_1).numpy()
            assert C[n // 3, n // 3] == 0.0
            np.testing.assert_allclose(C, ref, rtol=1e-10, atol=0.0)


def test_cost_matrix_batched_and_float32_far_from_the_origin():
    g = torch.Generator().manual_seed(3)
    x_0 = torch.randn(3, 200, 4, generator=g, dtype=F64) + 1e7
    x_1 = torch.randn(3, 200, 4, generator=g, dtype=F64) + 1e7
    C = cost_matrix("sqeuclidean", x_0, x_1, batch_dims=1)
    for k in range(3):
        np.testing.assert_allclose(C[k].numpy(), _explicit(x_0[k], x_1[k]), rtol=1e-10, atol=0.0)
    # float32 inputs far out: the float32 values are the data; their differences are formed in float64
    y_0, y_1 = (x_0[0] / 1e3).float(), (x_1[0] / 1e3).float()
    np.testing.assert_allclose(cost_matrix("sqeuclidean", y_0, y_1).numpy(), _explicit(y_0, y_1), rtol=1e-10, atol=0.0)


@pytest.mark.parametrize("offset,scale", [(0.0, 1e-8), (1e8, 1.0), (1e6, 1e8), (1e8, 1e-8)])
def test_sinkhorn_is_invariant_to_offset_and_scale(offset, scale):
    """With ``normalize_cost`` the entropic plan depends on the costs only through ``C / max C``: a common offset
    and scale leave it unchanged (the costs do not cancel at an offset of 1e8), and its hard rounding is the exact OT
    permutation."""
    n = 60
    x_0, x_1 = _batches(n, 2, 0.0, 1.0, seed=5)
    y_0, y_1 = _batches(n, 2, offset, scale, seed=5)
    sk = Sinkhorn(reg=0.05, tol=1e-10, max_iter=5000)
    P = sk.plan(x_0, x_1)
    Q = sk.plan(y_0, y_1)
    assert bool(sk.last_result.converged)
    torch.testing.assert_close(Q, P, rtol=0.0, atol=1e-9)
    torch.testing.assert_close(Q.sum(0), torch.full((n,), 1 / n, dtype=F64), rtol=0.0, atol=1e-12)
    torch.testing.assert_close(Q.sum(1), torch.full((n,), 1 / n, dtype=F64), rtol=0.0, atol=1e-9)
    C = _explicit(y_0, y_1)
    hard = Sinkhorn(reg=0.05, hard=True).indices(y_0, y_1)
    _assert_perm(hard, n)
    assert _total(C, hard) == pytest.approx(_optimum(C), rel=1e-9, abs=0.0)
    # no plan beats the optimum
    assert float((Q * torch.from_numpy(C)).sum()) >= _optimum(C) / n * (1 - 1e-12)


# --- degenerate batches ----------------------------------------------------------------------------------------
def _degenerate(kind: str, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "x0=x1":
        x = torch.randn(n, 2, generator=g, dtype=F64)
        x[n // 2:] = x[: n - n // 2].clone()  # duplicates too
        return x, x.clone()
    if kind == "x1=x0[perm]":
        x = torch.randint(0, 4, (n, 3), generator=g).to(F64)
        return x, x[torch.randperm(n, generator=g)]
    if kind == "integer-ties":
        return torch.randint(0, 5, (n, 2), generator=g).to(F64), torch.randint(0, 5, (n, 2), generator=g).to(F64)
    if kind == "all-equal":
        return torch.full((n, 2), 3.0, dtype=F64), torch.full((n, 2), 3.0, dtype=F64)
    if kind == "two-points":  # every source on one of two points, every target on one of two others
        s = torch.randint(0, 2, (n, 1), generator=g).to(F64)
        t = torch.randint(0, 2, (n, 1), generator=g).to(F64)
        return torch.cat([s, 0 * s], 1), torch.cat([t + 5, t], 1)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["x0=x1", "x1=x0[perm]", "integer-ties", "all-equal", "two-points"])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 63, 64, 300, 700])
def test_exact_ot_on_degenerate_batches_is_optimal(kind, n):
    g = torch.Generator().manual_seed(n)
    x_0, x_1 = _degenerate(kind, n, g)
    C = _explicit(x_0, x_1)
    best = _optimum(C)
    if kind in ("x0=x1", "x1=x0[perm]"):
        assert best == 0.0
    for solver in ("auto", "lsa") if n <= 300 else ("auto",):
        sigma = ExactOT(solver=solver).indices(x_0, x_1)
        _assert_perm(sigma, n)
        assert _total(C, sigma) == pytest.approx(best, rel=1e-12, abs=0.0), solver
    if kind == "x0=x1":
        a, b = ExactOT()(x_0, x_1)
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("n", [5, 40, 200, 600])
def test_native_solver_certifies_each_path(n):
    """Whatever path the solver takes (row minima already matched, Jonker–Volgenant alone on small or tied
    problems, or the auction warm start), it returns a permutation and column duals proving optimality."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 2))
    cases = {"matched": ((x[:, None] - x[rng.permutation(n)][None]) ** 2).sum(-1),
             "tied": rng.integers(0, 3, (n, n)).astype(float),
             "generic": ((x[:, None] - rng.standard_normal((n, 2))[None] * 0.3) ** 2).sum(-1)}
    seen = set()
    for name, C in cases.items():
        x_, v, stats = _native.assign(C)
        seen.add(stats["path"])
        assert sorted(x_.tolist()) == list(range(n)), name
        u = C[np.arange(n), x_] - v[x_]
        assert float((C - u[:, None] - v[None, :]).min()) >= -1e-12 * max(1.0, np.abs(C).max()), name
        assert C[np.arange(n), x_].sum() == pytest.approx(_optimum(C), rel=1e-12, abs=1e-12), name
    assert 0 in seen and 1 in seen and (n < 64 or 2 in seen)


@needs_native
def test_native_points_form_the_same_costs_and_refuse_overflow():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((50, 3)) + 1e8, rng.standard_normal((50, 3)) + 1e8
    for cost in ("sqeuclidean", "euclidean"):
        _, sigma, _, _ = _native.solve_points(a, b, cost)
        C = _explicit(torch.from_numpy(a), torch.from_numpy(b), cost)
        assert _total(C, torch.from_numpy(sigma)) == pytest.approx(_optimum(C), rel=1e-12, abs=0.0)
    huge = torch.tensor([[1e200, 0.0], [-1e200, 0.0]], dtype=F64)
    for coupling in (ExactOT(), ExactOT(solver="lsa"), ExactOT(lambda p, q: torch.cdist(p, q) ** 2)):
        with pytest.raises(ValueError, match="NaN or inf"):
            coupling(huge, huge.flip(0))


def test_auction_jv_without_the_extension_says_how_to_build_it(monkeypatch):
    """Asked for by name where the C extension is missing, the compiled solver refuses with a RuntimeError (through
    the points and the cost-matrix routes alike); ``"auto"`` falls back to another exact solver."""
    monkeypatch.setattr(_native, "_library", lambda: None)
    g = torch.Generator().manual_seed(4)
    x_0, x_1 = torch.randn(5, 2, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64)
    for call in (lambda: ExactOT(solver="auction-jv").indices(x_0, x_1),
                 lambda: solve_assignment(cost_matrix("sqeuclidean", x_0, x_1), solver="auction-jv")):
        with pytest.raises(RuntimeError, match="not built"):
            call()
    C = _explicit(x_0, x_1)
    sigma = ExactOT().indices(x_0, x_1)
    _assert_perm(sigma, 5)
    assert _total(C, sigma) == pytest.approx(_optimum(C), rel=1e-12, abs=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_exact_ot_low_precision_and_strided_inputs(dtype):
    g = torch.Generator().manual_seed(7)
    x_0 = torch.randn(3, 80, generator=g).to(dtype).T  # (80, 3), not contiguous
    x_1 = (torch.rand(80, 3, generator=g) * 2).to(dtype).requires_grad_(dtype != torch.float16)
    C = _explicit(x_0.float(), x_1.float())
    sigma = ExactOT().indices(x_0, x_1)
    _assert_perm(sigma, 80)
    assert _total(C, sigma) == pytest.approx(_optimum(C), rel=1e-9, abs=0.0)


# --- empty and single-sample batches ----------------------------------------------------------------------------
def _all_couplings():
    return [Independent(), Independent(shuffle=True), ExactOT(), ExactOT(solver="lsa"), ExactOT("euclidean"),
            Sinkhorn(), Sinkhorn(hard=True), ConditionalOT(), ReflowCoupling(lambda x, t: torch.ones_like(x), steps=2)]


def test_every_registered_coupling_is_covered():
    assert {type(c) for c in _all_couplings()} == set(COUPLINGS.values())


@pytest.mark.parametrize("shape", [(0, 2), (0, 3, 4), (4, 0), (3, 2, 0)])
def test_empty_batches_are_refused_with_a_value_error(shape):
    """An empty batch is no empirical distribution (nothing carries its mass 1): every coupling refuses it with one
    ValueError that names the shape, through both entry points."""
    x = torch.zeros(shape)
    for coupling in _all_couplings():
        with pytest.raises(ValueError, match=r"at least one sample.*" + re.escape(str(shape))):
            coupling(x, x.clone())
        if hasattr(coupling, "indices"):
            with pytest.raises(ValueError, match="at least one sample"):
                coupling.indices(x, x.clone())
    sk = Sinkhorn()
    with pytest.raises(ValueError, match="at least one sample"):
        sk.plan(x, x.clone())
    with pytest.raises(ValueError, match="at least one sample"):
        sk.solve(torch.zeros(2, *shape), torch.zeros(2, *shape), batch_dims=1)
    for C in (torch.zeros(0, 0), torch.zeros(3, 0), torch.zeros(2, 0, 4)):
        with pytest.raises(ValueError, match="at least one row and one column"):
            sinkhorn(C)


def test_empty_cost_matrix_and_assignment_are_empty():
    """Below the couplings, the empty problem has one answer: no costs, the empty permutation."""
    C = cost_matrix("sqeuclidean", torch.zeros(0, 2), torch.zeros(0, 2))
    assert C.shape == (0, 0)
    for solver in ("auto", "lsa", "auction-lsa"):
        sigma = solve_assignment(C, solver=solver)
        assert sigma.shape == (0,) and sigma.dtype == torch.long


@pytest.mark.parametrize("shape", [(1, 2), (1, 3, 4), (1, 1)])
def test_single_sample_batches(shape):
    g = torch.Generator().manual_seed(0)
    x_0, x_1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    for coupling in _all_couplings():
        a, b = coupling(x_0, x_1, generator=g)
        assert a.shape == b.shape == shape
        if not isinstance(coupling, ReflowCoupling):
            assert torch.equal(a, x_0) and torch.equal(b, x_1)
            assert coupling.indices(x_0, x_1, generator=g).tolist() == [0]
    assert torch.equal(ConditionalOT().indices(x_0, x_1, labels=torch.tensor([3]), generator=g), torch.tensor([0]))
    P = Sinkhorn().plan(x_0, x_1)
    torch.testing.assert_close(P, torch.ones(1, 1, dtype=F64))
    assert solve_assignment(torch.zeros(1, 1)).tolist() == [0]
