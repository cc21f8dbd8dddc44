"""The sliced W2² matching term: its exact values, its gradient, and how distill feeds it the recent data."""
from __future__ import annotations

import importlib

import pytest
import torch

from steerflow.metrics import w2
from steerflow.models import build_model
from steerflow.straighten import Pairs, distill, sliced_w2_loss

distill_module = importlib.import_module("steerflow.straighten.distill")  # (the package exports the function)


def test_in_one_dimension_it_is_the_exact_w2_squared():
    """d = 1: every direction is ±1, so each term is the sorted matching's cost, the exact 1-D W2² of two sets."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1, generator=g, dtype=torch.float64)
    y = 0.5 * torch.rand(300, 1, generator=g, dtype=torch.float64) + 1.0
    loss = sliced_w2_loss(x, y, n_projections=7, generator=g)
    torch.testing.assert_close(loss, torch.as_tensor(w2(x, y), dtype=torch.float64) ** 2, rtol=1e-10, atol=0)


def test_a_shift_costs_its_squared_length_and_pulls_back():
    """x = y + c: along every direction the ranks agree, so the term is d · mean_θ (θ·c)² → |c|² (E θθᵀ = I/d),
    and its gradient in c is 2 d · mean_θ θθᵀ c → 2c."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(500, 3, generator=g, dtype=torch.float64)
    c = torch.tensor([0.3, -0.4, 1.2], dtype=torch.float64, requires_grad=True)
    loss = sliced_w2_loss(y + c, y, n_projections=8000, generator=g)
    loss.backward()
    assert abs(float(loss.detach()) - float((c.detach() ** 2).sum())) < 0.04 * float((c.detach() ** 2).sum())
    torch.testing.assert_close(c.grad, 2 * c.detach(), atol=0.05, rtol=0)


def test_a_larger_reference_is_read_at_the_midpoint_quantiles():
    """A reference holding every generated point k times has, at level (i + ½)/n, the i-th generated point itself:
    the term and its gradient vanish. Shuffled copies, k = 5."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = x.detach().repeat(5, 1)[torch.randperm(320, generator=g)]
    loss = sliced_w2_loss(x, y, n_projections=32, generator=g)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(x.grad.abs().max()) == 0.0
    moved = sliced_w2_loss(x.detach() * 1.5, y, n_projections=32, generator=g)
    assert float(moved) > 0.1


def test_it_is_no_loss_for_a_matching_generator_and_a_clear_one_for_a_wrong_scale():
    """Samples of the reference law score ≈ 0 (1-D quantile noise only); a 30 % too wide law scores about
    d · 0.3² = 0.18 (the 1-D W2² between N(0, 1.3²) and N(0, 1) is 0.3²)."""
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(16384, 2, generator=g, dtype=torch.float64)
    same = sliced_w2_loss(torch.randn(2048, 2, generator=g, dtype=torch.float64), ref, n_projections=64, generator=g)
    wide = sliced_w2_loss(1.3 * torch.randn(2048, 2, generator=g, dtype=torch.float64), ref, n_projections=64,
                          generator=g)
    assert float(same) < 0.01 and 0.14 < float(wide) < 0.22


def test_bad_inputs_are_named():
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match="n_projections"):
        sliced_w2_loss(x, x, n_projections=0)
    with pytest.raises(ValueError, match="same event shape"):
        sliced_w2_loss(x, torch.randn(8, 3))
    with pytest.raises(ValueError, match="same event shape"):
        sliced_w2_loss(torch.randn(8), torch.randn(8))
    pairs = Pairs(x, x)
    model = build_model("mlp", dim=2, hidden=8, depth=1)
    kw = dict(pairs=pairs, model=model, train_steps=1, batch_size=8)
    with pytest.raises(ValueError, match="sliced_weight is only used with match"):
        distill(sliced_weight=1.0, **kw)
    with pytest.raises(ValueError, match="sliced_weight must be"):
        distill(match="energy", data=x, sliced_weight=-1.0, **kw)
    with pytest.raises(ValueError, match="sliced_memory must be"):
        distill(match="energy", data=x, sliced_weight=1.0, sliced_memory=0, **kw)
    with pytest.raises(ValueError, match="sliced_projections must be"):
        distill(match="energy", data=x, sliced_weight=1.0, sliced_projections=True, **kw)


def test_distill_feeds_the_sliced_term_the_last_batches_without_drawing_more(monkeypatch):
    """The matching term sees the step's fresh batch; the sliced term the union of the last sliced_memory batches
    (fewer during the first steps); one data batch is drawn per step either way."""
    calls, matched, sliced = [], [], []

    def data(n, generator):  # batch number i holds the value i
        calls.append(n)
        return torch.full((n, 2), float(len(calls) - 1))

    monkeypatch.setattr(distill_module, "get_matching_loss",
                        lambda name: lambda x, y: matched.append(y[:, 0].tolist()) or (x * 0).sum())
    monkeypatch.setattr(distill_module, "sliced_w2_loss",
                        lambda x, y, **kw: sliced.append((x.shape[0], y[:, 0].tolist(), kw)) or (x * 0).sum())
    loss = distill_module.matched_one_step_loss("ot-energy-full", data, match_batch_size=2, batch_size=4,
                                                regression_weight=0.0, sliced_weight=0.5, sliced_memory=3,
                                                sliced_projections=9)
    model = build_model("mlp-selu", dim=2, width=8)
    g = torch.Generator().manual_seed(0)
    x_0 = torch.randn(4, 2)
    for _ in range(4):
        loss(model, x_0, x_0, g)
    assert calls == [2, 2, 2, 2]
    assert matched == [[0, 0], [1, 1], [2, 2], [3, 3]]
    assert [s[1] for s in sliced] == [[0, 0], [0, 0, 1, 1], [0, 0, 1, 1, 2, 2], [1, 1, 2, 2, 3, 3]]
    assert all(s[0] == 4 and s[2]["n_projections"] == 9 and s[2]["generator"] is g for s in sliced)


def test_sliced_term_alone_trains_a_student_onto_the_data():
    """match_weight = 0: the sliced W2² alone (a distance between laws) moves a standard Gaussian onto
    N((3, -1), diag(0.5², 2²)) — mean and per-axis scale."""
    torch.manual_seed(0)
    scale = torch.tensor([0.5, 2.0])
    target = lambda n, g: torch.randn(n, 2, generator=g) * scale + torch.tensor([3.0, -1.0])  # noqa: E731
    x_0 = torch.randn(4096, 2)
    model = build_model("mlp", dim=2, hidden=32, depth=2)
    res = distill(pairs=Pairs(x_0, x_0), model=model, train_steps=300, batch_size=128, lr=3e-3, seed=0,
                  match="energy", data=target, match_weight=0.0, regression_weight=0.0, sliced_weight=1.0,
                  sliced_memory=8)
    with torch.no_grad():
        out = res.generator(torch.randn(4000, 2, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(out.mean(0), torch.tensor([3.0, -1.0]), atol=0.15, rtol=0)
    torch.testing.assert_close(out.std(0), scale, atol=0.15, rtol=0)
