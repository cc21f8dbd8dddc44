"""SteerflowDefault against closed forms: a Gaussian prior with a linear measurement has a Gaussian posterior
(mean and covariance known exactly); a two-component mixture has an exact mixture posterior."""
import math

import pytest
import torch

from steerflow import sample
from steerflow.data.mixture import GaussianMixture
from steerflow.metrics import energy_distance, mode_weight_tv
from steerflow.steering.guidance import SteerflowDefault
from steerflow.metrics.cost import Cost
from steerflow.steering.operators import AvgPool, Blur, Dense, Mask

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
    g = SteerflowDefault(op, y, sigma, covariance="isotropic", prior_var=s2, update="ode")

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


# --- the re-noising update (images) ---------------------------------------------------------------------------
def _iso_gauss(shape, s2=0.5, seed=0):
    """An isotropic Gaussian prior N(m, s² I) on images of ``shape`` and its exact velocity on (b, *shape)."""
    d = math.prod(shape)
    mean = 0.3 * torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    mix = GaussianMixture([1.0], mean[None], (s2 * torch.eye(d, dtype=F64))[None])

    def v(x, t):
        return mix.velocity(x.reshape(x.shape[0], -1), t).reshape(x.shape)
    return mix, mean, v


@pytest.mark.parametrize("op_name", ["mask", "blur"])
@pytest.mark.parametrize("eta, scale", [(0.0, 1.0), (1.0, 1.0), (0.5, 3.0)])
def test_renoise_step_is_the_gaussian_proximal_point_then_renoising(op_name, eta, scale):
    # one grid step by hand: x̂1 = E[x1 | x_t] (closed form), z = x̂1 + ω r² Aᵀ (r² A Aᵀ + σ² I)⁻¹ (y − A x̂1) with
    # dense algebra and ω = 1 + (scale − 1) √(1 − t), x_{t+h} = (t + h) z + (1 − t − h) (η ε + √(1 − η²) x̂0);
    # the blur goes through CG
    shape, s2, sigma, t, h = (1, 5, 5), 0.5, 0.05, 0.3, 0.1
    mix, mean, v = _iso_gauss(shape, s2)
    g_ = torch.Generator().manual_seed(3)
    op = (Mask((torch.rand(shape, generator=g_) < 0.5).to(F64)) if op_name == "mask"
          else Blur.gaussian(3, 1.0, shape))
    x = torch.randn(4, *shape, generator=g_, dtype=F64)
    y = op(torch.randn(4, *shape, generator=g_, dtype=F64))
    g = SteerflowDefault(op, y, sigma, prior_var=s2, eta=eta, n_cg=200, scale=scale)
    g.check(v, solver="euler")
    tt = torch.full((4,), t, dtype=F64)
    g.initial(v, x, torch.tensor([t, t + h], dtype=F64))
    vel = g.velocity(v, x, tt, torch.tensor(h, dtype=F64), generator=torch.Generator().manual_seed(9))
    x_next = (x + h * vel).reshape(4, -1)

    X = x.reshape(4, -1)
    gain = t * s2 / (t**2 * s2 + (1 - t) ** 2)  # E[x1 | x_t] = m + gain (x_t − t m) for N(m, s² I) data
    x1 = mean + gain * (X - t * mean)
    x0 = (X - t * x1) / (1 - t)
    A = op.matrix(shape)
    r2 = s2 * (1 - t) ** 2 / (t**2 * s2 + (1 - t) ** 2)
    S = r2 * A @ A.T + sigma**2 * torch.eye(A.shape[0], dtype=F64)
    omega = 1 + (scale - 1) * math.sqrt(1 - t)
    z = x1 + omega * r2 * torch.linalg.solve(S, (y.reshape(4, -1) - x1 @ A.T).T).T @ A
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=F64).reshape(4, -1)
    noise = eta * eps + math.sqrt(1 - eta**2) * x0
    torch.testing.assert_close(x_next, (t + h) * z + (1 - t - h) * noise, atol=1e-9, rtol=0)


@pytest.mark.parametrize("op_name", ["mask", "superres"])
def test_renoise_noiseless_measurement_is_met_exactly(op_name):
    shape = (1, 8, 8)
    _, _, v = _iso_gauss(shape)
    op = Mask.box(shape, 2, 2, 4, 4) if op_name == "mask" else AvgPool(2, shape)
    truth = torch.randn(6, *shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = op(truth)
    x0 = torch.randn(6, *shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    out = sample(v, x0, steps=12, guidance=SteerflowDefault(op, y, 0.0), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(op(out), y, atol=1e-10, rtol=0)
    assert (out - out[:1]).abs().flatten(1).amax(1)[1:].min() > 0.1  # one independent sample per input


def test_update_auto_picks_renoise_for_images_and_ode_for_ensembles_and_adaptive_solvers():
    shape = (1, 4, 4)
    _, _, v = _iso_gauss(shape)
    op = Mask.box(shape, 1, 1, 2, 2)
    y = op(torch.zeros(1, *shape, dtype=F64))[0]
    x0 = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0), dtype=F64)

    def run(method="euler", **kw):
        return sample(v, x0, steps=10, method=method, guidance=SteerflowDefault(op, y, 0.1, **kw),
                      generator=torch.Generator().manual_seed(5))
    assert torch.equal(run(), run(update="renoise"))
    assert not torch.allclose(run(), run(update="ode"))
    assert torch.equal(run("dopri5"), run("dopri5", update="ode"))  # adaptive: the ODE update
    with pytest.raises(ValueError, match="fixed-step solver"):
        run("dopri5", update="renoise")
    # an ensemble-sized batch of a small problem keeps the ODE update (and its reweighting)
    mix = GaussianMixture([1.0], [[0.0, 0.0]], [0.5])
    A, y2 = torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([0.4], dtype=F64)
    a = _solve(mix, SteerflowDefault(A, y2, 0.3), 400, 0, 20)
    b = _solve(mix, SteerflowDefault(A, y2, 0.3, update="ode"), 400, 0, 20)
    assert torch.equal(a, b)


def test_renoise_cost_has_no_vjp_and_counts_cg_products():
    shape = (1, 6, 6)
    _, _, v = _iso_gauss(shape)
    op = Blur.gaussian(3, 1.0, shape)
    y = op(torch.zeros(3, *shape, dtype=F64))
    cost = Cost()
    x0 = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    sample(v, x0, steps=5, guidance=SteerflowDefault(op, y, 0.05, n_cg=4), cost=cost,
           generator=torch.Generator().manual_seed(1))
    assert cost.nfe == 5 and cost.vjp == 0
    # per step: the residual (1), at most n_cg CG products of A Aᵀ (2 each), the adjoint (1); t = 0 included
    assert 5 * (2 + 2) <= cost.operator_calls <= 5 * (2 + 2 * 4)


def test_renoise_settings_errors():
    op = Mask.box((1, 4, 4), 1, 1, 2, 2)
    y = torch.zeros(1, 4, 4)
    with pytest.raises(ValueError, match="unknown update"):
        SteerflowDefault(op, y, 0.1, update="jump")
    with pytest.raises(ValueError, match="eta"):
        SteerflowDefault(op, y, 0.1, eta=1.5)
    with pytest.raises(ValueError, match="resample=True"):
        SteerflowDefault(op, y, 0.1, update="renoise", resample=True)
    with pytest.raises(ValueError, match="isotropic"):
        SteerflowDefault(op, y, 0.1, update="renoise", covariance="ensemble")
    with pytest.raises(ValueError, match="n_cg"):
        SteerflowDefault(op, y, 0.1, n_cg=0)
