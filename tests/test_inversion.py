"""RF-Inversion (controlled inversion / editing) and the rectified SDE, against the exact mixture field."""
import numpy as np
import pytest
import torch

import steerflow
from steerflow.data import GaussianMixture
from steerflow.metrics.cost import Cost
from steerflow.metrics.distances import energy_distance
from steerflow.solvers import uniform_grid
from steerflow.steering.inversion import ControlledEditing, ControlledInversion, RectifiedSDE, edit, invert

GMM = GaussianMixture([0.3, 0.7], [[-2.0, 0.5], [1.5, -1.0]], [0.25, 0.4])


def _data(n, seed=0):
    return GMM.sample(n, torch.Generator().manual_seed(seed))


def test_plain_inversion_is_sample_on_the_flipped_grid():
    x1 = _data(16)
    ours = invert(GMM.velocity, x1, steps=20, method="heun")
    ref = steerflow.sample(GMM.velocity, x1, ts=uniform_grid(20).flip(0), method="heun")
    assert torch.equal(ours, ref)
    z = torch.randn(16, 2, dtype=torch.float64)
    # gamma = 0 / eta = 0 are exactly the plain solves even when a controller object is built
    g0 = steerflow.sample(GMM.velocity, x1, ts=uniform_grid(20).flip(0), method="heun",
                          guidance=ControlledInversion(z, 0.0))
    assert torch.equal(g0, ref)
    e0 = edit(GMM.velocity, z, x1, eta=0.0, steps=20, method="heun")
    assert torch.equal(e0, steerflow.sample(GMM.velocity, z, steps=20, method="heun"))
    e0b = steerflow.sample(GMM.velocity, z, steps=20, method="heun", guidance=ControlledEditing(x1, 0.0))
    assert torch.equal(e0b, e0)


def test_inversion_then_generation_reconstructs_to_solver_accuracy():
    """Exact field, float64: the round trip error falls at the solver's order (midpoint: 2, rk4: 4)."""
    x1 = _data(32, seed=1)
    for method, order in (("midpoint", 2), ("rk4", 4)):
        ns = [8, 16, 32, 64] if method == "rk4" else [16, 32, 64]
        errs = []
        for n in ns:
            z = invert(GMM.velocity, x1, steps=n, method=method)
            x_rec = steerflow.sample(GMM.velocity, z, steps=n, method=method)
            errs.append(float((x_rec - x1).abs().max()))
        slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
        assert all(a > b for a, b in zip(errs, errs[1:])), (method, errs)
        assert slope > order - 0.5, (method, slope, errs)
    assert errs[-1] < 5e-6  # rk4, 64 steps


@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_gamma_one_inverts_exactly_to_the_chosen_noise(method):
    x1 = _data(8, seed=2)
    z = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = invert(GMM.velocity, x1, steps=10, gamma=1.0, target_noise=z, method=method)
    assert torch.allclose(out, z, atol=1e-12, rtol=0)


def test_gamma_interpolates_and_draws_noise_from_the_generator():
    x1 = _data(8, seed=2)
    plain = invert(GMM.velocity, x1, steps=20)
    z = torch.randn(x1.shape, dtype=x1.dtype, generator=torch.Generator().manual_seed(5))
    d = [float((invert(GMM.velocity, x1, steps=20, gamma=g, target_noise=z) - z).norm()) for g in (0.0, 0.5, 0.9)]
    assert d[0] > d[1] > d[2] > 0 and abs(d[0] - float((plain - z).norm())) < 1e-12
    a = invert(GMM.velocity, x1, steps=20, gamma=0.5, generator=torch.Generator().manual_seed(5))
    b = invert(GMM.velocity, x1, steps=20, gamma=0.5, target_noise=z)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_eta_one_returns_the_reference(method):
    y = _data(8, seed=4)
    x0 = torch.randn(8, 2, dtype=torch.float64)
    out = edit(GMM.velocity, x0, y, eta=1.0, steps=12, method=method)
    assert torch.allclose(out, y, atol=1e-12, rtol=0)


def test_eta_one_on_a_window_follows_the_straight_line_to_the_reference():
    """With η = 1 on [0, τ] the state at τ is (1 − τ) x_0 + τ y; afterwards the learned field takes over."""
    y = _data(8, seed=4)
    x0 = torch.randn(8, 2, dtype=torch.float64)
    tr = edit(GMM.velocity, x0, y, eta=1.0, window=(0.0, 0.4), steps=10, method="euler", return_trajectory=True)
    assert torch.allclose(tr.xs[4], 0.6 * x0 + 0.4 * y, atol=1e-12)
    # the rest is the plain flow from that state
    rest = steerflow.sample(GMM.velocity, tr.xs[5], ts=tr.ts[5:], method="euler")
    assert torch.allclose(tr.x, rest, atol=1e-12)


def test_edit_faithfulness_grows_with_eta():
    y = _data(16, seed=6)
    z = invert(GMM.velocity, y, steps=30, gamma=0.5, generator=torch.Generator().manual_seed(0))
    errs = [float((edit(GMM.velocity, z, y, eta=eta, window=(0.0, 0.6), steps=30) - y).norm()) for eta in (0.0, 0.5, 1.0)]
    assert errs[0] > errs[1] > errs[2]


def test_singular_endpoints_and_bad_arguments_raise():
    y = _data(4)
    x0 = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="singular at t = 1"):
        edit(GMM.velocity, x0, y, eta=0.5, steps=4, method="heun")
    with pytest.raises(ValueError, match="singular at t = 0"):
        invert(GMM.velocity, y, gamma=0.5, target_noise=x0, steps=4, method="rk4")
    # heun works when the window stops before the singular end
    out = edit(GMM.velocity, x0, y, eta=0.5, window=(0.0, 0.5), steps=4, method="heun")
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="eta must lie in"):
        ControlledEditing(y, 1.5)
    with pytest.raises(ValueError, match="window"):
        ControlledEditing(y, 0.5, window=(0.6, 0.2))
    with pytest.raises(ValueError, match="shape"):
        invert(GMM.velocity, y, gamma=0.5, target_noise=torch.randn(3, 2, dtype=torch.float64), steps=4)
    with pytest.raises(ValueError, match="NaN"):
        ControlledInversion(torch.full((4, 2), float("nan")), 0.5)
    with pytest.raises(ValueError, match="diffusion"):
        RectifiedSDE(-1.0)


def test_rectified_sde_reproduces_the_mixture():
    """Euler–Maruyama with the score read off the exact velocity keeps the marginals (g = 1 and g = 1.5 (1 − t)).

    The energy distance of 1000 SDE samples to 3000 fresh mixture samples must sit inside the two-sample
    noise band (the largest of 8 distances of independent exact draws of the same sizes), and the SDE must
    actually be stochastic. Dropping the score correction is detected at 20x the band.
    """
    n = 1000
    ref = _data(3000, seed=99)
    floor = max(energy_distance(_data(n, seed=10 + i), ref) for i in range(8))
    gen = torch.Generator().manual_seed(0)
    for g in (1.0, lambda t: 1.5 * (1 - t)):
        x0 = torch.randn(n, 2, dtype=torch.float64, generator=gen)
        cost = Cost()
        out = steerflow.sample(GMM.velocity, x0, steps=200, method="euler", guidance=RectifiedSDE(g),
                               generator=torch.Generator().manual_seed(1), cost=cost)
        assert cost.nfe == 200
        ed = energy_distance(out, ref)
        assert ed < 1.5 * floor, (ed, floor)
        ode = steerflow.sample(GMM.velocity, x0, steps=200, method="euler")
        assert float((out - ode).norm(dim=1).mean()) > 0.1

    class NoCorrection(RectifiedSDE):  # noise without the (g²/2) score drift: wrong marginals
        def velocity(self, v, x, t, dt, *, generator=None, cost=None):
            return v(x, t)

    bad = steerflow.sample(GMM.velocity, torch.randn(n, 2, dtype=torch.float64, generator=gen), steps=200,
                           method="euler", guidance=NoCorrection(1.0), generator=torch.Generator().manual_seed(1))
    assert energy_distance(bad, ref) > 20 * floor


def test_rectified_sde_is_seeded_and_reverses_on_a_decreasing_grid():
    n = 1000
    x1 = _data(n, seed=7)
    a = steerflow.sample(GMM.velocity, x1, ts=uniform_grid(200).flip(0), guidance=RectifiedSDE(1.0),
                         generator=torch.Generator().manual_seed(3))
    b = steerflow.sample(GMM.velocity, x1, ts=uniform_grid(200).flip(0), guidance=RectifiedSDE(1.0),
                         generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # stochastic inversion lands on the source N(0, I)
    g = torch.Generator().manual_seed(8)
    noise = torch.randn(3000, 2, dtype=torch.float64, generator=g)
    floor = max(energy_distance(torch.randn(n, 2, dtype=torch.float64, generator=g), noise) for _ in range(8))
    assert energy_distance(a, noise) < 1.5 * floor
