"""Geometry of the manifolds: exp/log inverses, projections, tangent bases, special cases, base densities."""
from __future__ import annotations

import math

import pytest
import torch

from steerflow.manifolds import (MANIFOLDS, SO3, AbstractManifold, Euclidean, FlatTorus, Hyperbolic, Product,
                                 Sphere, get_manifold, hat, rodrigues, rotation_log, vee)

SPECS = ["euclidean3", "sphere2", "sphere4", "torus2", "so3", "hyperbolic2", "hyperbolic3", "sphere2xtorus1",
         "so3xhyperbolic2"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tangent(M: AbstractManifold, x: torch.Tensor, scale: float, g: torch.Generator) -> torch.Tensor:
    return M.proju(x, scale * torch.randn(x.shape, generator=g, dtype=x.dtype))


@pytest.mark.parametrize("spec", SPECS)
def test_exp_log_inverse_and_distance(spec):
    M = get_manifold(spec)
    g = _gen(1)
    x = M.random_base(128, g, dtype=torch.float64)
    y = M.random_base(128, g, dtype=torch.float64)
    M.check_point(x)
    u = M.logmap(x, y)
    M.check_tangent(x, u)
    # relative tolerance: hyperbolic coordinates grow like e^r
    torch.testing.assert_close(M.expmap(x, u), y, atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(M.dist(x, y), M.norm(x, u), atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(M.dist(x, y), M.dist(y, x), atol=1e-9, rtol=0)
    # log(x, exp(x, u)) = u for tangent u short enough to stay inside the injectivity radius
    w = _tangent(M, x, 0.3, g)
    torch.testing.assert_close(M.logmap(x, M.expmap(x, w)), w, atol=1e-9, rtol=1e-8)
    assert M.dist(x, x).abs().max() < 1e-6


@pytest.mark.parametrize("spec", SPECS)
def test_float32_roundtrip_stays_on_manifold(spec):
    M = get_manifold(spec)
    g = _gen(2)
    x, y = M.random_base(256, g), M.random_base(256, g)
    M.check_point(x)
    y2 = M.expmap(x, M.logmap(x, y))
    M.check_point(y2)
    # float32 exp/log in the Lorentz model loses ~eps·x_0² far from the origin: scale by the coordinates
    scale = 1 + x.reshape(256, -1).abs().amax(-1) ** 2
    assert (M.dist(y2.double(), y.double()) <= 2e-4 * scale).all()


@pytest.mark.parametrize("spec", SPECS)
def test_projections_idempotent(spec):
    M = get_manifold(spec)
    g = _gen(3)
    x = M.random_base(64, g, dtype=torch.float64)
    noisy = x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    p = M.projx(noisy)
    M.check_point(p)
    torch.testing.assert_close(M.projx(p), p, atol=1e-10, rtol=0)
    torch.testing.assert_close(M.projx(x), x, atol=1e-10, rtol=0)
    a = torch.randn(x.shape, generator=g, dtype=torch.float64)
    pu = M.proju(x, a)
    torch.testing.assert_close(M.proju(x, pu), pu, atol=1e-10, rtol=0)
    # orthogonal projection: the removed part is metric-orthogonal to every tangent vector
    w = _tangent(M, x, 1.0, g)
    torch.testing.assert_close((M.covector(x, a - pu) * w).reshape(64, -1).sum(-1), torch.zeros(64, dtype=torch.float64),
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize("spec", SPECS)
def test_tangent_basis_orthonormal(spec):
    M = get_manifold(spec)
    x = M.random_base(32, _gen(4), dtype=torch.float64)
    E = M.tangent_basis(x)
    assert E.shape == (32, M.ambient_dim, M.dim)
    cols = [E[:, :, i].reshape(x.shape) for i in range(M.dim)]
    for i, e in enumerate(cols):
        M.check_tangent(x, e)
        for j, f in enumerate(cols):
            torch.testing.assert_close(M.inner(x, e, f), torch.full((32,), float(i == j), dtype=torch.float64),
                                       atol=1e-10, rtol=0)


@pytest.mark.parametrize("spec", SPECS)
def test_geodesic_velocity_matches_finite_differences(spec):
    M = get_manifold(spec)
    g = _gen(5)
    x = M.random_base(32, g, dtype=torch.float64)
    u = _tangent(M, x, 0.7, g)
    t = torch.rand(32, generator=g, dtype=torch.float64)
    h = 1e-6
    shape = (-1,) + (1,) * (x.ndim - 1)
    ahead, behind = M.expmap(x, (t + h).reshape(shape) * u), M.expmap(x, (t - h).reshape(shape) * u)
    x_t = M.expmap(x, t.reshape(shape) * u)
    # central difference through log at x_t (tangent there; right across the torus seam too)
    fd = (M.logmap(x_t, ahead) - M.logmap(x_t, behind)) / (2 * h)
    torch.testing.assert_close(M.geodesic_velocity(x, u, t), fd, atol=1e-6, rtol=1e-6)
    # the generic forward-mode default agrees with each closed form
    torch.testing.assert_close(AbstractManifold.geodesic_velocity(M, x, u, t), M.geodesic_velocity(x, u, t),
                               atol=1e-9, rtol=1e-9)


def test_registry_specs_and_errors():
    assert isinstance(get_manifold("sphere2"), Sphere) and get_manifold("sphere2").shape == (3,)
    assert isinstance(get_manifold("torus2"), FlatTorus)
    assert isinstance(get_manifold("so3"), SO3)
    assert isinstance(get_manifold("hyperbolic2"), Hyperbolic) and get_manifold("hyperbolic2").shape == (3,)
    P = get_manifold("sphere2xtorus1")
    assert isinstance(P, Product) and P.shape == (4,) and P.dim == 3 and P.shapes == ((3,), (1,))
    assert get_manifold("so3xsphere2").shape == (12,) and get_manifold("so3xsphere2").shapes == ((3, 3), (3,))
    assert get_manifold(P) is P
    assert set(MANIFOLDS) == {"euclidean", "sphere", "torus", "so3", "hyperbolic"}
    for bad in ("sphere", "klein2", "so4", "sphere2x", "sphere0"):
        with pytest.raises(ValueError):
            get_manifold(bad)
    with pytest.raises(TypeError):
        get_manifold(3)
    with pytest.raises(ValueError, match="not on sphere2"):
        Sphere(2).check_point(torch.ones(4, 3))
    with pytest.raises(ValueError, match="shape"):
        Sphere(2).check_point(torch.ones(4, 4))


def test_product_splits_factors():
    P = Product(Sphere(2), SO3(), FlatTorus(1))
    x = P.random_base(8, _gen(6), dtype=torch.float64)
    s, r, a = P.split(x)
    assert s.shape == (8, 3) and r.shape == (8, 3, 3) and a.shape == (8, 1)
    torch.testing.assert_close(P.join([s, r, a]), x)
    y = P.random_base(8, _gen(7), dtype=torch.float64)
    d2 = Sphere(2).dist(s, P.split(y)[0]) ** 2 + SO3().dist(r, P.split(y)[1]) ** 2 + FlatTorus(1).dist(a, P.split(y)[2]) ** 2
    torch.testing.assert_close(P.dist(x, y), d2.sqrt())
    torch.testing.assert_close(P.base_log_prob(x), torch.full((8,), -math.log(4 * math.pi) - math.log(8 * math.pi ** 2)
                                                              - math.log(2 * math.pi), dtype=torch.float64))


# --- torus ---------------------------------------------------------------------------------------

def test_torus_wraps_the_short_way():
    T = FlatTorus(1)
    x = torch.tensor([[0.1], [6.2], [3.0]], dtype=torch.float64)
    y = torch.tensor([[6.2], [0.1], [3.2]], dtype=torch.float64)
    u = T.logmap(x, y)
    expected = torch.tensor([[6.2 - 2 * math.pi - 0.1], [0.1 + 2 * math.pi - 6.2], [0.2]], dtype=torch.float64)
    torch.testing.assert_close(u, expected)
    assert (u[:2].abs() < 0.2).all()  # across the seam, not the long way round
    torch.testing.assert_close(T.expmap(x, u), y)
    z = T.expmap(torch.tensor([[6.0]]), torch.tensor([[1.0]]))
    assert 0 <= float(z) < 2 * math.pi and abs(float(z) - (7.0 - 2 * math.pi)) < 1e-6
    assert float(T.projx(torch.tensor([[-1e-9]]))) < 2 * math.pi  # never exactly 2π
    with pytest.raises(ValueError):
        T.check_point(torch.tensor([[2 * math.pi]]))


# --- SO(3) ---------------------------------------------------------------------------------------

def test_so3_rodrigues_matches_matrix_exponential():
    g = _gen(8)
    for scale in (1e-9, 1e-4, 0.5, 3.0):
        w = torch.randn(64, 3, generator=g, dtype=torch.float64)
        w = scale * w / w.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(rodrigues(w), torch.linalg.matrix_exp(hat(w)), atol=1e-12, rtol=0)
        torch.testing.assert_close(vee(hat(w)), w)


@pytest.mark.parametrize("angle", [0.0, 1e-10, 1e-6, 1e-3, 0.5, 2.0, math.pi - 1e-2, math.pi - 1e-5,
                                   math.pi - 1e-8])
def test_so3_log_near_zero_and_pi(angle):
    g = _gen(9)
    n = torch.randn(32, 3, generator=g, dtype=torch.float64)
    n = n / n.norm(dim=-1, keepdim=True)
    w = angle * n
    Q = torch.linalg.matrix_exp(hat(w))
    w_rec = rotation_log(Q)
    assert torch.isfinite(w_rec).all()
    torch.testing.assert_close(w_rec.norm(dim=-1), torch.full((32,), angle, dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(w_rec, w, atol=2e-7, rtol=0)
    torch.testing.assert_close(rodrigues(w_rec), Q, atol=1e-12, rtol=0)


def test_so3_log_at_exactly_pi_gives_a_valid_logarithm():
    axes = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]], dtype=torch.float64)
    axes = axes / axes.norm(dim=-1, keepdim=True)
    Q = torch.eye(3, dtype=torch.float64) + 2 * hat(axes) @ hat(axes)  # rotation by π: I + 2K²
    w = rotation_log(Q)
    torch.testing.assert_close(w.norm(dim=-1), torch.full((4,), math.pi, dtype=torch.float64))
    torch.testing.assert_close(rodrigues(w), Q, atol=1e-12, rtol=0)


def test_so3_float32_near_pi_and_zero():
    R = SO3()
    x = R.random_base(64, _gen(10))
    for angle in (1e-7, math.pi - 1e-4):
        n = torch.nn.functional.normalize(torch.randn(64, 3, generator=_gen(11)), dim=-1)
        y = x @ rodrigues(angle * n)
        u = R.logmap(x, y)
        assert torch.isfinite(u).all()
        torch.testing.assert_close(R.expmap(x, u), y, atol=2e-5, rtol=0)
        torch.testing.assert_close(R.dist(x, y), torch.full((64,), angle), atol=5e-4, rtol=0)


def test_so3_haar_base_is_uniform():
    """Haar measure: the rotation angle has density (1 - cos θ) / π on [0, π], so E[θ] = π/2 + 2/π,
    and E[R] = 0 (all matrix entries mean zero)."""
    R = SO3()
    x = R.random_base(40_000, _gen(12), dtype=torch.float64)
    theta = R.dist(torch.eye(3, dtype=torch.float64).expand_as(x), x)
    assert abs(float(theta.mean()) - (math.pi / 2 + 2 / math.pi)) < 0.02
    assert float(x.mean(0).abs().max()) < 0.02
    # left-invariance: Q x has the same angle law
    Q = R.random_base(1, _gen(13), dtype=torch.float64)
    theta_q = R.dist(torch.eye(3, dtype=torch.float64).expand_as(x), Q @ x)
    assert abs(float(theta_q.mean() - theta.mean())) < 0.03


# --- hyperbolic ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3])
def test_hyperbolic_wrapped_normal_density_integrates_to_one(n):
    """∫ p dV in geodesic polar coordinates ``dV = sinh(r)^{n-1} dr dΩ`` with the implemented log density
    evaluated at ``exp_o(r ξ)`` for directions ``ξ``."""
    sigma = 0.8
    H = Hyperbolic(n, base_std=sigma)
    r = torch.linspace(1e-6, 10 * sigma, 4001, dtype=torch.float64)
    g = _gen(14)
    xi = torch.nn.functional.normalize(torch.randn(8, n, generator=g, dtype=torch.float64), dim=-1)
    o = H.origin(r.numel(), dtype=torch.float64)
    area = 2 * math.pi ** (n / 2) / math.gamma(n / 2)  # |S^{n-1}|
    for d in xi:
        u = torch.cat([torch.zeros(r.numel(), 1, dtype=torch.float64), r[:, None] * d], -1)
        x = H.expmap(o, u)
        p = H.base_log_prob(x).exp() * torch.sinh(r) ** (n - 1)
        total = area * torch.trapezoid(p, r)
        assert abs(float(total) - 1) < 1e-6
        # closed form: N(v; 0, σ²) (r / sinh r)^{n-1}
        closed = -0.5 * r ** 2 / sigma ** 2 - 0.5 * n * math.log(2 * math.pi * sigma ** 2) \
            - (n - 1) * torch.log(torch.sinh(r) / r)
        torch.testing.assert_close(H.base_log_prob(x), closed, atol=1e-9, rtol=1e-9)


def test_hyperbolic_base_samples_follow_the_wrapped_normal():
    """``d(o, x) = |v|`` with ``v ~ N(0, σ² I_n)``: for n = 2, E[d] = σ √(π/2), E[d²] = 2σ²."""
    sigma = 0.7
    H = Hyperbolic(2, base_std=sigma)
    x = H.random_base(50_000, _gen(15), dtype=torch.float64)
    H.check_point(x)
    d = H.dist(H.origin(x.shape[0], dtype=torch.float64), x)
    assert abs(float(d.mean()) - sigma * math.sqrt(math.pi / 2)) < 0.01
    assert abs(float((d ** 2).mean()) - 2 * sigma ** 2) < 0.02


def test_sphere_base_log_prob_and_uniformity():
    assert abs(float(Sphere(2).base_log_prob(torch.zeros(1, 3, dtype=torch.float64))) + math.log(4 * math.pi)) < 1e-12
    assert abs(float(Sphere(1).base_log_prob(torch.zeros(1, 2, dtype=torch.float64))) + math.log(2 * math.pi)) < 1e-12
    assert abs(float(Sphere(3).base_log_prob(torch.zeros(1, 4, dtype=torch.float64))) + math.log(2 * math.pi ** 2)) < 1e-12
    x = Sphere(2).random_base(40_000, _gen(16), dtype=torch.float64)
    assert float(x.mean(0).abs().max()) < 0.02  # Archimedes: z ~ U[-1, 1], E[x] = 0
    assert abs(float((x[:, 2] ** 2).mean()) - 1 / 3) < 0.01


def test_euclidean_is_flat():
    E = Euclidean(3)
    x = E.random_base(16, _gen(17), dtype=torch.float64)
    torch.testing.assert_close(E.base_log_prob(x), -0.5 * (x ** 2).sum(-1) - 1.5 * math.log(2 * math.pi))
    torch.testing.assert_close(E.retract(x, x), 2 * x)


def test_product_periodic_features_embed_torus_factors_and_keep_the_rest():
    """S² × SO(3) × T¹ (× T² nested): torus angles become (cos, sin), other factors their flattened coordinates;
    the features are 2π-periodic in every angle."""
    P = Product(Sphere(2), SO3(), Product(FlatTorus(1), FlatTorus(2)))
    x = P.random_base(5, torch.Generator().manual_seed(0), dtype=torch.float64)
    f = P.periodic_features(x)
    assert f.shape == (5, 3 + 9 + 2 + 4)
    s2, r, tor = P.split(x)
    torch.testing.assert_close(f[:, :3], s2)
    torch.testing.assert_close(f[:, 3:12], r.reshape(5, 9))
    torch.testing.assert_close(f[:, 12:], Product(FlatTorus(1), FlatTorus(2)).periodic_features(tor))
    shifted = x.clone()
    shifted[:, 12:] += 2 * math.pi * torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(P.periodic_features(shifted), f, rtol=0, atol=1e-12)


# --- the torus's coordinates -------------------------------------------------------------------------

def test_torus_refusal_names_the_expected_range_and_the_way_to_it():
    T = FlatTorus(2)
    signed = torch.tensor([[-3.0, 3.1], [0.5, -1.0]])
    with pytest.raises(ValueError, match=r"expected angles in radians in \[0, 2π\).*got values in \[-3, 3\.1\]"
                                         r".*FlatTorus\.wrap"):
        T.check_point(signed)
    with pytest.raises(ValueError, match="degrees"):
        T.check_point(torch.tensor([[10.0, 350.0]]))


def test_torus_wrap_takes_angles_in_minus_pi_to_pi_to_the_same_points():
    T = FlatTorus(2)
    a = torch.rand(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 * math.pi - math.pi
    a[0] = torch.tensor([-math.pi, math.pi - 1e-12], dtype=torch.float64)
    x = T.wrap(a)
    T.check_point(x)
    torch.testing.assert_close(T.dist(x, a), torch.zeros(64, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(T.wrap(x), x, rtol=0, atol=0)  # [0, 2π) is kept as it is
    torch.testing.assert_close(T.wrap(torch.tensor([[-math.pi, math.pi]])), torch.full((1, 2), math.pi))  # float32
    with pytest.raises(ValueError, match=r"\[-π, 2π\].*got values in \[10, 350\].*degrees"):
        T.wrap(torch.tensor([[10.0, 350.0]]))
    with pytest.raises(ValueError, match="NaN"):
        T.wrap(torch.tensor([[math.nan, 1.0]]))
