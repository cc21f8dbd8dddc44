"""RepeatedSites: components at the distinct training sites around a continuous density, checked in closed form."""
import math

import numpy as np
import pytest
import torch

from steerflow.manifolds import RepeatedSites, VonMisesFisherMixture
from steerflow.manifolds.vmf import vmf_log_normaliser

LOG_4PI = math.log(4 * math.pi)


def unit(v):
    v = torch.as_tensor(v, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


def five_sites():
    # five well-separated sites (pairwise angles > 0.5 rad), site 0 seen five times
    s = unit([[0.0, 0, 1], [1.0, 0, 0], [0, 1.0, 0], [-1.0, 0, 0], [0, -1.0, 0.3]])
    return torch.cat([s[0].expand(4, 3), s]), s


def test_from_points_counts_the_distinct_rows():
    x, s = five_sites()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    a, b = RepeatedSites.from_points(x), RepeatedSites.from_points(x[perm])
    assert len(a) == 5 and int(a.counts.sum()) == 9
    # same sites and counts whatever the order of the points
    assert torch.equal(a.sites, b.sites) and torch.equal(a.counts, b.counts)
    i0 = int(torch.cdist(s[:1], a.sites).argmin())
    assert a.counts[i0] == 5 and sorted(a.counts.tolist()) == [1, 1, 1, 1, 5]


def test_log_prob_is_the_two_part_mixture():
    _, s = five_sites()
    counts = torch.tensor([5.0, 1, 1, 1, 1], dtype=torch.float64)
    lam, d, kappa = 0.3, 0.5, 40.0
    r = RepeatedSites(s, counts, kappa=kappa, weight=lam, discount=d)
    x = unit(torch.randn(200, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    q = torch.linspace(-3, 1, 200, dtype=torch.float64)
    w = (counts - d) / (counts - d).sum()
    f = torch.exp(vmf_log_normaliser(torch.tensor(kappa, dtype=torch.float64)) + kappa * (x @ s.T - 1))  # (b, 5)
    expected = torch.log(lam * (f * w).sum(1) + (1 - lam) * q.exp())
    torch.testing.assert_close(r.log_prob(x, q), expected, rtol=1e-12, atol=1e-12)
    # no weight on the sites: the continuous part unchanged
    torch.testing.assert_close(RepeatedSites(s, counts, weight=0.0).log_prob(x, q), q, rtol=0, atol=0)


def test_density_integrates_to_one_around_a_normalised_continuous_part():
    # Gauss–Legendre in z × uniform in φ; a broad κ so the rule resolves the site components
    z, wz = np.polynomial.legendre.leggauss(96)
    z, wz = torch.tensor(z), torch.tensor(wz)
    phi = torch.arange(192, dtype=torch.float64) * 2 * math.pi / 192
    Z, P = z.repeat_interleave(192), phi.repeat(96)
    W = wz.repeat_interleave(192) * 2 * math.pi / 192
    rr = torch.sqrt(1 - Z * Z)
    x = torch.stack([rr * torch.cos(P), rr * torch.sin(P), Z], 1)
    _, s = five_sites()
    r = RepeatedSites(s, torch.tensor([5.0, 1, 1, 1, 1]), kappa=8.0, weight=0.4, discount=0.9)
    cont = VonMisesFisherMixture(unit([[0.2, 0.3, -1.0]]), 3.0)
    assert float((r.log_prob(x, cont.log_prob(x)).exp() * W).sum()) == pytest.approx(1.0, abs=1e-10)


def test_sample_draws_sites_in_proportion():
    _, s = five_sites()
    counts = torch.tensor([5.0, 1, 1, 1, 1], dtype=torch.float64)
    r = RepeatedSites(s, counts, weight=0.6, discount=0.5)   # κ = 1e8: a site draw lies within ~1e-4 of its site
    far = unit([[0.0, 0, -1]])

    def continuous(m, g):
        return far.expand(m, 3).float()

    n = 20000
    xs = r.sample(n, continuous, torch.Generator().manual_seed(3))
    assert xs.shape == (n, 3) and xs.dtype == torch.float32
    dist, idx = torch.cdist(xs.double(), s).min(1)
    at_site = dist < 1e-3
    assert torch.equal(at_site, ~torch.isclose(xs.double(), far.expand(n, 3), atol=1e-6).all(1))
    k = int(at_site.sum())
    assert abs(k / n - 0.6) < 4 * math.sqrt(0.24 / n)           # binomial(n, λ), 4 standard deviations
    freq = torch.bincount(idx[at_site], minlength=5).double() / k
    p = (counts - 0.5) / (counts - 0.5).sum()
    assert (freq - p).abs().max() < 4 * math.sqrt(0.25 / k)
    # same generator state, same draws
    torch.testing.assert_close(xs, r.sample(n, continuous, torch.Generator().manual_seed(3)), rtol=0, atol=0)


def test_select_recovers_the_repeat_fraction_and_the_discount():
    _, s = five_sites()
    r = RepeatedSites(s, torch.tensor([5.0, 1, 1, 1, 1]))
    new = unit(torch.randn(70, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    new = new[torch.cdist(new, s).min(1).values > 0.05]           # far from every site (κ = 1e8: no site mass)
    n_new = new.shape[0]
    # repeats of the five-times site only: the largest discount shifts weight onto it; the NLL is
    # -(f log λ + (1 - f) log(1 - λ)) + const, smallest at λ = f, the repeat fraction
    n_rep = round(n_new * 3 / 7)
    held = torch.cat([s[0].expand(n_rep, 3), new])
    q = torch.full((held.shape[0],), -LOG_4PI, dtype=torch.float64)
    chosen, nll = r.select(held, q, weights=[i / 100 for i in range(100)], discounts=(0.0, 0.5, 0.9))
    f = n_rep / held.shape[0]
    assert chosen.discount == 0.9 and abs(chosen.weight - f) <= 0.005 + 1e-12
    assert nll == pytest.approx(float(-chosen.log_prob(held, q).mean()))
    # repeats of the singletons only: no discount
    held1 = torch.cat([s[1:].repeat(3, 1), new])
    chosen1, _ = r.select(held1, torch.full((held1.shape[0],), -LOG_4PI, dtype=torch.float64))
    assert chosen1.discount == 0.0
    # no repeats: no weight on the sites
    chosen2, nll2 = r.select(new, torch.full((n_new,), -LOG_4PI, dtype=torch.float64))
    assert chosen2.weight == 0.0 and nll2 == pytest.approx(LOG_4PI)


def test_repeats_marks_points_at_a_site():
    x, s = five_sites()
    r = RepeatedSites.from_points(x)
    probe = torch.cat([s, unit(s + 1e-3)])
    assert r.repeats(probe).tolist() == [True] * 5 + [False] * 5
    assert r.repeats(probe, tol=1e-2).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(counts=torch.tensor([1.0, 2])), "counts must be 5"),
    (dict(counts=torch.tensor([1.0, 0, 1, 1, 1])), "counts must be 5"),
    (dict(weight=1.0), "weight and discount"),
    (dict(discount=-0.1), "weight and discount"),
    (dict(kappa=0.0), "kappa"),
])
def test_bad_arguments_say_what_is_expected(kwargs, match):
    _, s = five_sites()
    args = dict(counts=torch.ones(5))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        RepeatedSites(s, args.pop("counts"), **args)


def test_bad_calls_say_what_is_expected():
    x, _ = five_sites()
    r = RepeatedSites.from_points(x)
    with pytest.raises(ValueError, match=r"continuous_log_prob must have shape \(9,\)"):
        r.log_prob(x, torch.zeros(8))
    with pytest.raises(ValueError, match="n must be an int"):
        r.sample(-1, lambda m, g: x[:m])
    with pytest.raises(ValueError, match="shape"):
        RepeatedSites.from_points(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least one"):
        r.select(x, torch.zeros(9), weights=[])


def test_save_load_is_bit_for_bit_and_refuses_sites_off_the_sphere(tmp_path):
    from safetensors.torch import save_file

    x = unit(torch.randn(40, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    r = RepeatedSites.from_points(torch.cat([x, x[:7]])).select(x[:9], torch.zeros(9))[0]
    r.save(tmp_path)
    back = RepeatedSites.load(tmp_path)
    assert torch.equal(back.sites, r.sites) and torch.equal(back.counts, r.counts)
    assert (back.kappa, back.weight, back.discount) == (r.kappa, r.weight, r.discount)
    # another weight keeps the sites' bits (the sites are normalised once)
    assert torch.equal(r.with_weight(0.3, 0.5).sites, r.sites)
    save_file({"sites": 2 * r.sites, "counts": r.counts}, str(tmp_path / "sites.safetensors"))
    with pytest.raises(ValueError, match="not unit vectors"):
        RepeatedSites.load(tmp_path)
