import math

import pytest
import torch

import steerflow
from steerflow.data import GaussianMixture


def _ed(x, y):
    """Squared energy distance (V-statistic), local to keep this oracle test self-contained."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


@pytest.fixture
def gm():
    return GaussianMixture([0.2, 0.5, 0.3], [[-3.0, 0.0], [2.0, 1.0], [0.0, -2.5]],
                           [[[0.3, 0.1], [0.1, 0.2]], [[0.5, 0.0], [0.0, 0.1]], [[0.2, -0.05], [-0.05, 0.4]]])


def test_continuity_equation_holds(gm, gen):
    # ∂_t log p_t + v·∇ log p_t + div v = 0 for the exact marginal velocity
    x = (gm.sample(32, generator=gen) * 0.8).requires_grad_(True)
    for t in (0.2, 0.5, 0.8):
        h = 1e-5
        dlogp_dt = (gm.marginal(t + h).log_prob(x) - gm.marginal(t - h).log_prob(x)) / (2 * h)
        v = gm.velocity(x, torch.full((32,), t, dtype=torch.float64))
        score = gm.score(x, torch.full((32,), t, dtype=torch.float64))
        div = sum(torch.autograd.grad(v[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(2))
        residual = dlogp_dt + (v * score).sum(-1) + div
        assert float(residual.detach().abs().max()) < 1e-5, t


def test_score_is_gradient_of_marginal_log_density(gm, gen):
    x = gm.sample(16, generator=gen).requires_grad_(True)
    t = 0.6
    (g,) = torch.autograd.grad(gm.marginal(t).log_prob(x).sum(), x)
    assert torch.allclose(gm.score(x.detach(), torch.tensor(t)), g, atol=1e-10)


def test_integrating_exact_field_reproduces_mixture(gm):
    g = torch.Generator().manual_seed(1)
    n = 3000
    x0 = torch.randn(n, 2, dtype=torch.float64, generator=g)
    x1 = steerflow.sample(gm.velocity, x0, steps=64, method="rk4")
    ref, ref2 = gm.sample(n, generator=g), gm.sample(n, generator=g)
    floor = _ed(ref, ref2)
    assert _ed(x1, ref) < 3 * floor + 1e-3, (_ed(x1, ref), floor)
    # and an unmatched distribution is far above the floor
    assert _ed(x0, ref) > 50 * floor


def test_posterior_is_prior_times_likelihood(gm, gen):
    A = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([0.7], dtype=torch.float64)
    s = 0.3
    post = gm.posterior(A, y, s)
    x = torch.randn(50, 2, generator=gen, dtype=torch.float64) * 2
    loglik = -0.5 * ((x @ A.T - y) ** 2).sum(-1) / s**2 - 0.5 * math.log(2 * math.pi * s**2)
    diff = post.log_prob(x) - (gm.log_prob(x) + loglik)  # = -log p(y), constant in x
    assert float(diff.std()) < 1e-9


def test_measurement_likelihood_is_bayes_consistent(gm, gen):
    A = torch.tensor([[0.3, -1.0], [1.0, 0.2]], dtype=torch.float64)
    y = torch.tensor([0.4, -1.2], dtype=torch.float64)
    s = 0.3
    post = gm.posterior(A, y, s)
    x = torch.randn(40, 2, generator=gen, dtype=torch.float64)
    for t in (0.3, 0.7):
        lhs = gm.measurement_log_likelihood(x, torch.tensor(t), A, y, s)
        rhs = post.marginal(t).log_prob(x) - gm.marginal(t).log_prob(x)  # log p(y|x_t) - log p(y)
        assert float((lhs - rhs).std()) < 1e-6


def test_guided_velocity_equals_posterior_velocity(gm, gen):
    """v + ((1 - t) / t) ∇ log p(y | x_t) is the posterior's own exact velocity."""
    A = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1.5], dtype=torch.float64)
    post = gm.posterior(A, y, 0.3)
    x = torch.randn(30, 2, generator=gen, dtype=torch.float64).requires_grad_(True)
    for t in (0.1, 0.5, 0.9):
        tt = torch.full((30,), t, dtype=torch.float64)
        (g,) = torch.autograd.grad(gm.measurement_log_likelihood(x, tt, A, y, 0.3).sum(), x)
        guided = gm.velocity(x.detach(), tt) + (1 - t) / t * g
        assert torch.allclose(guided, post.velocity(x.detach(), tt), atol=1e-9)


def test_mixture_input_errors():
    with pytest.raises(ValueError, match="means must have shape"):
        GaussianMixture([1.0], [0.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="weights must have shape"):
        GaussianMixture([0.5, 0.5], [[0.0, 1.0]], [1.0])
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])
    gm = GaussianMixture([1.0], [[0.0, 0.0]], [1.0])
    with pytest.raises(ValueError, match="A must have shape"):
        gm.posterior(torch.ones(1, 3), torch.ones(1), 0.1)
    with pytest.raises(ValueError, match="noise_std"):
        gm.posterior(torch.ones(1, 2), torch.ones(1), 0.0)
