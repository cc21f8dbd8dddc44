"""von Mises–Fisher mixtures and spherical-harmonic features on S², checked against closed forms."""
import math

import numpy as np
import pytest
import torch

from steerflow.manifolds import (Sphere, SphericalHarmonics, TangentVelocity, VonMisesFisherMixture,
                                 manifold_log_likelihood)
from steerflow.manifolds.vmf import kappa_from_resultant, mean_resultant_length, vmf_log_normaliser
from steerflow.models import MLPVelocity


def sphere_quadrature(n_z: int = 64, n_phi: int = 128):
    """Gauss–Legendre in ``z`` times the uniform rule in ``φ``: exact for polynomials of degree
    < min(2 n_z, n_phi)."""
    z, w = np.polynomial.legendre.leggauss(n_z)
    z, w = torch.tensor(z), torch.tensor(w)
    phi = torch.arange(n_phi, dtype=torch.float64) * 2 * math.pi / n_phi
    Z, P = z.repeat_interleave(n_phi), phi.repeat(n_z)
    W = w.repeat_interleave(n_phi) * 2 * math.pi / n_phi
    r = torch.sqrt(1 - Z * Z)
    return torch.stack([r * torch.cos(P), r * torch.sin(P), Z], 1), W


def test_density_integrates_to_one():
    # a broad mixture: the quadrature of the smooth density is accurate to round-off
    mix = VonMisesFisherMixture(torch.tensor([[0.0, 0, 1], [1.0, 0, 0], [0.3, -0.5, 0.2]]),
                                torch.tensor([0.0, 2.0, 7.5]), torch.tensor([0.2, 0.3, 0.5]))
    x, w = sphere_quadrature()
    assert float((mix.log_prob(x).exp() * w).sum()) == pytest.approx(1.0, abs=1e-10)


def test_sharp_component_integrates_to_one_about_its_pole():
    # κ = 1e3 around the north pole: integrate in w = z with Gauss–Legendre on [1 − 40/κ, 1]
    # (the mass outside is < e^{−80})
    kappa = 1e3
    mix = VonMisesFisherMixture(torch.tensor([[0.0, 0, 1]]), kappa)
    z, w = np.polynomial.legendre.leggauss(64)
    a = 1 - 40 / kappa
    zs = torch.tensor(a + (1 - a) * (z + 1) / 2)
    x = torch.stack([torch.sqrt(1 - zs * zs), torch.zeros_like(zs), zs], 1)
    integral = float((mix.log_prob(x).exp() * torch.tensor(w)).sum() * (1 - a) / 2 * 2 * math.pi)
    assert integral == pytest.approx(1.0, abs=1e-10)


def test_log_normaliser_closed_form_and_limits():
    k = torch.tensor([1e-3, 0.5, 3.0, 30.0], dtype=torch.float64)
    ref = torch.log(k / (4 * math.pi * torch.sinh(k))) + k  # log C(κ) + κ: the factor of exp(κ (μᵀx − 1))
    assert torch.allclose(vmf_log_normaliser(k), ref, rtol=0, atol=1e-12)
    assert float(vmf_log_normaliser(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(-math.log(4 * math.pi))
    big = torch.tensor([1e4, 1e8], dtype=torch.float64)
    assert torch.allclose(vmf_log_normaliser(big), torch.log(big) - math.log(2 * math.pi), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kappa", [1e2, 1e3, 1e4])
def test_log_prob_stable_for_large_kappa(kappa):
    # at angle θ from the mean: log f = log(κ / 2π) − κ (1 − cos θ) (up to e^{−2κ}); no overflow, no NaN
    mu = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    mix = VonMisesFisherMixture(mu, kappa)
    theta = torch.tensor([0.0, 1e-3, 0.1, math.pi], dtype=torch.float64)
    x = torch.stack([torch.sin(theta), torch.zeros_like(theta), torch.cos(theta)], 1)
    ref = math.log(kappa / (2 * math.pi)) - kappa * (1 - torch.cos(theta))
    assert torch.isfinite(mix.log_prob(x)).all()
    assert torch.allclose(mix.log_prob(x), ref, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("kappa", [0.0, 0.7, 5.0, 200.0])
def test_sampling_matches_mean_resultant_length(kappa):
    mu = torch.tensor([[1.0, 2.0, -2.0]]) / 3
    mix = VonMisesFisherMixture(mu, kappa)
    n = 40000
    x = mix.sample(n, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(x.norm(dim=1), torch.ones(n, dtype=torch.float64), atol=1e-12)
    w = x @ mix.means[0]
    a = float(mean_resultant_length(torch.tensor(kappa, dtype=torch.float64)))
    assert abs(float(w.mean()) - a) < 4 * float(w.std()) / math.sqrt(n) + 1e-12
    # the orthogonal direction is uniform: its mean vanishes
    perp = x - w[:, None] * mix.means[0]
    assert float(perp.mean(0).norm()) < 4 * math.sqrt(float((perp ** 2).sum(1).mean()) / n)


def test_sampling_is_reproducible_and_follows_weights():
    means = torch.tensor([[0.0, 0, 1], [0.0, 0, -1]])
    mix = VonMisesFisherMixture(means, 50.0, torch.tensor([0.25, 0.75]))
    a = mix.sample(20000, torch.Generator().manual_seed(3))
    b = mix.sample(20000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.float32
    frac_north = float((a[:, 2] > 0).double().mean())
    assert abs(frac_north - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 20000)


def test_kappa_from_resultant_inverts_A():
    k = torch.tensor([1e-3, 0.1, 1.0, 10.0, 100.0, 1e4], dtype=torch.float64)
    assert torch.allclose(kappa_from_resultant(mean_resultant_length(k)), k, rtol=1e-6)
    assert float(kappa_from_resultant(torch.tensor(1.0), kappa_max=123.0)) == 123.0


def test_em_recovers_known_mixture():
    truth = VonMisesFisherMixture(torch.tensor([[0.0, 0, 1], [1.0, 0, 0], [0.0, -1, 0]]),
                                  torch.tensor([20.0, 50.0, 8.0]), torch.tensor([0.5, 0.3, 0.2]))
    x = truth.sample(30000, torch.Generator().manual_seed(1), dtype=torch.float64)
    fit = VonMisesFisherMixture.fit_em(x, 3, init=truth.means + 0.2, iters=500)
    order = (fit.means @ truth.means.T).argmax(0)  # fitted component nearest each true one
    assert torch.allclose(fit.means[order], truth.means, atol=0.02)
    assert torch.allclose(fit.kappas[order], truth.kappas, rtol=0.05)
    assert torch.allclose(fit.weights[order], truth.weights, atol=0.01)
    # the fit is at least as likely as the truth on its own data (a maximum of the likelihood)
    assert float(fit.log_prob(x).mean()) >= float(truth.log_prob(x).mean()) - 1e-9


def test_kde_is_the_equal_weight_mixture_and_fit_kde_picks_validation_best():
    g = torch.Generator().manual_seed(0)
    truth = VonMisesFisherMixture(torch.tensor([[0.0, 0, 1]]), 30.0)
    tr, va = truth.sample(300, g, dtype=torch.float64), truth.sample(300, g, dtype=torch.float64)
    kde = VonMisesFisherMixture.kde(tr, 40.0)
    x = truth.sample(5, g, dtype=torch.float64)
    ref = torch.logsumexp(math.log(40.0 / (4 * math.pi * math.sinh(40.0))) + 40.0 * x @ tr.T, 1) - math.log(300)
    assert torch.allclose(kde.log_prob(x), ref, atol=1e-10)
    kappas = [5.0, 40.0, 500.0, 5000.0]
    mix, kappa = VonMisesFisherMixture.fit_kde(tr, va, kappas)
    scores = [float(VonMisesFisherMixture.kde(tr, k).log_prob(va).mean()) for k in kappas]
    assert kappa == kappas[int(np.argmax(scores))]


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        VonMisesFisherMixture(torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match="kappas"):
        VonMisesFisherMixture(torch.eye(3), torch.tensor([1.0, -1.0, 2.0]))
    with pytest.raises(ValueError, match="weights"):
        VonMisesFisherMixture(torch.eye(3), 1.0, torch.zeros(3))
    with pytest.raises(ValueError, match="non-zero"):
        VonMisesFisherMixture(torch.zeros(1, 3), 1.0)
    mix = VonMisesFisherMixture(torch.eye(3), 1.0)
    with pytest.raises(ValueError, match=r"\(b, 3\)"):
        mix.log_prob(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="k must be"):
        VonMisesFisherMixture.fit_em(torch.eye(3), 5)
    with pytest.raises(ValueError, match="n must be"):
        mix.sample(-1)


def test_spherical_harmonics_orthonormal_by_quadrature():
    L = 8
    Y = SphericalHarmonics(L, scale=1.0)
    x, w = sphere_quadrature(24, 48)  # exact for degree ≤ 2L = 16
    F = Y(x)
    assert F.shape == (x.shape[0], (L + 1) ** 2)
    gram = F.T @ (F * w[:, None])
    assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=gram.dtype), atol=1e-12)


def test_spherical_harmonics_low_degrees_closed_form():
    x = torch.nn.functional.normalize(torch.randn(50, 3, generator=torch.Generator().manual_seed(0),
                                                  dtype=torch.float64), dim=1)
    F = SphericalHarmonics(2, scale=1.0)(x)
    c0, c1 = 0.5 / math.sqrt(math.pi), math.sqrt(3 / (4 * math.pi))
    X, Yc, Z = x.unbind(1)
    assert torch.allclose(F[:, 0], torch.full_like(X, c0))
    assert torch.allclose(F[:, 1:4], c1 * torch.stack([Yc, Z, X], 1))           # m = −1, 0, 1
    assert torch.allclose(F[:, 6], math.sqrt(5 / (16 * math.pi)) * (3 * Z * Z - 1))  # Y_2^0
    assert torch.allclose(F[:, 8], math.sqrt(15 / (16 * math.pi)) * (X * X - Yc * Yc))  # Y_2^2
    with pytest.raises(ValueError, match="degree"):
        SphericalHarmonics(-1)


def test_vmf_base_in_the_flow_likelihood():
    # a zero field leaves every point in place: the flow's log-likelihood is the base's exactly
    mix = VonMisesFisherMixture(torch.tensor([[0.0, 0, 1], [0.0, 1, 0]]), torch.tensor([3.0, 40.0]))
    emb = SphericalHarmonics(3)
    net = MLPVelocity(3, hidden=16, depth=2, in_dim=emb.out_dim)
    torch.nn.init.zeros_(net.net[-1].weight)
    torch.nn.init.zeros_(net.net[-1].bias)
    v = TangentVelocity(net, Sphere(2), embed=emb).double()
    x = mix.sample(64, torch.Generator().manual_seed(0), dtype=torch.float64)
    lp = manifold_log_likelihood(v, x, Sphere(2), steps=4, base_log_prob=mix.log_prob)
    assert torch.allclose(lp, mix.log_prob(x), atol=1e-12)
    uniform = manifold_log_likelihood(v, x, Sphere(2), steps=4)
    assert torch.allclose(uniform, torch.full_like(uniform, -math.log(4 * math.pi)), atol=1e-12)


def test_sample_given_draws_from_each_points_own_component_and_keeps_the_marginal():
    # two components at the poles plus a weak equatorial one: a point near a pole draws from that pole's component;
    # data drawn from the mixture itself give source draws distributed as the mixture (the EM fixed point)
    means = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    mix = VonMisesFisherMixture(means, torch.tensor([60.0, 60.0, 5.0], dtype=torch.float64),
                                torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    near_north = VonMisesFisherMixture(means[:1], 400.0).sample(200, g, dtype=torch.float64)
    x0 = mix.sample_given(near_north, g)
    assert x0.dtype == torch.float64 and x0.shape == (200, 3)
    assert torch.allclose(x0.norm(dim=1), torch.ones(200, dtype=torch.float64))
    assert (x0[:, 2] > 0.5).all()  # the north component only
    n = 20000
    x1 = mix.sample(n, g, dtype=torch.float64)
    x0 = mix.sample_given(x1, g)
    ref = mix.sample(n, g, dtype=torch.float64)
    for a in (x0, ref):  # the share near each pole matches π within 4 standard errors
        for pole, w in ((2, 0.5), (-2, 0.3)):
            share = float(((a[:, abs(pole)] * (1 if pole > 0 else -1)) > 0.8).double().mean())
            assert abs(share - w) < 4 * math.sqrt(w * (1 - w) / n) + 0.01, (share, w)
    # the coupling keeps x1 and replaces x0
    couple = mix.coupling()
    y0, y1 = couple(torch.zeros(5, 3), x1[:5].float(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(y1, x1[:5].float()) and y0.dtype == torch.float32
    assert torch.allclose(y0.norm(dim=1), torch.ones(5))


def test_normalised_parameters_keep_their_bits_and_others_are_normalised():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(20, 3, generator=g, dtype=torch.float64)
    mix = VonMisesFisherMixture(raw, 5.0, torch.rand(20, generator=g, dtype=torch.float64))
    torch.testing.assert_close(mix.means.norm(dim=1), torch.ones(20, dtype=torch.float64), rtol=0, atol=1e-15)
    assert abs(float(mix.weights.sum()) - 1) < 1e-15
    again = VonMisesFisherMixture(mix.means, mix.kappas, mix.weights)
    assert torch.equal(again.means, mix.means) and torch.equal(again.weights, mix.weights)
