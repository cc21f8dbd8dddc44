import math

import pytest
import torch

from steerflow import log_likelihood
from steerflow.data import GaussianMixture


def test_gaussian_flow_log_likelihood_is_exact(gen):
    gm = GaussianMixture([1.0], [[1.0, -0.5, 0.3]], [[[0.5, 0.1, 0.0], [0.1, 0.3, 0.05], [0.0, 0.05, 0.8]]])
    x = gm.sample(20, generator=gen)
    with torch.no_grad():
        lp = log_likelihood(gm.velocity, x, method="dopri5", atol=1e-9, rtol=1e-9)
    assert float((lp - gm.log_prob(x)).abs().max()) < 1e-5


def test_mixture_flow_log_likelihood_fixed_step(gen):
    gm = GaussianMixture([0.4, 0.6], [[-1.5, 0.0], [1.5, 0.5]], [0.3, 0.2])
    x = gm.sample(10, generator=gen)
    with torch.no_grad():
        lp = log_likelihood(gm.velocity, x, steps=200, method="rk4")
    assert float((lp - gm.log_prob(x)).abs().max()) < 1e-4


def test_likelihood_has_parameter_gradient():
    # v_θ(x, t) = θ x pushes N(0, I) to N(0, e^{2θ} I): log p = -|x|² e^{-2θ}/2 - dθ - d/2 log 2π
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[0.5, -1.0, 2.0], [0.1, 0.2, 0.3]], dtype=torch.float64)
    lp = log_likelihood(lambda x_, t: theta * x_, x, steps=100, method="rk4")
    d = 3
    sq = (x**2).sum(-1)
    expected = -0.5 * sq * math.exp(-0.6) - d * 0.3 - 0.5 * d * math.log(2 * math.pi)
    assert torch.allclose(lp.detach(), expected, atol=1e-5)
    lp.sum().backward()
    grad_expected = float((sq * math.exp(-0.6) - d).sum())
    assert abs(float(theta.grad) - grad_expected) < 1e-5


def test_hutchinson_is_unbiased(gen):
    # linear field v = B x has div = tr B; Hutchinson with Rademacher probes is exact in expectation
    B = torch.tensor([[0.2, 1.0], [-0.5, -0.7]], dtype=torch.float64)
    f = lambda x, t: x @ B.T
    x = torch.randn(4000, 2, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        exact = log_likelihood(f, x, steps=20, method="rk4", divergence="exact")
        hutch = log_likelihood(f, x, steps=20, method="rk4", divergence="hutchinson", generator=gen)
    assert abs(float((hutch - exact).mean())) < 0.05
    with pytest.raises(ValueError, match="unknown divergence"):
        log_likelihood(f, x[:2], divergence="bogus")
