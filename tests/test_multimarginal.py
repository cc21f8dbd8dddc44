"""Multimarginal stochastic interpolants (Albergo et al. 2023): the identity Σ α_k g_k + γ g_z = x, exact
Gaussian conditional means, transport between any two marginals, and the two-marginal reduction."""
import pytest
import torch

from steerflow.data import GaussianMixture
from steerflow.paths.multimarginal import (GaussianConditionalMeans, MultimarginalInterpolant, StraightSimplexPath,
                                           edge_path, vertex)
from steerflow.transport.multimarginal import ConditionalMeansNet, train_conditional_means, transport

D64 = torch.float64


def _gaussians(K, d, gen):
    m = 2 * torch.randn(K, d, generator=gen, dtype=D64)
    B = torch.randn(K, d, d, generator=gen, dtype=D64)
    return m, B @ B.transpose(1, 2) + 0.2 * torch.eye(d, dtype=D64)


def _affine_pushforward(g, it, start_mean, path, d, steps=60):
    """The exact Gaussian flow is affine in x: recover T(x) = T(m) + A (x - m) from d + 1 trajectories."""
    P = torch.cat([torch.zeros(1, d, dtype=D64), torch.eye(d, dtype=D64)]) + start_mean
    out = transport(g, it, P, path, steps=steps)
    return out[0], (out[1:] - out[0]).T


@pytest.mark.parametrize("gamma_scale", [0.0, 0.8])
def test_gaussian_conditional_means_satisfy_the_identity(gamma_scale, gen):
    it = MultimarginalInterpolant(4, gamma_scale)
    m, S = _gaussians(4, 3, gen)
    g = GaussianConditionalMeans(m, S, it)
    alpha = it.sample_alpha(200, gen, dtype=D64)
    x = 3 * torch.randn(200, 3, generator=gen, dtype=D64)
    assert it.identity_residual(g(alpha, x), alpha, x).abs().max() < 1e-12


@pytest.mark.parametrize("gamma_scale", [0.0, 0.8])
def test_transport_between_any_two_vertices_reproduces_the_target_marginal(gamma_scale, gen):
    """Along e_i → e_j (and along a bent path through the barycentre) the exact flow maps N(m_i, S_i) onto
    N(m_j, S_j): T(m_i) = m_j and A S_i Aᵀ = S_j."""
    K, d = 3, 2
    it = MultimarginalInterpolant(K, gamma_scale)
    m, S = _gaussians(K, d, gen)
    g = GaussianConditionalMeans(m, S, it)
    for i, j in [(0, 1), (2, 0), (1, 2)]:
        mean, A = _affine_pushforward(g, it, m[i], edge_path(K, i, j), d)
        torch.testing.assert_close(mean, m[j], atol=1e-6, rtol=0)
        torch.testing.assert_close(A @ S[i] @ A.T, S[j], atol=1e-6, rtol=0)
    c = torch.full((K,), 1.0 / K, dtype=D64)
    P = torch.cat([torch.zeros(1, d, dtype=D64), torch.eye(d, dtype=D64)]) + m[0]
    mid = transport(g, it, P, StraightSimplexPath(vertex(K, 0), c), steps=60)
    out = transport(g, it, mid, StraightSimplexPath(c, vertex(K, 2)), steps=60)
    A = (out[1:] - out[0]).T
    torch.testing.assert_close(out[0], m[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(A @ S[0] @ A.T, S[2], atol=1e-6, rtol=0)


def test_two_marginal_reduction_is_flow_matching(gen):
    """K = 2, α(s) = (1 - s, s), no latent: v = g_1 - g_0 = E[x_1 - x_0 | x_s], the linear-path velocity
    (checked against the Gaussian-mixture oracle with a standard-normal source)."""
    d = 3
    m, S = _gaussians(2, d, gen)
    it = MultimarginalInterpolant(2)
    g = GaussianConditionalMeans(torch.stack([torch.zeros(d, dtype=D64), m[1]]),
                                 torch.stack([torch.eye(d, dtype=D64), S[1]]), it)
    oracle = GaussianMixture([1.0], m[1:2], S[1:2])
    v = it.velocity(g, edge_path(2, 0, 1))
    x = 2 * torch.randn(50, d, generator=gen, dtype=D64)
    s = torch.rand(50, generator=gen, dtype=D64)
    torch.testing.assert_close(v(x, s), oracle.velocity(x, s), atol=1e-10, rtol=0)


def test_learned_conditional_means_keep_the_identity_and_learn(gen):
    torch.manual_seed(0)
    K, d = 3, 2
    it = MultimarginalInterpolant(K, gamma_scale=0.5)
    m, S = _gaussians(K, d, gen)
    m, S = m.float(), S.float()
    L = torch.linalg.cholesky(S)

    def marginals(n, generator):
        return m[:, None] + torch.einsum("kij,knj->kni", L, torch.randn(K, n, d, generator=generator))

    net = ConditionalMeansNet(d, it, hidden=64, depth=2)
    alpha = it.sample_alpha(100, gen)
    x = torch.randn(100, d, generator=gen)
    assert it.identity_residual(net(alpha, x), alpha, x).abs().max() < 1e-5      # by construction, untrained
    exact = GaussianConditionalMeans(m, S, it)
    s = it.sample(marginals(2000, gen), generator=gen)
    before = (net(s.alpha, s.x) - exact(s.alpha, s.x)).pow(2).mean().item()
    log = []
    train_conditional_means(net, it, marginals, steps=150, batch_size=256, lr=5e-3, generator=gen, log=log)
    with torch.no_grad():
        after = (net(s.alpha, s.x) - exact(s.alpha, s.x)).pow(2).mean().item()
        assert it.identity_residual(net(s.alpha, s.x), s.alpha, s.x).abs().max() < 1e-4
    assert after < 0.2 * before


def test_errors():
    with pytest.raises(ValueError, match="K must be"):
        MultimarginalInterpolant(1)
    it = MultimarginalInterpolant(3)
    with pytest.raises(ValueError, match="simplex"):
        it.interpolate(torch.zeros(3, 4, 2), torch.full((4, 3), 0.5))
    with pytest.raises(ValueError, match="two different"):
        edge_path(3, 1, 1)
    with pytest.raises(ValueError, match="K="):
        it.velocity(lambda a, x: x, edge_path(2, 0, 1))
