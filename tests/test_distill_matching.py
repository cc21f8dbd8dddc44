"""Distillation with a distribution-matching term: the differentiable energy distance and ``distill(match=)``."""
from __future__ import annotations

import pytest
import torch

from steerflow.metrics import energy_distance, w2_gaussian
from steerflow.models import build_model
from steerflow.straighten import Pairs, distill, one_step
from steerflow.straighten.matching import (GENERATED_PER_DATA, energy_distance_loss, full_batch_ot_energy_loss,
                                          get_matching_loss, minibatch_ot_energy_loss,
                                          nearest_neighbour_energy_loss, ot_nn_energy_loss)




@pytest.mark.parametrize("unbiased", [False, True])
def test_energy_loss_equals_the_metric(unbiased):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 3, generator=g, dtype=torch.float64)
    y = 0.7 * torch.randn(90, 3, generator=g, dtype=torch.float64) + 0.3
    got = float(energy_distance_loss(x, y, unbiased=unbiased))
    assert got == pytest.approx(energy_distance(x, y, unbiased=unbiased), rel=1e-10, abs=1e-12)


def test_energy_loss_is_zero_on_identical_sets_with_finite_gradient():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(64, 2, generator=g, dtype=torch.float64)
    x = torch.cat([y[:32], y[:32]]).clone().requires_grad_(True)  # duplicated points: |x_i - x_k| = 0 off the diagonal
    energy_distance_loss(x, y).backward()
    assert torch.isfinite(x.grad).all()
    same = y.clone().requires_grad_(True)
    v = energy_distance_loss(same, y, unbiased=False)
    assert float(v.detach()) == pytest.approx(0.0, abs=1e-12)
    v.backward()
    assert torch.isfinite(same.grad).all()
    # D² >= 0 (V-statistic), > 0 for different sets, and the U-statistic of equal-law samples is near 0
    assert float(energy_distance_loss(y + 1.0, y, unbiased=False)) > 0.5
    u = float(energy_distance_loss(torch.randn(400, 2, generator=g), torch.randn(400, 2, generator=g)))
    assert abs(u) < 0.02


def test_minibatch_ot_energy_is_unbiased_at_equality_and_positive_otherwise():
    # Same law: E[D²_OT] = 0 (all terms compare sets of equal size). A shift δ of x changes every cross term by
    # exactly |δ|² + 2 δ·(x̄ - ȳ) (the plan does not depend on δ), so E[D²_OT] = 2 |δ|² = 2.
    g = torch.Generator().manual_seed(7)
    same = [float(minibatch_ot_energy_loss(torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)))
            for _ in range(40)]
    shifted = [float(minibatch_ot_energy_loss(torch.randn(64, 2, generator=g) + torch.tensor([1.0, 0.0]),
                                              torch.randn(64, 2, generator=g))) for _ in range(40)]
    assert abs(sum(same) / len(same)) < 0.1
    assert sum(shifted) / len(shifted) == pytest.approx(2.0, abs=0.2)
    with pytest.raises(ValueError, match="at least 4"):
        minibatch_ot_energy_loss(torch.randn(3, 2), torch.randn(3, 2))


def test_nearest_neighbour_energy_is_unbiased_at_equality_and_restoring_otherwise():
    # Same law: h(X_1, X_2) and h(X_1, Y) are equal in law, so E[N] = 0 and the mean gradient w.r.t. a shift μ and a
    # log-scale of the generated points is 0 (without the stop-gradient on the reference batch the scale gradient
    # would not vanish: h(sX_1, sX_2) = s² h(X_1, X_2)); shifted by δ, the nearest-data pull dominates and the
    # mean gradient points along δ (gradient descent moves the points back).
    g = torch.Generator().manual_seed(11)
    delta = torch.tensor([0.3, 0.0], dtype=torch.float64)

    def draw(shift):
        mu = shift.clone().requires_grad_(True)
        log_s = torch.zeros((), dtype=torch.float64, requires_grad=True)
        x = log_s.exp() * torch.randn(2 * 64, 2, generator=g, dtype=torch.float64) + mu
        loss = nearest_neighbour_energy_loss(x, torch.randn(64, 2, generator=g, dtype=torch.float64))
        loss.backward()
        return float(loss.detach()), torch.cat([mu.grad, log_s.grad[None]])

    n = 300
    same = [draw(torch.zeros(2, dtype=torch.float64)) for _ in range(n)]
    vals = torch.tensor([v for v, _ in same])
    grads = torch.stack([gr for _, gr in same])
    assert abs(float(vals.mean())) < 3 * float(vals.std() / n ** 0.5)
    assert (grads.mean(0).abs() < 3 * grads.std(0) / n ** 0.5).all()
    shifted = torch.stack([draw(delta)[1] for _ in range(n)]).mean(0)
    assert float(shifted[0]) > 0.05 and abs(float(shifted[1])) < 0.03
    # the nn term's weight: 0 is ot-energy-full exactly; bad weights and too few generated points are refused
    x, y = torch.randn(40, 2, generator=g), torch.randn(20, 2, generator=g)
    assert float(ot_nn_energy_loss(x, y, nn_weight=0.0)) == float(full_batch_ot_energy_loss(x, y))
    assert float(ot_nn_energy_loss(x, y, nn_weight=2.0)) == pytest.approx(
        float(full_batch_ot_energy_loss(x, y) + 2.0 * nearest_neighbour_energy_loss(x, y)), rel=1e-6)
    with pytest.raises(ValueError, match="nn_weight"):
        ot_nn_energy_loss(x, y, nn_weight=-1.0)
    with pytest.raises(ValueError, match="at least 2m generated"):
        nearest_neighbour_energy_loss(x[:30], y)


def test_nearest_neighbour_energy_pulls_a_gap_point_to_the_data():
    # Data: two clusters at x = ±3; generated: the same clusters plus 10 % of the points spread through the gap
    # (the second batch's gap points half a spacing from the first's). A gap point's nearest generated neighbour is
    # a nearby gap point, its nearest data point is in a cluster: the pull wins and moves it towards the nearer
    # cluster, while points inside the clusters feel far less.
    g = torch.Generator().manual_seed(12)

    def clusters(n):
        side = torch.where(torch.rand(n, generator=g) < 0.5, -3.0, 3.0)
        return torch.stack([side, torch.zeros(n)], 1) + 0.3 * torch.randn(n, 2, generator=g)

    m, k = 200, 20
    gap = torch.stack([torch.linspace(-1.5, 1.5, k), torch.zeros(k)], 1)
    gap_2 = gap + torch.tensor([1.5 / (k - 1), 0.0])
    x = torch.cat([torch.cat([clusters(m - k), gap]), torch.cat([clusters(m - k), gap_2])]).requires_grad_(True)
    nearest_neighbour_energy_loss(x, clusters(m)).backward()
    step = -x.grad[m - k:m, 0]  # the descent direction of the first batch's gap points along x
    left, right = gap[:, 0] < -0.2, gap[:, 0] > 0.2
    assert (step[left] < 0).all() and (step[right] > 0).all()
    inside = x.grad[: m - k].norm(dim=1).mean()
    assert float(x.grad[m - k:m].norm(dim=1).mean()) > 3 * float(inside)


@pytest.mark.parametrize("match", ["energy", "ot-energy", "ot-energy-full", "ot-energy-nn"])
def test_matching_gradient_moves_a_shifted_gaussian_to_the_target(match):
    # G(z) = s z + μ with z ~ N(0, I), target N(m, I): the discrepancies are minimised only at μ = m, s = 1.
    loss_fn = get_matching_loss(match)
    n_gen = 128 * GENERATED_PER_DATA[match]  # ot-energy-full/-nn: two generated batches per data batch
    g = torch.Generator().manual_seed(2)
    m = torch.tensor([2.0, -1.0])
    mu = torch.zeros(2, requires_grad=True)
    log_s = torch.tensor(-0.7, requires_grad=True)
    opt = torch.optim.Adam([mu, log_s], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 150)  # annealing removes the minibatch noise at the end
    for _ in range(150):
        loss = loss_fn(log_s.exp() * torch.randn(n_gen, 2, generator=g) + mu, torch.randn(128, 2, generator=g) + m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert float((mu.detach() - m).norm()) < 0.1
    assert abs(float(log_s.detach().exp()) - 1.0) < 0.05


def _gaussian_w2_of(x: torch.Tensor, m: torch.Tensor, S: torch.Tensor) -> float:
    """W2 between the Gaussian fitted to ``x`` and ``N(m, S)`` (closed form; the maps here are affine)."""
    x = x.double()
    return w2_gaussian(x.mean(0), torch.cov(x.T), m.double(), S.double())


@pytest.mark.parametrize("match", ["energy", "ot-energy", "ot-energy-full", "ot-energy-nn"])
def test_matching_corrects_a_wrong_teacher(match):
    # Teacher pairs come from a WRONG affine map x_1 = μ' + s' x_0; the data are N(μ, s² I). Regression alone
    # copies the teacher (W2 ≈ closed-form teacher error); adding the energy term moves the student to the data.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    mu, s = torch.tensor([1.0, -0.5]), 0.6
    mu_t, s_t = torch.tensor([1.6, 0.0]), 0.9
    x_0 = torch.randn(4000, 2, generator=g)
    pairs = Pairs(x_0, mu_t + s_t * x_0)

    def data(n, generator):
        return mu + s * torch.randn(n, 2, generator=generator)

    teacher_err = w2_gaussian(mu_t, s_t**2 * torch.eye(2), mu, s**2 * torch.eye(2))
    common = dict(pairs=pairs, train_steps=250, batch_size=128, lr=3e-3, seed=0)
    plain = distill(model=build_model("mlp-selu", dim=2, width=32), **common)
    matched = distill(model=build_model("mlp-selu", dim=2, width=32), match=match, data=data, match_weight=5.0,
                      regression_weight=0.1, match_batch_size=64 if GENERATED_PER_DATA[match] == 2 else None, **common)
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        w_plain = _gaussian_w2_of(one_step(plain.model, z), mu, s**2 * torch.eye(2))
        w_matched = _gaussian_w2_of(one_step(matched.model, z), mu, s**2 * torch.eye(2))
    assert w_plain == pytest.approx(teacher_err, abs=0.15)
    assert w_matched < 0.5 * w_plain


def test_energy_alone_fine_tunes_a_student_and_accepts_a_data_tensor():
    g = torch.Generator().manual_seed(5)
    x_0 = torch.randn(2000, 2, generator=g)
    pairs = Pairs(x_0, x_0 + 1.0)  # teacher: shift by (1, 1); data: shift by (-1, 2)
    target = torch.randn(3000, 2, generator=g) + torch.tensor([-1.0, 2.0])
    torch.manual_seed(1)
    student = distill(model=build_model("mlp-selu", dim=2, width=32), pairs=pairs, train_steps=150, batch_size=128,
                      lr=3e-3, seed=0).model
    tuned = distill(model=student, pairs=pairs, match="energy", data=target, regression_weight=0.0,
                    train_steps=300, batch_size=128, lr=3e-3, seed=1).model
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        shift = (one_step(tuned, z) - z).mean(0)
    torch.testing.assert_close(shift, torch.tensor([-1.0, 2.0]), atol=0.25, rtol=0)


def test_matching_alone_solves_no_teacher_ode():
    """With regression_weight=0 only x_0 is read: the teacher is never integrated (a teacher that fails when
    called proves it), and the student still moves towards the data."""
    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x, t, cond=None):
            raise AssertionError("the teacher ODE was solved")

    target = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2)) + 2.0
    torch.manual_seed(0)
    res = distill(Exploding(), source=lambda n, generator: torch.randn(n, 2, generator=generator), n_pairs=256,
                  model=build_model("mlp-selu", dim=2, width=32), match="energy", data=target, regression_weight=0.0,
                  train_steps=200, batch_size=128, lr=3e-3, seed=0)
    z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        shift = (one_step(res.model, z) - z).mean(0)
    torch.testing.assert_close(shift, torch.tensor([2.0, 2.0]), atol=0.3, rtol=0)


def test_data_sources_tensor_callable_and_dataset():
    from steerflow.data import load_dataset
    from steerflow.straighten import as_data_sampler

    g = torch.Generator().manual_seed(8)
    table = torch.arange(10.0)[:, None].repeat(1, 2)
    rows = as_data_sampler(table)(50, g)
    assert rows.shape == (50, 2) and set(rows[:, 0].tolist()) <= set(range(10))
    assert as_data_sampler(lambda n, generator: torch.zeros(n, 2))(3, g).shape == (3, 2)
    labelled = as_data_sampler(lambda n, generator: (torch.ones(n, 2), torch.zeros(n, dtype=torch.long)))
    assert torch.equal(labelled(4, g), torch.ones(4, 2))  # labels are dropped, as for .sample
    with pytest.raises(TypeError, match="must return a tensor"):
        as_data_sampler(lambda n, generator: [1, 2])(4, g)
    moons = as_data_sampler(load_dataset("moons"))
    assert moons(7, torch.Generator().manual_seed(0)).shape == (7, 2)
    torch.testing.assert_close(moons(7, torch.Generator().manual_seed(0)), moons(7, torch.Generator().manual_seed(0)))


def test_bad_inputs_name_the_argument():
    pairs = Pairs(torch.randn(64, 2), torch.randn(64, 2))
    model = build_model("mlp-selu", dim=2, width=8)
    data = torch.randn(64, 2)
    kw = dict(pairs=pairs, model=model, train_steps=1, batch_size=8)
    with pytest.raises(ValueError, match="match_weight"):
        distill(match="energy", data=data, match_weight=-1.0, **kw)
    with pytest.raises(ValueError, match="regression_weight"):
        distill(match="energy", data=data, regression_weight=float("nan"), **kw)
    with pytest.raises(ValueError, match="data"):
        distill(match="energy", data=None, **kw)
    with pytest.raises(ValueError, match="data"):
        distill(data=data, **kw)  # data without match
    with pytest.raises(ValueError, match="match"):
        distill(match="wasserstein", data=data, **kw)
    with pytest.raises(TypeError, match="data"):
        distill(match="energy", data=3.0, **kw)
    with pytest.raises(ValueError, match="nothing to minimise"):
        distill(match="energy", data=data, match_weight=0.0, regression_weight=0.0, **kw)
    with pytest.raises(ValueError, match="regression_weight"):
        distill(regression_weight=0.0, **kw)
    with pytest.raises(ValueError, match="match_batch_size"):
        distill(match="energy", data=data, match_batch_size=1, **kw)
    with pytest.raises(ValueError, match="batch_size >= 2"):  # two generated batches per data batch
        distill(match="ot-energy-full", data=data, match_batch_size=8, **kw)
    with pytest.raises(ValueError, match="needs match_batch_size"):
        distill(match="ot-energy-full", data=data, **kw)
    with pytest.raises(ValueError, match="only 64 pairs"):  # a minibatch cannot hold more pairs than there are
        distill(match="ot-energy-full", data=data, match_batch_size=40, **{**kw, "batch_size": 80})
    # the other losses take batches of any sizes: more data points than pairs per step stays allowed
    distill(match="ot-energy", data=data, match_batch_size=16, **kw)
    with pytest.raises(ValueError, match="match_memory must be"):
        distill(match="ot-energy-full", data=data, match_batch_size=4, match_memory=0, **kw)
    with pytest.raises(ValueError, match="needs match_batch_size"):
        distill(match="energy", data=data, match_memory=2, **kw)
    with pytest.raises(ValueError, match=r"batch_size >= 4 \* match_batch_size"):  # 2 batches of 2 memories
        distill(match="ot-energy-full", data=data, match_batch_size=4, match_memory=2, **{**kw, "batch_size": 8})
    with pytest.raises(ValueError, match="match_memory is only used with match"):
        distill(match_memory=2, **kw)
    with pytest.raises(ValueError, match="dimension"):
        energy_distance_loss(torch.randn(4, 2), torch.randn(4, 3))
    with pytest.raises(ValueError, match="unknown match"):
        get_matching_loss("mmd")


def test_full_batch_ot_energy_shift_identity_and_unbiased_gradient_target():
    # For the squared cost a translation δ of one set does not change the optimal plan, and moves its cost by
    # |δ|² + 2 δ·(mean difference); so L(x + δ, y) - L(x, y) = 2|δ|² + 2 δ·(x̄_1 - ȳ) + 2 δ·(x̄_2 - ȳ) exactly
    # (the X_1–X_2 term is unchanged), draw by draw.
    from steerflow.straighten.matching import _batch_ot, full_batch_ot_energy_loss

    g = torch.Generator().manual_seed(11)
    delta = torch.tensor([0.8, -0.3], dtype=torch.float64)
    for _ in range(5):
        x = torch.randn(96, 2, generator=g, dtype=torch.float64)
        y = torch.randn(48, 2, generator=g, dtype=torch.float64)
        expect = 2 * delta.dot(delta) + 2 * delta.dot(x[:48].mean(0) - y.mean(0)) + 2 * delta.dot(
            x[48:].mean(0) - y.mean(0))
        got = full_batch_ot_energy_loss(x + delta, y) - full_batch_ot_energy_loss(x, y)
        assert float(got) == pytest.approx(float(expect), abs=1e-9)
    # Same law: E[L] = E[W(Y, Y')] (the generator-free constant), not 0.
    same = [float(full_batch_ot_energy_loss(torch.randn(128, 2, generator=g), torch.randn(64, 2, generator=g))
                  - _batch_ot(torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g))) for _ in range(60)]
    assert abs(sum(same) / len(same)) < 0.05
    with pytest.raises(ValueError, match="at least 2m generated"):
        full_batch_ot_energy_loss(torch.randn(100, 2), torch.randn(64, 2))


def test_match_memory_compares_with_the_union_of_the_last_batches(monkeypatch):
    """match_memory=k: each step's data side is the last k fresh batches (k fresh ones at the first step, then
    one per step), in order; the generated batch is unchanged and k = 1 draws exactly as before."""
    import importlib

    distill_module = importlib.import_module("steerflow.straighten.distill")  # (the package exports the function)
    calls, seen = [], []

    def data(n, generator):  # batch number i holds the value i
        calls.append(n)
        return torch.full((n, 2), float(len(calls) - 1))

    def recorder(x, y):
        seen.append((x.shape[0], y[:, 0].tolist()))
        return (x * 0).sum()

    monkeypatch.setattr(distill_module, "get_matching_loss", lambda name: recorder)
    loss = distill_module.matched_one_step_loss("ot-energy-full", data, match_batch_size=2, batch_size=12,
                                                match_memory=3, regression_weight=0.0)
    model = build_model("mlp-selu", dim=2, width=8)
    g = torch.Generator().manual_seed(0)
    x_0 = torch.randn(12, 2)
    for _ in range(3):
        loss(model, x_0, x_0, g)
    assert calls == [2, 2, 2, 2, 2]  # three batches at the first step, one per step after
    assert [s[1] for s in seen] == [[0, 0, 1, 1, 2, 2], [1, 1, 2, 2, 3, 3], [2, 2, 3, 3, 4, 4]]
    assert all(s[0] == 12 for s in seen)
    calls.clear(), seen.clear()
    one = distill_module.matched_one_step_loss("ot-energy-full", data, match_batch_size=2, batch_size=4,
                                               regression_weight=0.0)
    one(model, x_0[:4], x_0[:4], g), one(model, x_0[:4], x_0[:4], g)
    assert calls == [2, 2] and [s[1] for s in seen] == [[0, 0], [1, 1]]


def test_match_memory_trains_a_student_towards_the_data():
    """With a memory of 2 batches ot-energy-full still moves a shifted Gaussian onto the target's mean."""
    torch.manual_seed(0)
    target = lambda n, g: torch.randn(n, 2, generator=g) + torch.tensor([3.0, -1.0])  # noqa: E731
    x_0 = torch.randn(4096, 2)
    model = build_model("mlp", dim=2, hidden=32, depth=2)
    res = distill(pairs=Pairs(x_0, x_0), model=model, train_steps=300, batch_size=128, lr=3e-3, seed=0,
                  match="ot-energy-full", data=target, match_batch_size=32, match_memory=2, regression_weight=0.0)
    with torch.no_grad():
        out = res.generator(torch.randn(4000, 2, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(out.mean(0), torch.tensor([3.0, -1.0]), atol=0.15, rtol=0)
    torch.testing.assert_close(out.std(0), torch.ones(2), atol=0.15, rtol=0)
