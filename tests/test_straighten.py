"""Reflow and distillation (Liu et al. 2022) against the exact Gaussian-mixture flow."""
from __future__ import annotations

import math

import pytest
import torch

from steerflow.data import GaussianMixture
from steerflow.metrics import energy_distance, straightness, transport_cost
from steerflow.models import build_model
from steerflow.straighten import Pairs, distill, generate_pairs, one_step, reflow


def normal2(n, generator=None):
    return torch.randn(n, 2, generator=generator)


@pytest.fixture(scope="module")
def bimodal():
    """Two well-separated modes: the exact 1-RF's paths bend strongly (large straightness)."""
    return GaussianMixture([0.5, 0.5], [[-3.0, 0.0], [3.0, 0.0]], 0.25)


@pytest.fixture(scope="module")
def reflowed(bimodal):
    """2-RF trained on the pairs of the exact mixture flow (the ideal 1-RF)."""
    torch.manual_seed(0)
    model = build_model("mlp-selu", dim=2, width=64)
    return reflow(bimodal.velocity, source=normal2, n_pairs=3000, method="rk4", steps=40, model=model,
                  train_steps=800, batch_size=256, lr=3e-3, seed=0)


def test_pairs_of_a_gaussian_flow_are_the_affine_map():
    # N(0, I) → N(μ, s² I): the linear-path marginal flow is x_1 = μ + s x_0 (closed form).
    mu, s = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5
    gm = GaussianMixture([1.0], mu[None], s**2)
    pairs = generate_pairs(gm.velocity, lambda n, generator=None: torch.randn(n, 2, generator=generator,
                                                                              dtype=torch.float64),
                           300, method="dopri5", generator=torch.Generator().manual_seed(0), batch_size=128)
    assert pairs.x_1.shape == (300, 2)
    torch.testing.assert_close(pairs.x_1, mu + s * pairs.x_0, atol=1e-4, rtol=0)


def test_pairs_are_seeded_and_match_the_mixture(bimodal):
    def make(seed):
        return generate_pairs(bimodal.velocity, normal2, 3000, method="rk4", steps=40,
                              generator=torch.Generator().manual_seed(seed))

    p, q = make(1), make(1)
    assert torch.equal(p.x_0, q.x_0) and torch.equal(p.x_1, q.x_1)
    x_1 = p.x_1.double()
    right = x_1[:, 0] > 0
    # mode weights 1/2 each: binomial standard error sqrt(.25/3000) ≈ 0.009
    assert abs(right.double().mean().item() - 0.5) < 0.04
    for side, mean in ((right, 3.0), (~right, -3.0)):
        pts = x_1[side]
        torch.testing.assert_close(pts.mean(0), torch.tensor([mean, 0.0], dtype=torch.float64), atol=0.06, rtol=0)
        torch.testing.assert_close(torch.cov(pts.T), 0.25 * torch.eye(2, dtype=torch.float64), atol=0.04, rtol=0)
    # the ODE map is a transport map: x_0 in the right half-plane goes to the right mode
    assert (right == (p.x_0[:, 0] > 0)).double().mean() > 0.97


def test_two_rf_is_straighter_than_one_rf(bimodal, reflowed):
    x_0 = normal2(500, torch.Generator().manual_seed(7))
    s1 = straightness(bimodal.velocity, x_0.double(), steps=40, method="rk4")
    s2 = straightness(reflowed.model, x_0, steps=40, method="rk4")
    assert s1 > 0.5  # the exact 1-RF bends: both modes are reached from the centre
    assert s2 < 0.02 * s1  # measured ≈ 0.004 · s1
    # rectification does not increase the transport cost (Liu et al. 2022, Theorem 3.5), up to fitting error
    with torch.no_grad():
        end_1 = generate_pairs(bimodal.velocity, None, 500, x_0=x_0.double(), method="rk4", steps=40).x_1
        end_2 = generate_pairs(reflowed.model, None, 500, x_0=x_0, method="rk4", steps=40).x_1
    assert transport_cost(x_0, end_2) <= transport_cost(x_0.double(), end_1) * 1.01
    assert reflowed.fits[0].final_loss < reflowed.fits[0].losses[0]


def test_distilled_one_step_model_beats_untrained(bimodal, reflowed):
    torch.manual_seed(1)
    student = build_model("mlp-selu", dim=2, width=64)
    x_0 = normal2(1000, torch.Generator().manual_seed(11))
    data = bimodal.sample(1000, torch.Generator().manual_seed(12)).float()
    with torch.no_grad():
        before = energy_distance(one_step(student, x_0), data)
    res = distill(pairs=reflowed.pairs, model=student, train_steps=800, lr=3e-3, seed=0)
    with torch.no_grad():
        after = energy_distance(res.generator(x_0), data)
    floor = energy_distance(bimodal.sample(1000, torch.Generator().manual_seed(13)).float(), data)
    assert after < 0.01 * before  # measured ≈ 0.004 · before
    assert after < 3 * floor + 0.005
    # the student regresses the ODE end points of its own pairs
    with torch.no_grad():
        err = (one_step(res.model, reflowed.pairs.x_0[:1000]) - reflowed.pairs.x_1[:1000]).square().sum(1).mean()
    assert err < 0.05


def test_reflow_iterates_and_copies_the_teacher():
    torch.manual_seed(0)
    teacher = build_model("mlp-selu", dim=2, width=16)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    res = reflow(teacher, source=normal2, n_pairs=64, method="euler", steps=4, train_steps=5, iterations=2, seed=0)
    assert len(res.fits) == 2 and len(res.losses) == 10
    assert res.model is not teacher
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # teacher untouched
    again = reflow(teacher, source=normal2, n_pairs=64, method="euler", steps=4, train_steps=5, iterations=2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), again.model.state_dict().values()))


def test_pairs_round_trip_and_errors(tmp_path):
    p = Pairs(torch.randn(5, 2), torch.randn(5, 2))
    q = Pairs.load(p.save(tmp_path / "pairs.safetensors"))
    assert torch.equal(p.x_0, q.x_0) and torch.equal(p.x_1, q.x_1)
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="not a readable pairs file"):
        Pairs.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="equal shapes"):
        Pairs(torch.randn(5, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="n_pairs"):
        generate_pairs(lambda x, t: x, normal2, 0)
    with pytest.raises(TypeError, match="model="):
        reflow(lambda x, t: x, source=normal2, n_pairs=8, train_steps=1)
    with pytest.raises(ValueError, match="pairs="):
        distill(train_steps=1)
    with pytest.raises(ValueError, match="steps"):
        distill(pairs=p, model=build_model("mlp-selu", dim=2, width=8), train_steps=0)
    with pytest.raises(ValueError, match="shape"):
        generate_pairs(lambda x, t: x, "normal", 4)
    assert math.isfinite(transport_cost(p.x_0, p.x_1))
