"""Fuzz pass over the core entry points (``sample``, ``log_likelihood``, ``train``): random shapes and dtypes,
empty and single-element batches, NaN/inf, bad option values. Every call either works or raises
ValueError/TypeError with a message a user can act on — never a torch-internal error, never a silent wrong
result. (Couplings: ``test_couplings_robust.py``; guidances: ``test_fuzz_steering.py``.)"""
from __future__ import annotations

import itertools

import pytest
import torch

import steerflow
from steerflow.models import build_model
from steerflow.training import train

USER_ERRORS = (ValueError, TypeError)


def _linear_field(x, t):
    return -0.5 * x + t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


SHAPES = [(1, 2), (3, 1), (5, 3), (2, 2, 3), (4, 1, 2, 2)]
DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("shape,dtype,method", list(itertools.product(SHAPES, DTYPES, ["euler", "heun", "rk4",
                                                                                        "dopri5"])))
def test_sample_works_on_any_shape_and_dtype_and_matches_the_closed_form(shape, dtype, method):
    # dx/dt = -x/2 + t  ⇒  x(1) = e^{-1/2} x_0 + ∫_0^1 e^{-(1-s)/2} s ds = e^{-1/2} x_0 + 4 e^{-1/2} − 2
    x0 = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    x1 = steerflow.sample(_linear_field, x0, steps=64, method=method)
    c = torch.exp(torch.tensor(-0.5, dtype=torch.float64))
    exact = c * x0.double() + 4 * c - 2
    tol = {"euler": 1e-2, "heun": 1e-4}.get(method, 1e-4 if dtype == torch.float32 else 1e-6)
    assert x1.dtype == dtype and x1.shape == x0.shape
    assert (x1.double() - exact).abs().max() < tol


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(0, 2), "at least one sample"),
    (torch.zeros(3), "batch dimension"),
    (torch.zeros(3, 2, dtype=torch.int64), "floating point"),
    (torch.zeros(3, 2, dtype=torch.bool), "floating point"),
    (torch.tensor([[0.0, float("nan")]]), "NaN or inf"),
    (torch.tensor([[0.0, float("inf")]]), "NaN or inf"),
    ([[0.0, 1.0]], "torch.Tensor"),
])
def test_sample_refuses_bad_start_states(bad, match):
    with pytest.raises(USER_ERRORS, match=match):
        steerflow.sample(_linear_field, bad, steps=4)


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 0}, "positive integer"), ({"steps": -3}, "positive integer"), ({"steps": 2.5}, "positive integer"),
    ({"method": "rk45"}, "unknown method"), ({"ts": torch.tensor([0.0])}, "at least 2 points"),
    ({"ts": torch.tensor([0.0, 0.5, 0.5, 1.0])}, "strictly"), ({"ts": torch.tensor([0.0, float("nan")])}, "non-finite"),
])
def test_sample_refuses_bad_options(kwargs, match):
    with pytest.raises(USER_ERRORS, match=match):
        steerflow.sample(_linear_field, torch.zeros(2, 2), **kwargs)


def test_sample_names_a_field_that_returns_the_wrong_shape():
    with pytest.raises(ValueError, match="returned shape"):
        steerflow.sample(lambda x, t: x[:, :1], torch.zeros(2, 3), steps=2)


@pytest.mark.parametrize("shape", [(1, 2), (4, 3), (2, 1, 2, 2)])
def test_log_likelihood_of_a_linear_flow_any_shape(shape):
    # v = θ x maps N(0, I) to N(0, e^{2θ} I): log p(x) = −|x|² e^{−2θ}/2 − dθ − d/2 log 2π
    theta = 0.3
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lp = steerflow.log_likelihood(lambda x_, t: theta * x_, x, steps=40, method="rk4")
    d = x[0].numel()
    sq = x.reshape(shape[0], -1).pow(2).sum(-1)
    exact = -0.5 * sq * torch.exp(torch.tensor(-2 * theta, dtype=torch.float64)) - d * theta \
        - 0.5 * d * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))
    assert torch.allclose(lp, exact, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(0, 2), "at least one sample"),
    (torch.zeros(2), "batch dimension"),
    (torch.zeros(2, 2, dtype=torch.int32), "floating point"),
    (torch.tensor([[float("nan"), 0.0]]), "NaN or inf"),
])
def test_log_likelihood_refuses_bad_points(bad, match):
    with pytest.raises(USER_ERRORS, match=match):
        steerflow.log_likelihood(lambda x_, t: x_, bad, steps=4)


@pytest.mark.parametrize("data,error,match", [
    (torch.zeros(0, 2), ValueError, "N >= 1"),
    (torch.tensor([[0.0, float("nan")]] * 8), ValueError, "NaN|inf|non-finite"),
    (torch.ones(8, 2, dtype=torch.bool), TypeError, "bool"),
])
def test_train_refuses_bad_data(data, error, match, tmp_path):
    model = build_model("mlp", dim=2, hidden=8, depth=1)
    with pytest.raises(error, match=match):
        train(model, data, steps=2, batch_size=4, progress=False)


def test_train_on_a_single_sample_and_integer_data_runs():
    model = build_model("mlp", dim=2, hidden=8, depth=1)
    res = train(model, torch.tensor([[1, 2]]), steps=3, batch_size=1, progress=False)
    assert res.step == 3 and torch.isfinite(res.losses).all()
