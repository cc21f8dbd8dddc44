"""SteerflowDefault against closed forms: a Gaussian prior with a linear measurement has a Gaussian posterior
(mean and covariance known exactly); a two-component mixture has an exact mixture posterior."""
import math

import pytest
import torch

from steerflow import sample
from steerflow.data.mixture import GaussianMixture
from steerflow.metrics import energy_distance, mode_weight_tv
from steerflow.steering.guidance import SteerflowDefault
from steerflow.steering.operators import Dense, Mask

F64 = torch.float64


def _gauss_posterior(mean, cov, A, y, sigma):
    """Exact N(m', Σ') of x given y = A x + N(0, σ² I) under x ~ N(mean, cov)."""
    S = A @ cov @ A.T + sigma**2 * torch.eye(A.shape[0], dtype=F64)
    G = cov @ A.T @ torch.linalg.inv(S)
    return mean + G @ (y - A @ mean), cov - G @ A @ cov


def _solve(mix, g, n, seed, steps):
    x0 = torch.randn(n, mix.dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return sample(mix.velocity, x0, steps=steps, guidance=g, generator=torch.Generator().manual_seed(seed + 1))


def test_gaussian_prior_linear_measurement_ensemble_and_resampling_is_exact():
    # For a Gaussian prior the denoiser is affine: the ensemble slope is exact, the proposal is the exact posterior
    # ODE, and the importance weights are (nearly) uniform.
    mean = torch.tensor([0.5, -1.0], dtype=F64)
    cov = torch.tensor([[0.6, 0.25], [0.25, 0.4]], dtype=F64)
    mix = GaussianMixture([1.0], mean[None], cov[None])
    A = torch.tensor([[1.0, 0.5]], dtype=F64)
    y, sigma = torch.tensor([0.3], dtype=F64), 0.2
    m_post, c_post = _gauss_posterior(mean, cov, A, y, sigma)
    g = SteerflowDefault(Dense(A), y, sigma)
    x = _solve(mix, g, 2000, 0, 40)
    assert x.shape == (2000, 2)
    assert g.ess is not None and g.ess > 0.9 * 2000
    se = (c_post.diagonal() / g.ess).sqrt()
    assert torch.all((x.mean(0) - m_post).abs() < 5 * se + 0.01), (x.mean(0), m_post)
    torch.testing.assert_close(torch.cov(x.T), c_post, atol=0.03, rtol=0.1)


def test_gaussian_prior_isotropic_form_is_exact_for_isotropic_data():
    # prior N(m, s² I) on image-shaped samples (b, 1, 2, 2), two pixels observed: the isotropic form with
    # prior_var = s² is the exact posterior velocity.
    s2, d = 0.5, 4
    mean = torch.tensor([0.2, -0.4, 0.1, 0.3], dtype=F64)
    mix = GaussianMixture([1.0], mean[None], (s2 * torch.eye(d, dtype=F64))[None])
    op = Mask(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=F64))
    A = op.matrix((1, 2, 2))
    y, sigma = op(torch.tensor([[[[1.0, 0.0], [0.0, -1.0]]]], dtype=F64))[0], 0.1
    m_post, c_post = _gauss_posterior(mean, s2 * torch.eye(d, dtype=F64), A, y.reshape(-1), sigma)
    g = SteerflowDefault(op, y, sigma, covariance="isotropic", prior_var=s2)

    def v(x, t):
        return mix.velocity(x.reshape(-1, d), t).reshape(x.shape)

    x0 = torch.randn(3000, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    x = sample(v, x0, steps=40, guidance=g).reshape(-1, d)
    assert g.ess is None  # no reweighting with the isotropic model
    assert torch.all((x.mean(0) - m_post).abs() < 5 * (c_post.diagonal() / 3000).sqrt() + 0.01)
    torch.testing.assert_close(torch.cov(x.T), c_post, atol=0.02, rtol=0.1)


def _bimodal():
    mix = GaussianMixture([0.5, 0.5], [[-1.0, -1.0], [1.0, 1.0]], [[[0.25, 0.1], [0.1, 0.25]]] * 2)
    A, y, sigma = torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([0.4], dtype=F64), 0.3
    return mix, A, y, sigma, mix.posterior(A, y, sigma)


def test_bimodal_posterior_mode_weights_and_energy_distance():
    mix, A, y, sigma, post = _bimodal()
    n, steps = 1500, 50
    ref = post.sample(n, torch.Generator().manual_seed(9))
    ed_free = energy_distance(_solve(mix, None, n, 0, steps), ref)
    ed_gauss = energy_distance(_solve(mix, SteerflowDefault(Dense(A), y, sigma, resample=False), n, 0, steps), ref)
    x = _solve(mix, SteerflowDefault(Dense(A), y, sigma), n, 0, steps)
    ed = energy_distance(x, ref)
    # measured (seeds above): unguided ≈ 0.7, Gaussian correction only ≈ 0.09, with reweighting ≈ 0.003
    assert ed < 0.02 and ed < ed_free / 30 and ed < ed_gauss / 4, (ed, ed_gauss, ed_free)
    assert mode_weight_tv(x, post) < 0.04


def test_same_generator_same_samples_and_repeats_after_resampling():
    mix, A, y, sigma, _ = _bimodal()
    a = _solve(mix, SteerflowDefault(Dense(A), y, sigma), 400, 3, 20)
    b = _solve(mix, SteerflowDefault(Dense(A), y, sigma), 400, 3, 20)
    assert torch.equal(a, b)
    assert torch.unique(a, dim=0).shape[0] < 400  # systematic resampling repeats the heavy samples


def test_auto_reweighting_needs_enough_particles_per_dimension():
    mix, A, y, sigma, _ = _bimodal()
    g = SteerflowDefault(Dense(A), y, sigma)
    x = _solve(mix, g, 100, 0, 10)  # 100 < 64 · 2: the Gaussian correction alone, no repeated samples
    assert g.ess is None and torch.unique(x, dim=0).shape[0] == 100
    g = SteerflowDefault(Dense(A), y, sigma, resample=True)
    _solve(mix, g, 100, 0, 10)
    assert g.ess is not None and 1.0 <= g.ess <= 100.0


def test_empty_groups_of_the_local_linearisation_in_high_dimension():
    # d = 70 takes the bounded-memory path of the group moments; particles that sit on two points only leave
    # most of the 8 k-means groups empty — they must count as empty, not break the scatter
    d, b = 70, 600
    mix = GaussianMixture([1.0], torch.zeros(1, d, dtype=F64), torch.eye(d, dtype=F64)[None])
    A = Mask(torch.arange(d) % 2 == 0)
    y = torch.full((d,), 0.3, dtype=F64)
    g = SteerflowDefault(A, y, 0.1, resample=True, n_clusters=8)
    two = torch.randn(2, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = sample(mix.velocity, two.repeat(b // 2, 1), steps=6, guidance=g, generator=torch.Generator().manual_seed(1))
    assert x.shape == (b, d) and torch.isfinite(x).all() and g.ess is not None


def test_per_sample_measurements_are_not_pooled():
    mix, A, _, sigma, _ = _bimodal()
    y = torch.linspace(-1, 1, 400, dtype=F64)[:, None]  # a different measurement for every sample
    g = SteerflowDefault(Dense(A), y, sigma)
    x = _solve(mix, g, 400, 0, 10)
    assert x.shape == (400, 2) and torch.isfinite(x).all() and g.ess is None
    with pytest.raises(ValueError, match="one measurement"):
        _solve(mix, SteerflowDefault(Dense(A), y, sigma, resample=True), 400, 0, 10)


def test_errors_at_the_boundary():
    A, y = torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([0.4], dtype=F64)
    with pytest.raises(ValueError, match="NaN"):
        SteerflowDefault(Dense(A), torch.tensor([math.nan], dtype=F64), 0.1)
    with pytest.raises(ValueError, match="sigma"):
        SteerflowDefault(Dense(A), y, -0.1)
    with pytest.raises(ValueError, match="covariance"):
        SteerflowDefault(Dense(A), y, 0.1, covariance="diagonal")
    with pytest.raises(ValueError, match="sigma > 0"):
        SteerflowDefault(Dense(A), y, 0.0, resample=True)
    with pytest.raises(ValueError, match="n_clusters"):
        SteerflowDefault(Dense(A), y, 0.1, n_clusters=0)
    with pytest.raises(TypeError, match="resample"):
        SteerflowDefault(Dense(A), y, 0.1, resample="yes")
    mix = _bimodal()[0]
    g = SteerflowDefault(Dense(A), y, 0.1, resample=True)
    with pytest.raises(ValueError, match="ends at t = 1"):
        sample(mix.velocity, torch.randn(50, 2, dtype=F64), ts=torch.linspace(0, 0.5, 6, dtype=F64), guidance=g)
    # σ = 0 (noiseless) still works without reweighting
    x = _solve(mix, SteerflowDefault(Dense(A), y, 0.0), 200, 0, 10)
    assert torch.isfinite(x).all()
