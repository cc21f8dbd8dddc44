"""Riemannian flow matching: geodesic paths, tangent networks, sampling on M, Riemannian likelihoods,
training through the shared ``train``, and the earth-data loaders."""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from steerflow import sample
from steerflow.data.earth import (EARTH_DATASETS, latlon_to_xyz, load_earth, load_latlon_csv, random_split,
                                  xyz_to_latlon)
from steerflow.manifolds import (SO3, Euclidean, FlatTorus, Hyperbolic, Sphere, TangentVelocity, get_manifold, hat,
                                 manifold_log_likelihood, riemannian_divergence)
from steerflow.paths import LinearPath
from steerflow.paths.geodesic import GeodesicPath

SPECS = ["sphere2", "torus2", "so3", "hyperbolic2", "sphere2xtorus1", "euclidean3"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _Net(nn.Module):
    """A small ambient network ``(x, t) -> R^D`` (deliberately not tangent)."""

    def __init__(self, d: int, seed: int = 0, scale: float = 2.0) -> None:
        super().__init__()
        self.scale = scale
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d + 1, 32), nn.Tanh(), nn.Linear(32, d))

    def forward(self, x, t, cond=None):
        return self.scale * self.net(torch.cat([x, t[:, None].to(x)], -1))


# --- geodesic path ---------------------------------------------------------------------------------

def test_euclidean_geodesic_path_is_exactly_the_linear_path():
    E, lin = Euclidean(4), LinearPath()
    geo = GeodesicPath(E)
    g = _gen(0)
    x_0, x_1, t = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g), torch.rand(64, generator=g)
    a, b = geo.sample(x_0, x_1, t), lin.sample(x_0, x_1, t)
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.u_t, b.u_t)
    v = torch.randn(64, 4, generator=g)
    torch.testing.assert_close(geo.x1_from_velocity(v, a.x_t, t), lin.x1_from_velocity(v, a.x_t, t))
    torch.testing.assert_close(geo.x0_from_velocity(v, a.x_t, t), lin.x0_from_velocity(v, a.x_t, t))
    torch.testing.assert_close(geo.sq_norm(a.x_t, v), (v * v).sum(-1))


@pytest.mark.parametrize("spec", SPECS)
def test_geodesic_path_endpoints_velocity_and_x1_recovery(spec):
    M = get_manifold(spec)
    path = GeodesicPath(M)
    g = _gen(1)
    x_0, x_1 = M.random_base(48, g, dtype=torch.float64), M.random_base(48, g, dtype=torch.float64)
    if spec == "hyperbolic2":  # stay in a moderate region where float64 differences are accurate
        o = M.origin(48, dtype=torch.float64)
        x_0, x_1 = M.expmap(o, 0.5 * M.logmap(o, x_0)), M.expmap(o, 0.5 * M.logmap(o, x_1))
    t = 0.05 + 0.9 * torch.rand(48, generator=g, dtype=torch.float64)
    ps = path.sample(x_0, x_1, t)
    M.check_point(ps.x_t)
    M.check_tangent(ps.x_t, ps.u_t)
    zero, one = torch.zeros(48, dtype=torch.float64), torch.ones(48, dtype=torch.float64)
    torch.testing.assert_close(path.sample(x_0, x_1, zero).x_t, x_0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(path.sample(x_0, x_1, one).x_t, x_1, atol=1e-8, rtol=1e-8)
    # u_t = d/dt x_t by central differences (through log at x_t so the torus seam does not matter)
    h = 1e-6
    fd = (M.logmap(ps.x_t, path.sample(x_0, x_1, t + h).x_t) - M.logmap(ps.x_t, path.sample(x_0, x_1, t - h).x_t)) / (2 * h)
    torch.testing.assert_close(ps.u_t, fd, atol=1e-6, rtol=1e-6)
    # ... = log_{x_t}(x_1) / (1 - t) (Chen & Lipman 2024), and constant speed d(x_0, x_1)
    tt = (1 - t).reshape(-1, *([1] * (x_0.ndim - 1)))
    torch.testing.assert_close(ps.u_t, M.logmap(ps.x_t, x_1) / tt, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(path.sq_norm(ps.x_t, ps.u_t), M.dist(x_0, x_1) ** 2, atol=1e-8, rtol=1e-7)
    # the conditional field's data prediction recovers x_1
    torch.testing.assert_close(path.x1_from_velocity(ps.u_t, ps.x_t, t), x_1, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(path.x0_from_velocity(ps.u_t, ps.x_t, t), x_0, atol=1e-8, rtol=1e-7)


def test_geodesic_path_input_errors():
    path = GeodesicPath(Sphere(2))
    x = Sphere(2).random_base(4, _gen(2))
    with pytest.raises(ValueError, match="same shape"):
        path.sample(x, x[:3], torch.rand(4))
    with pytest.raises(ValueError, match="t must have shape"):
        path.sample(x, x, torch.rand(3))
    with pytest.raises(ValueError, match="shape"):
        path.sample(torch.zeros(4, 4), torch.zeros(4, 4), torch.rand(4))
    with pytest.raises(TypeError):
        GeodesicPath("sphere2")


# --- tangent networks and sampling on M -------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS)
def test_tangent_velocity_outputs_are_tangent(spec):
    M = get_manifold(spec)
    v = TangentVelocity(_Net(M.ambient_dim), M)
    x = M.random_base(32, _gen(3))
    out = v(x, torch.rand(32, generator=_gen(4)))
    assert out.shape == x.shape
    M.check_tangent(x, out, atol=1e-5)
    if spec != "euclidean3" and spec != "torus2":  # the raw network is not tangent: the wrapper matters
        raw = _Net(M.ambient_dim)(x.reshape(32, -1), torch.rand(32)).reshape(x.shape)
        with pytest.raises(ValueError):
            M.check_tangent(x, raw, atol=1e-3)


def test_tangent_velocity_embed_for_the_torus():
    T = FlatTorus(2)
    v = TangentVelocity(lambda h, t: h[:, :2] * h[:, 2:], T, embed=T.periodic_features)
    x = T.random_base(8, _gen(5))
    torch.testing.assert_close(v(x, torch.rand(8)), torch.cos(x) * torch.sin(x))
    torch.testing.assert_close(v(x + 2 * math.pi, torch.rand(8)), v(x, torch.rand(8)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "rk4", "dopri5"])
def test_samples_stay_on_the_manifold(spec, method):
    M = get_manifold(spec)
    # on the hyperboloid the tangent part of an ambient vector grows like x_0²: keep the field moderate
    v = TangentVelocity(_Net(M.ambient_dim, seed=6, scale=0.2 if spec == "hyperbolic2" else 2.0), M)
    x_0 = M.random_base(64, _gen(7))
    with torch.no_grad():
        x_1 = sample(v, x_0, steps=20, method=method, geometry=M, atol=1e-4, rtol=1e-4)
    M.check_point(x_1)  # float32 tolerance (1e-4)
    assert (x_1 - x_0).abs().max() > 1e-2  # it moved


def test_rotation_field_sampled_on_the_sphere_matches_the_exact_rotation():
    """``v(x) = ω × x`` has the flow ``x(t) = expm(t [ω]×) x``. Adaptive dopri5 reaches it to ~1e-4; the
    fixed-step rules converge (the projected exp-map RK4 of ``solvers/steps.py`` is second order on a
    manifold: stage velocities are projected onto ``T_x`` at the base point)."""
    S = Sphere(2)
    omega = torch.tensor([0.3, -1.1, 2.0], dtype=torch.float64)
    x_0 = S.random_base(32, _gen(8), dtype=torch.float64)
    exact = x_0 @ torch.linalg.matrix_exp(hat(omega)).T

    def v(x, t):
        return torch.cross(omega.expand_as(x), x, dim=-1)

    x_1 = sample(v, x_0, method="dopri5", geometry=S, atol=1e-7, rtol=1e-7)
    # dopri5's embedded error estimate does not see the O(h²) geometric defect: 5e-5 measured, not 1e-7
    torch.testing.assert_close(x_1, exact, atol=2e-4, rtol=0)
    for method, min_order in (("euler", 0.9), ("heun", 1.8), ("rk4", 1.8)):
        errs = [float((sample(v, x_0, steps=n, method=method, geometry=S) - exact).abs().max()) for n in (16, 32)]
        assert math.log2(errs[0] / errs[1]) > min_order, (method, errs)


# --- Riemannian divergence --------------------------------------------------------------------------

def _autograd_div(M, field, x):
    x = x.clone().requires_grad_(True)
    out = field(x)
    return riemannian_divergence(M)(out, x, torch.zeros(x.shape[0]), False)


def test_divergence_of_gradient_fields_is_the_laplacian():
    """``div grad f = Δf`` for eigenfunctions: ``Δ z = -n z`` on ``Sⁿ``, ``Δ x_0 = n x_0`` on ``Hⁿ``,
    ``Δ tr(AᵀR) = -2 tr(AᵀR)`` on SO(3) with the metric ½ tr(UᵀW)."""
    g = _gen(9)
    S = Sphere(3)
    x = S.random_base(16, g, dtype=torch.float64)
    e = torch.zeros(4, dtype=torch.float64)
    e[-1] = 1.0
    # the ambient constant field e: its tangent part is grad z; the normal part must not leak in
    div = _autograd_div(S, lambda x: e.expand_as(x), x)
    torch.testing.assert_close(div, -3 * x[:, -1])

    H = Hyperbolic(2)
    y = H.random_base(16, g, dtype=torch.float64)
    # grad_L x_0 = proju(x, G⁻¹ e_0) = proju(x, -e_0)
    e0 = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64)
    div = _autograd_div(H, lambda x: e0.expand_as(x), y)
    torch.testing.assert_close(div, 2 * y[:, 0])

    R = SO3()
    r = R.random_base(16, g, dtype=torch.float64)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    # ⟨grad f, U⟩ = ½ tr(grad fᵀ U) = tr(AᵀU)  ⇒  grad f = proju(R, 2A)
    div = _autograd_div(R, lambda x: 2 * A.expand_as(x), r)
    torch.testing.assert_close(div, -2 * (A * r).sum((-1, -2)))


def test_divergence_on_the_torus_is_the_flat_divergence():
    T = FlatTorus(2)
    x = T.random_base(16, _gen(10), dtype=torch.float64)
    div = _autograd_div(T, lambda x: torch.stack([torch.sin(x[:, 0] + x[:, 1]), torch.cos(2 * x[:, 1])], -1), x)
    torch.testing.assert_close(div, torch.cos(x[:, 0] + x[:, 1]) - 2 * torch.sin(2 * x[:, 1]))


# --- likelihoods of known densities -----------------------------------------------------------------

def test_zero_field_likelihood_is_the_base_density():
    S = Sphere(2)
    x = S.random_base(32, _gen(11), dtype=torch.float64)
    lp = manifold_log_likelihood(lambda x, t: torch.zeros_like(x), x, S, steps=4)
    torch.testing.assert_close(lp, torch.full((32,), -math.log(4 * math.pi), dtype=torch.float64))
    H = Hyperbolic(2)
    y = H.random_base(32, _gen(12), dtype=torch.float64)
    torch.testing.assert_close(manifold_log_likelihood(lambda x, t: torch.zeros_like(x), y, H, steps=4),
                               H.base_log_prob(y))


def test_sphere_likelihood_of_a_latitude_flow_matches_the_closed_form():
    """``v = k ∇z + c e_z × x = k (e_z - z x) + c e_z × x`` moves the height by ``ż = k (1 - z²)`` and
    rotates longitudes. The uniform area is ``dz dφ`` (Archimedes), so
    ``z_1 = tanh(artanh z_0 + k)`` and ``log p_1(x_1) = -log 4π - log((1 - z_1²) / (1 - z_0²))``."""
    S, k, c = Sphere(2), 1.5, 0.7
    ez = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)

    def v(x, t):
        return k * (ez - x[:, 2:3] * x) + c * torch.cross(ez.expand_as(x), x, dim=-1)

    x_1 = S.random_base(64, _gen(13), dtype=torch.float64)
    z_1 = x_1[:, 2]
    z_0 = torch.tanh(torch.atanh(z_1) - k)
    exact = -math.log(4 * math.pi) - torch.log((1 - z_1 ** 2) / (1 - z_0 ** 2))
    with torch.no_grad():
        lp = manifold_log_likelihood(v, x_1, S, method="dopri5", atol=1e-6, rtol=1e-6)
        lp_rk4 = manifold_log_likelihood(v, x_1, S, steps=64)
    assert float((lp - exact).abs().max()) < 1e-3
    assert float((lp_rk4 - exact).abs().max()) < 1e-3
    assert float((exact + math.log(4 * math.pi)).abs().max()) > 1.0  # far from uniform: a real test


def test_torus_likelihood_of_a_separable_flow_matches_the_jacobian():
    """``θ̇_i = a_i + b_i sin(θ_i + c_i)`` per coordinate (no fixed points, ``a > |b|``): the 1-D flow map has
    ``dθ_1/dθ_0 = f(θ_1) / f(θ_0)``, so ``log p_1 = -2 log 2π - Σ_i log(f_i(θ_1) / f_i(θ_0))``, with ``θ_0``
    from SciPy's ``solve_ivp`` (independent of steerflow's solvers)."""
    from scipy.integrate import solve_ivp

    T = FlatTorus(2)
    a, b, c = np.array([1.0, 0.8]), np.array([0.6, -0.5]), np.array([0.3, 1.1])
    at, bt, ct = (torch.tensor(z) for z in (a, b, c))

    def v(x, t):
        return at + bt * torch.sin(x + ct)

    x_1 = T.random_base(32, _gen(14), dtype=torch.float64)
    theta_0 = np.stack([solve_ivp(lambda s, y: a + b * np.sin(y + c), (1.0, 0.0), row, rtol=1e-12, atol=1e-12).y[:, -1]
                        for row in x_1.numpy()])
    theta_0 = torch.tensor(theta_0)
    exact = -2 * math.log(2 * math.pi) - torch.log(v(x_1, None) / v(theta_0, None)).sum(-1)
    with torch.no_grad():
        lp = manifold_log_likelihood(v, x_1, T, steps=32)
    assert float((lp - exact).abs().max()) < 1e-3
    assert float((exact + 2 * math.log(2 * math.pi)).abs().max()) > 0.3


def test_likelihood_of_a_trained_style_network_integrates_to_one_on_s2():
    """A random tangent network's pushforward density is a probability density: its integral over S² by a
    Fibonacci-lattice quadrature is 1, and the sample mean of 1/p under its own samples is the area 4π."""
    S = Sphere(2)
    v = TangentVelocity(_Net(3, seed=15), S).double()
    n = 3000
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5 ** 0.5) * i
    grid = torch.stack([torch.sqrt(1 - z ** 2) * torch.cos(phi), torch.sqrt(1 - z ** 2) * torch.sin(phi), z], -1)
    with torch.no_grad():
        p = manifold_log_likelihood(v, grid, S, steps=24).exp()
    assert abs(float(p.mean() * 4 * math.pi) - 1) < 5e-3


# --- training through the shared loop ---------------------------------------------------------------

def test_riemannian_fm_trains_through_train_and_samples_on_the_sphere():
    from steerflow.models import MLPVelocity
    from steerflow.training import train

    S = Sphere(2)
    g = _gen(16)
    # data: a tight cap around the north pole
    data = S.expmap(torch.tensor([[0.0, 0.0, 1.0]]).expand(1024, 3),
                    S.proju(torch.tensor([[0.0, 0.0, 1.0]]).expand(1024, 3), 0.15 * torch.randn(1024, 3, generator=g)))
    torch.manual_seed(0)
    model = TangentVelocity(MLPVelocity(3, hidden=64, depth=2, time_embed_dim=16), S)
    res = train(model, data, source=S.random_base, path=GeodesicPath(S), steps=300, batch_size=128, lr=3e-3,
                device="cpu", progress=False, log_every=100)
    assert float(res.losses[-50:].mean()) < 0.6 * float(res.losses[:20].mean())
    with torch.no_grad():
        x = sample(model, S.random_base(512, _gen(17)), steps=20, method="heun", geometry=S)
        S.check_point(x)
        assert float(x[:, 2].mean()) > 0.7  # the uniform source has mean height 0
        ll_data = manifold_log_likelihood(model, data[:64], S, steps=16).mean()
    assert float(ll_data) > -math.log(4 * math.pi) + 1.0  # beats the uniform density on the data


# --- earth data -------------------------------------------------------------------------------------

def test_latlon_xyz_round_trip():
    lat = torch.tensor([0.0, 90.0, -90.0, 45.0, -33.3, 10.0])
    lon = torch.tensor([0.0, 0.0, 0.0, 180.0, -120.5, 359.0])
    x = latlon_to_xyz(lat, lon, dtype=torch.float64)
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(x[0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(x[1], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-12, rtol=0)
    la, lo = xyz_to_latlon(x)
    torch.testing.assert_close(la, lat.double(), atol=1e-9, rtol=0)
    torch.testing.assert_close(lo[[0, 4]], lon[[0, 4]].double(), atol=1e-9, rtol=0)
    torch.testing.assert_close(lo[5], torch.tensor(-1.0, dtype=torch.float64), atol=1e-9, rtol=0)  # 359° = -1°
    with pytest.raises(ValueError, match="latitude"):
        latlon_to_xyz([91.0], [0.0])
    with pytest.raises(ValueError, match="NaN"):
        latlon_to_xyz([float("nan")], [0.0])


def test_load_latlon_csv_with_comments_and_header(tmp_path):
    f = tmp_path / "events.csv"
    f.write_text("# source: somewhere\n# another comment\nLongitude,Latitude,mag\n\n10.5,-20.25,3\n-170,45,4\n"
                 "# trailing comment\n0,0,1\n")
    x = load_latlon_csv(f)
    assert x.shape == (3, 3) and x.dtype == torch.float32
    torch.testing.assert_close(x, latlon_to_xyz([-20.25, 45.0, 0.0], [10.5, -170.0, 0.0]))
    g = tmp_path / "plain.csv"  # no header: first two columns are lat, lon
    g.write_text("12.5,100\n-3,-60\n")
    torch.testing.assert_close(load_latlon_csv(g), latlon_to_xyz([12.5, -3.0], [100.0, -60.0]))
    h = tmp_path / "named.csv"
    h.write_text("id,LAT,LONG\n1,10,20\n")
    torch.testing.assert_close(load_latlon_csv(h), latlon_to_xyz([10.0], [20.0]))


@pytest.mark.parametrize("body, match", [("lat,lon\n95,10\n", "outside"), ("lat,lon\n10,400\n", "outside"),
                                         ("lat,lon\nnan,10\n", "NaN"), ("lat,lon\n10,20\nabc,3\n", "non-numeric"),
                                         ("# only a comment\nlat,lon\n", "no latitude")])
def test_load_latlon_csv_errors(tmp_path, body, match):
    f = tmp_path / "bad.csv"
    f.write_text(body)
    with pytest.raises(ValueError, match=match):
        load_latlon_csv(f)


def test_load_earth_errors_and_split(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_latlon_csv(tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match="volcano"):
        load_earth("volcano", root=tmp_path)
    with pytest.raises(ValueError, match="unknown earth dataset"):
        load_earth("tsunami")
    (tmp_path / "volerup.csv").write_text("# url\nLatitude,Longitude\n1,2\n3,4\n5,6\n7,8\n9,10\n")
    x = load_earth("volcano", root=tmp_path)
    assert x.shape == (5, 3)
    parts = random_split(torch.arange(100.0)[:, None], (0.8, 0.1, 0.1), generator=_gen(0))
    assert [p.shape[0] for p in parts] == [80, 10, 10]
    assert sorted(torch.cat(parts).flatten().tolist()) == list(range(100))


# all three catalogues (the package ships two): $STEERFLOW_EARTH_DATA, else the repository's ../shared/data/earth
SHARED_EARTH = Path(os.environ.get("STEERFLOW_EARTH_DATA") or Path(__file__).resolve().parents[2] / "shared/data/earth")


@pytest.mark.skipif(not (SHARED_EARTH / "flood.csv").exists(), reason="shared earth data not present")
def test_load_earth_shared_catalogues():
    sizes = {"volcano": 827, "earthquake": 6120, "flood": 4875}
    for name in EARTH_DATASETS:
        x = load_earth(name, root=SHARED_EARTH)
        assert x.shape == (sizes[name], 3)
        Sphere(2).check_point(x)


# --- points a learned flow does not reach ----------------------------------------------------------

def _escaping_field(H):
    """``v = -φ(x_1) grad x_1`` with ``φ = (x_1 + sqrt(1 + x_1²)) / sqrt(1 + x_1²)``: backward, ``x_1 = sinh s``
    moves by ``ds/dτ = e^s``, so from every point with ``x_1 > 0`` it reaches infinity before τ = 1."""
    def v(x, t):
        e1 = torch.zeros_like(x)
        e1[:, 1] = 1
        r = torch.sqrt(1 + x[:, 1:2] ** 2)
        return -((x[:, 1:2] + r) / r) * H.proju(x, e1)
    return v


@pytest.mark.parametrize("dtype, method", [(torch.float32, "rk4"), (torch.float64, "rk4"),
                                           (torch.float64, "dopri5")])
def test_hyperbolic_points_that_escape_get_minus_inf_and_the_others_are_kept(dtype, method):
    H = Hyperbolic(2)
    v = _escaping_field(H)
    x1 = torch.tensor([-1.0, -0.5, 0.8, 1.5, -2.0, 0.05])
    x = H.projx(torch.stack([torch.zeros(6), x1, 0.3 * torch.ones(6)], -1)).to(dtype)
    ode = {"method": method} if method == "dopri5" else {"method": method, "steps": 64}
    with pytest.warns(RuntimeWarning, match="3 of 6 points left the numeric range of hyperbolic2"):
        lp = manifold_log_likelihood(v, x, H, **ode)
    escaping = x1 > 0
    assert bool((lp[escaping] == -math.inf).all()) and bool(torch.isfinite(lp[~escaping]).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the others alone: nothing escapes
        alone = manifold_log_likelihood(v, x[~escaping], H, **ode)
    # a fixed-step solve gives the very same numbers; dopri5 chose its steps for another batch
    torch.testing.assert_close(lp[~escaping], alone, rtol=0, atol=0 if method == "rk4" else 1e-5)


def test_hyperbolic_numeric_range_is_where_the_hyperboloid_is_resolved():
    H = Hyperbolic(2)
    at = lambda r, dtype: H.expmap(H.origin(1, dtype=dtype), torch.tensor([[0.0, r, 0.0]], dtype=dtype))
    assert bool(H.in_numeric_range(at(5.0, torch.float32))) and bool(H.in_numeric_range(at(15.0, torch.float64)))
    assert not bool(H.in_numeric_range(at(10.0, torch.float32)))
    assert not bool(H.in_numeric_range(at(20.0, torch.float64)))
    assert not bool(H.in_numeric_range(torch.tensor([[math.inf, 0.0, 0.0]])))
    assert Sphere(2).in_numeric_range(Sphere(2).random_base(4, _gen(0))).all()
