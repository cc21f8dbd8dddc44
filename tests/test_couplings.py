"""Couplings: exact OT is a true, optimal permutation; Sinkhorn's plan has the right marginals and tends to
exact OT; conditional OT stays within labels; reflow with the exact mixture velocity transports to the mixture."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from steerflow.couplings import (COUPLINGS, ConditionalOT, ExactOT, Independent, ReflowCoupling, Sinkhorn,
                                 cost_matrix, get_coupling, sinkhorn, solve_assignment)
from steerflow.couplings import _native
from steerflow.data import GaussianMixture

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _total(C: torch.Tensor, sigma: torch.Tensor) -> float:
    return float(C[sigma, torch.arange(C.shape[0])].sum())


def _lsa_total(C: torch.Tensor) -> float:
    r, c = linear_sum_assignment(C.numpy())
    return float(C.numpy()[r, c].sum())


def _is_perm(sigma: torch.Tensor, n: int) -> bool:
    return sigma.shape == (n,) and torch.equal(torch.sort(sigma).values, torch.arange(n))


# --- exact OT ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 5, 7])
@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
def test_exact_ot_matches_brute_force(n, cost):
    g = _gen(n)
    for _ in range(3):
        x_0, x_1 = torch.randn(n, 3, generator=g, dtype=F64), torch.randn(n, 3, generator=g, dtype=F64) + 1
        C = cost_matrix(cost, x_0, x_1)
        best = min(sum(float(C[p[j], j]) for j in range(n)) for p in itertools.permutations(range(n)))
        sigma = ExactOT(cost).indices(x_0, x_1)
        assert _is_perm(sigma, n)
        assert _total(C, sigma) == pytest.approx(best, rel=1e-12)
        # explicit ground truth for the squared distance
        if cost == "sqeuclidean":
            direct = ((x_0[sigma] - x_1) ** 2).sum()
            assert float(direct) == pytest.approx(best, rel=1e-12)


needs_native = pytest.mark.skipif(not _native.available(),
                                  reason="the C extension is not built (no compiler); .ci/run requires it")


@pytest.mark.parametrize("solver,n", [("lsa", 300), ("auction-lsa", 40), ("auction-lsa", 300), ("auto", 800),
                                      pytest.param("auction-jv", 40, marks=needs_native),
                                      pytest.param("auction-jv", 1100, marks=needs_native)])
def test_exact_ot_optimal_vs_scipy(solver, n):
    g = _gen(n)
    for kind in ("gauss", "uniform-cost", "clustered"):
        if kind == "uniform-cost":
            C = torch.rand(n, n, generator=g, dtype=F64) * 10  # a generic (non-metric) assignment problem
            sigma = solve_assignment(C, solver=solver)
        else:
            x_0 = torch.randn(n, 2, generator=g, dtype=F64)
            x_1 = torch.randn(n, 2, generator=g, dtype=F64) * 0.3
            if kind == "clustered":
                x_1 = x_1 + 3 * torch.sign(torch.randn(n, 1, generator=g, dtype=F64))
            C = cost_matrix("sqeuclidean", x_0, x_1)
            sigma = ExactOT(solver=solver).indices(x_0, x_1)
        assert _is_perm(sigma, n)
        assert _total(C, sigma) == pytest.approx(_lsa_total(C), rel=1e-9)


def _certified_optimal(C: np.ndarray, x: np.ndarray, v: np.ndarray) -> float:
    """Largest violation of dual feasibility: with u_i = C[i, x_i] − v[x_i] (tight on the matching),
    C_ij − u_i − v_j ≥ 0 everywhere proves the matching optimal (LP duality)."""
    u = C[np.arange(len(x)), x] - v[x]
    return float(-(C - u[:, None] - v[None, :]).min())


@needs_native
@pytest.mark.parametrize("n", [1, 2, 3, 9, 64, 255, 513, 2049])
def test_auction_jv_certifies_its_optimum(n):
    """Every solve returns a permutation and column duals that certify optimality, on costs with ties
    (small integers, constant), opposite signs, a huge offset, one outlying entry and geometric 2-D batches;
    up to n = 600 the total also equals scipy's exact solve; candidate lists and the auction are warm starts
    only (any setting, same total)."""
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal((n, 2)), rng.standard_normal((n, 2)) * 0.3 + np.array([2.0, 0.0])
    geometric = ((a[:, None] - b[None]) ** 2).sum(-1)
    cases = {"geometric": geometric, "ties": rng.integers(0, 4, (n, n)).astype(float), "constant": np.ones((n, n)),
             "negative": -1e6 * geometric, "offset": geometric + 1e9, "outlier": geometric.copy()}
    cases["outlier"][0, 0] = 1e12  # one forbidding entry: the ε schedule must not scale with it
    for name, C in cases.items():
        best = None
        if n <= 600:  # beyond, scipy's cold solve takes seconds: the certificate alone proves optimality
            r, c = linear_sum_assignment(C)
            best = C[r, c].sum()
        scale = max(1.0, np.abs(C).max() if name != "outlier" else np.abs(geometric).max())
        for kw in ({}, {"candidates": 0}, {"candidates": 3}, {"eps_start": 0.0}):
            if n > 600 and kw:
                continue  # the plain Jonker–Volgenant start is quadratic per path: keep the suite quick
            x, v, _ = _native.assign(C, **kw)
            assert sorted(x.tolist()) == list(range(n)), (name, kw)
            if best is not None:
                assert C[np.arange(n), x].sum() == pytest.approx(best, rel=1e-12, abs=1e-12 * scale * n), (name, kw)
            assert _certified_optimal(C, x, v) <= 1e-12 * scale, (name, kw)


@needs_native
def test_auction_jv_is_the_default_and_rejects_bad_input(monkeypatch):
    g = _gen(5)
    x_0, x_1 = torch.randn(300, 2, generator=g, dtype=F64), torch.randn(300, 2, generator=g, dtype=F64) + 1
    C = cost_matrix("sqeuclidean", x_0, x_1)
    calls = []
    for name in ("solve", "solve_points"):  # a cost matrix, or points whose costs it forms itself
        solve = getattr(_native, name)
        monkeypatch.setattr(_native, name, lambda *a, solve=solve, **k: calls.append(1) or solve(*a, **k))
    assert _is_perm(ExactOT().indices(x_0, x_1), 300)
    assert calls == [1]  # "auto" took the compiled solver
    monkeypatch.undo()
    # a continuous problem has a unique optimum: every exact solver returns the same permutation
    assert torch.equal(solve_assignment(C, solver="auction-jv"), solve_assignment(C, solver="lsa"))
    with pytest.raises(ValueError, match="square"):
        _native.assign(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN or inf"):
        _native.assign(np.array([[0.0, np.nan], [1.0, 2.0]]))


def test_exact_ot_emd_backend_is_optimal():
    pytest.importorskip("ot")
    g = _gen(11)
    for n in (1, 6, 300):
        x_0, x_1 = torch.randn(n, 2, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64) * 0.5 + 1
        C = cost_matrix("sqeuclidean", x_0, x_1)
        sigma = ExactOT(solver="emd").indices(x_0, x_1)
        assert _is_perm(sigma, n)
        assert _total(C, sigma) == pytest.approx(_lsa_total(C), rel=1e-9)


def test_exact_ot_emd_through_pots_public_wrapper(monkeypatch):
    """Where POT's compiled entry point cannot be imported, ``ot.emd`` serves, with the same optimum."""
    ot = pytest.importorskip("ot")
    import sys
    import types

    monkeypatch.setitem(sys.modules, "ot.lp.emd_wrap", types.ModuleType("ot.lp.emd_wrap"))  # no emd_c
    calls = []
    emd = ot.emd
    monkeypatch.setattr(ot, "emd", lambda *a, **k: calls.append(1) or emd(*a, **k))
    g = _gen(12)
    x_0, x_1 = torch.randn(200, 2, generator=g, dtype=F64), torch.randn(200, 2, generator=g, dtype=F64) + 1
    C = cost_matrix("sqeuclidean", x_0, x_1)
    sigma = ExactOT(solver="emd").indices(x_0, x_1)
    assert calls == [1]  # the public wrapper served
    assert _is_perm(sigma, 200)
    assert _total(C, sigma) == pytest.approx(_lsa_total(C), rel=1e-9)


def test_exact_ot_preserves_both_marginals_and_keeps_x1():
    g = _gen(1)
    x_0 = torch.randn(200, 2, 3, generator=g)  # (b, *d) with d of rank 2
    x_1 = torch.rand(200, 2, 3, generator=g) * 4
    a, b = ExactOT()(x_0, x_1)
    assert torch.equal(b, x_1)
    key = lambda x: x.reshape(x.shape[0], -1)[:, 0]  # noqa: E731 — continuous, so unique per row
    assert torch.equal(torch.sort(key(a)).values, torch.sort(key(x_0)).values)
    assert torch.unique(a.reshape(200, -1), dim=0).shape[0] == 200  # every pair unique
    # OT never increases the transport cost of the identity pairing
    assert ((a - b) ** 2).sum() <= ((x_0 - x_1) ** 2).sum()


def test_exact_ot_callable_cost_and_float32():
    g = _gen(2)
    x_0, x_1 = torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g)

    def l1(a, b):
        return (a[:, None, :] - b[None, :, :]).abs().sum(-1)

    sigma = ExactOT(l1).indices(x_0, x_1)
    C = l1(x_0.double(), x_1.double())
    assert _total(C, sigma) == pytest.approx(_lsa_total(C), rel=1e-9)
    assert ExactOT().indices(x_0, x_1).device == x_0.device


# --- Sinkhorn ------------------------------------------------------------------------------------
def test_sinkhorn_plan_marginals_and_diagnostics():
    g = _gen(3)
    x_0, x_1 = torch.randn(60, 2, generator=g, dtype=F64), torch.randn(60, 2, generator=g, dtype=F64) + 2
    sk = Sinkhorn(reg=0.05, tol=1e-8)
    P = sk.plan(x_0, x_1)
    res = sk.last_result
    assert bool(res.converged) and int(res.n_iter) < sk.max_iter
    assert (P >= 0).all()
    assert torch.allclose(P.sum(0), torch.full((60,), 1 / 60, dtype=F64), atol=1e-12)  # exact after g-step
    assert float((P.sum(1) - 1 / 60).abs().sum()) < 1e-8
    not_conv = Sinkhorn(reg=0.001, max_iter=3, tol=1e-12)
    not_conv.plan(x_0, x_1)
    assert not bool(not_conv.last_result.converged) and int(not_conv.last_result.n_iter) == 3


def test_sinkhorn_cost_tends_to_exact_ot():
    g = _gen(4)
    n = 40
    x_0, x_1 = torch.randn(n, 2, generator=g, dtype=F64), torch.rand(n, 2, generator=g, dtype=F64) * 3
    C = cost_matrix("sqeuclidean", x_0, x_1)
    ot = _lsa_total(C) / n
    gaps = []
    for reg in (0.3, 0.1, 0.03, 0.01, 0.003):
        P = Sinkhorn(reg=reg, max_iter=20000, tol=1e-9, check_every=10).plan(x_0, x_1)
        gaps.append(float((P * C).sum()) - ot)
    assert all(gap >= -1e-9 for gap in gaps)  # no plan beats the optimum
    assert all(a > b for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-2 * ot


def test_sinkhorn_batched_equals_per_problem():
    g = _gen(5)
    x_0 = torch.randn(3, 25, 2, generator=g, dtype=F64)
    x_1 = torch.randn(3, 25, 2, generator=g, dtype=F64) * torch.tensor([0.5, 1.0, 3.0], dtype=F64)[:, None, None]
    sk = Sinkhorn(reg=0.02, tol=1e-7)
    res = sk.solve(x_0, x_1, batch_dims=1)
    assert res.plan.shape == (3, 25, 25)
    for k in range(3):
        one = sk.solve(x_0[k], x_1[k])
        assert int(one.n_iter) == int(res.n_iter[k])
        assert torch.allclose(one.plan, res.plan[k], atol=1e-14, rtol=0)
    assert len(set(res.n_iter.tolist())) > 1  # the problems really stopped on their own


def test_sinkhorn_coupling_draws_and_hard_rounding():
    g = _gen(6)
    n = 50
    x_0, x_1 = torch.randn(n, 2, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64) + 1
    C = cost_matrix("sqeuclidean", x_0, x_1)
    sigma_exact = ExactOT().indices(x_0, x_1)
    # hard rounding of -log P is the exact OT permutation
    hard = Sinkhorn(reg=0.1, hard=True).indices(x_0, x_1)
    assert _is_perm(hard, n) and _total(C, hard) == pytest.approx(_total(C, sigma_exact), rel=1e-9)
    # a nearly unregularised plan concentrates on the optimal permutation: draws follow it
    y_0 = 3 * torch.randn(n, 2, generator=g, dtype=F64)
    y_1 = y_0[torch.randperm(n, generator=g)] + 0.05 * torch.randn(n, 2, generator=g, dtype=F64)
    soft = Sinkhorn(reg=0.02, normalize_cost=False, max_iter=1000, check_every=10).indices(y_0, y_1, generator=_gen(0))
    assert (soft == ExactOT().indices(y_0, y_1)).float().mean() > 0.95
    # draws are seeded and follow the plan's columns (with replacement)
    sk = Sinkhorn(reg=0.5)
    s1 = sk.indices(x_0, x_1, generator=_gen(7))
    s2 = sk.indices(x_0, x_1, generator=_gen(7))
    assert torch.equal(s1, s2)
    P = sk.plan(x_0[:3], x_1[:3])
    draws = torch.stack([sk.indices(x_0[:3], x_1[:3], generator=_gen(s)) for s in range(400)])
    freq = torch.stack([(draws[:, 0] == i).double().mean() for i in range(3)])
    assert torch.allclose(freq, P[:, 0] / P[:, 0].sum(), atol=0.08)


# --- independent / conditional --------------------------------------------------------------------
def test_independent_and_seeds():
    g = _gen(8)
    x_0, x_1 = torch.randn(20, 2, generator=g), torch.randn(20, 2, generator=g)
    a, b = Independent()(x_0, x_1)
    assert torch.equal(a, x_0) and torch.equal(b, x_1)
    s1 = Independent(shuffle=True).indices(x_0, x_1, generator=_gen(1))
    s2 = Independent(shuffle=True).indices(x_0, x_1, generator=_gen(1))
    assert torch.equal(s1, s2) and _is_perm(s1, 20) and not torch.equal(s1, torch.arange(20))


def test_conditional_ot_respects_labels_and_is_optimal_within_groups():
    g = _gen(9)
    n = 90
    labels = torch.randint(0, 4, (n,), generator=g)
    x_1 = torch.randn(n, 2, generator=g, dtype=F64) + 4 * labels[:, None].to(F64)
    x_0 = torch.randn(n, 2, generator=g, dtype=F64)
    coupling = ConditionalOT()
    sigma = coupling.indices(x_0, x_1, labels=labels, generator=_gen(3))
    assert _is_perm(sigma, n)
    assert torch.equal(sigma, coupling.indices(x_0, x_1, labels=labels, generator=_gen(3)))  # seeded
    assert not torch.equal(sigma, coupling.indices(x_0, x_1, labels=labels, generator=_gen(4)))
    for c in labels.unique():
        tgt = torch.nonzero(labels == c).squeeze(1)
        src = sigma[tgt]  # the source subset this class received, optimally paired within the class
        C = cost_matrix("sqeuclidean", x_0[src], x_1[tgt])
        assert _total(C, torch.arange(len(tgt))) == pytest.approx(_lsa_total(C), rel=1e-9)
    a, b = coupling(x_0, x_1, labels=labels, generator=_gen(3))
    assert torch.equal(a, x_0[sigma]) and torch.equal(b, x_1)
    # vector conditions: equal rows form one group
    cond = torch.stack([labels % 2, labels // 2], 1).to(F64)
    sig2 = coupling.indices(x_0, x_1, labels=cond, generator=_gen(3))
    assert _is_perm(sig2, n)
    # without labels it is the base coupling
    assert torch.equal(coupling.indices(x_0, x_1), ExactOT().indices(x_0, x_1))


# --- reflow --------------------------------------------------------------------------------------
def test_reflow_with_exact_mixture_velocity_reaches_the_mixture():
    gm = GaussianMixture([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [[[0.3, 0.1], [0.1, 0.2]], [[0.5, 0.0], [0.0, 0.1]]])
    n = 4000
    x_0 = torch.randn(n, 2, generator=_gen(10), dtype=F64)
    dummy = torch.zeros_like(x_0)
    a, x_1 = ReflowCoupling(gm.velocity, steps=24, method="rk4", batch_size=1500)(x_0, dummy)
    assert torch.equal(a, x_0) and x_1.shape == x_0.shape
    w, mu, S = gm.weights, gm.means, gm.covs
    mean = (w[:, None] * mu).sum(0)
    cov = (w[:, None, None] * (S + mu[:, :, None] * mu[:, None, :])).sum(0) - mean[:, None] * mean[None, :]
    emp_mean = x_1.mean(0)
    emp_cov = torch.cov(x_1.T)
    se = (torch.diagonal(cov) / n).sqrt()
    assert ((emp_mean - mean).abs() < 4 * se).all()
    assert torch.allclose(emp_cov, cov, atol=0.12)
    # the deterministic map gives the same pairs again, and it differs from the given x_1
    _, x_1b = ReflowCoupling(gm.velocity, steps=24, method="rk4")(x_0, dummy)
    assert torch.allclose(x_1, x_1b, atol=1e-10)


def test_reflow_passes_labels_as_condition():
    seen = []

    def v(x, t, cond=None):
        seen.append(cond)
        return torch.zeros_like(x) + cond[:, None].to(x.dtype)

    x_0 = torch.zeros(6, 2)
    _, x_1 = ReflowCoupling(v, steps=2, batch_size=4)(x_0, x_0, labels=torch.arange(6))
    assert torch.allclose(x_1[:, 0], torch.arange(6, dtype=torch.float32))
    with pytest.raises(ValueError, match="both"):
        ReflowCoupling(v, steps=2, cond=torch.ones(6))(x_0, x_0, labels=torch.arange(6))


# --- registry and errors ----------------------------------------------------------------------------
def test_registry_and_errors():
    assert {"independent", "exact-ot", "sinkhorn", "conditional-ot"} <= set(COUPLINGS)
    assert isinstance(get_coupling("sinkhorn", reg=0.1), Sinkhorn)
    assert isinstance(get_coupling("exact-ot", cost="euclidean"), ExactOT)
    with pytest.raises(ValueError, match="unknown coupling 'ot'"):
        get_coupling("ot")
    with pytest.raises(ValueError, match="unknown cost"):
        ExactOT("manhattan")
    with pytest.raises(ValueError, match="unknown solver"):
        ExactOT(solver="hungarian")
    x = torch.randn(8, 2)
    for coupling in (ExactOT(), Sinkhorn(), Independent(), ConditionalOT()):
        with pytest.raises(ValueError, match="same shape"):
            coupling(x, torch.randn(7, 2))
        with pytest.raises(ValueError, match="same shape"):
            coupling(x, torch.randn(8, 3))
        bad = x.clone()
        bad[3, 1] = math.nan
        with pytest.raises(ValueError, match="x_0 holds NaN"):
            coupling(bad, x)
        with pytest.raises(ValueError, match="x_1 holds NaN"):
            coupling(x, bad)
        with pytest.raises(ValueError, match="batch dimension"):
            coupling(torch.randn(8), torch.randn(8))
        with pytest.raises(ValueError, match="labels must have shape"):
            coupling(x, x, labels=torch.zeros(5))
        with pytest.raises(TypeError, match="torch.Tensor"):
            coupling(np.zeros((8, 2)), x)
    with pytest.raises(ValueError, match="square"):
        solve_assignment(torch.rand(3, 4))
    with pytest.raises(ValueError, match="shape"):
        ExactOT(lambda a, b: torch.zeros(2, 2))(x, x)
    with pytest.raises(ValueError, match="reg must be positive"):
        sinkhorn(torch.rand(3, 3), reg=0.0)
