"""Reflected domains (Xie et al. 2024): the fold, its Jacobian, billiard steps, bases, the reflected path."""
import math

import pytest
import torch

from steerflow.manifolds.domains import Box, ReflectedPath, Simplex
from steerflow.solvers import sample

D64 = torch.float64


def _inside_box(n, box, gen):
    return box._uniform(n, gen, D64)


DOMAINS = [lambda: Box([0.0, -1.0, 2.0], [1.0, 0.5, 5.0]), lambda: Simplex(3), lambda: Simplex(2)]


@pytest.mark.parametrize("make", DOMAINS)
def test_reflect_identity_inside_idempotent_and_lands_inside(make, gen):
    dom = make()
    x = dom._uniform(500, gen, D64)
    assert torch.equal(dom.reflect(x), x)
    far = (1e3 if isinstance(dom, Box) else 30.0) * torch.randn(500, dom.dim, generator=gen, dtype=D64)
    near = 3 * torch.randn(500, dom.dim, generator=gen, dtype=D64)
    for y in (far, near):
        r = dom.reflect(y)
        assert dom.contains(r, atol=1e-9).all()
        torch.testing.assert_close(dom.reflect(r), r, atol=1e-12, rtol=0)


@pytest.mark.parametrize("make", DOMAINS)
def test_fold_is_a_local_isometry_with_the_reflected_jacobian(make, gen):
    """Away from walls crossings the fold is a composition of reflections: distances are kept and its
    derivative along u is J_R(y) u, an orthogonal map (|J u| = |u|)."""
    dom = make()
    y = 2.5 * torch.randn(400, dom.dim, generator=gen, dtype=D64)
    u = torch.randn(400, dom.dim, generator=gen, dtype=D64)
    R, Ju = dom.reflect_velocity(y, u)
    eps = 1e-7
    R2, _ = dom.reflect_velocity(y + eps * u, u)
    fd = (R2 - R) / eps
    ok = (fd - Ju).norm(dim=-1) < 1e-5            # the few pairs that straddle a wall crossing are excluded
    assert ok.float().mean() > 0.97
    torch.testing.assert_close(Ju.norm(dim=-1), u.norm(dim=-1))
    torch.testing.assert_close((R2 - R).norm(dim=-1)[ok], eps * u.norm(dim=-1)[ok], rtol=1e-6, atol=0)


def test_box_fold_is_the_unfolding_orbit_and_1_lipschitz(gen):
    """R(y) lies in the orbit of y under the reflections: y - low ≡ ±(R(y) - low) mod 2L per coordinate."""
    box = Box([0.0, -1.0], [1.0, 2.0])
    y = 20 * torch.randn(1000, 2, generator=gen, dtype=D64)
    r = box.reflect(y)
    L = box.high - box.low
    k_plus = (y - r) / (2 * L)
    k_minus = (y - (2 * box.low - r)) / (2 * L)
    integral = lambda k: (k - k.round()).abs() < 1e-9
    assert (integral(k_plus) | integral(k_minus)).all()
    y2 = y + 0.3 * torch.randn(1000, 2, generator=gen, dtype=D64)
    assert ((box.reflect(y2) - r).norm(dim=-1) <= (y2 - y).norm(dim=-1) + 1e-12).all()


def test_simplex_billiard_matches_the_fold_where_reflections_tile(gen):
    """The 2-D corner simplex (a 45-45-90 triangle) tiles the plane by reflections, so the billiard end point
    depends only on the unfolded end point x + dx: billiard(x, dx) = reflect(x + dx), many reflections
    included. Its length is |dx|, so the end point is within |dx| of x."""
    s = Simplex(2)
    x = s._uniform(300, gen, D64)
    dx = 4 * torch.randn(300, 2, generator=gen, dtype=D64)
    end = s.retract(x, dx)
    assert s.contains(end, atol=1e-9).all()
    torch.testing.assert_close(end, s.reflect(x + dx), atol=1e-9, rtol=0)
    assert ((end - x).norm(dim=-1) <= dx.norm(dim=-1) + 1e-9).all()
    s3 = Simplex(3)
    x3 = s3._uniform(300, gen, D64)
    end3 = s3.retract(x3, 4 * torch.randn(300, 3, generator=gen, dtype=D64))
    assert s3.contains(end3, atol=1e-9).all()


@pytest.mark.parametrize("make", DOMAINS)
def test_proju_identity_inside_and_removes_outward_component_on_walls(make, gen):
    dom = make()
    x = dom._uniform(100, gen, D64)
    v = torch.randn(100, dom.dim, generator=gen, dtype=D64)
    torch.testing.assert_close(dom.proju(x, v), v)
    on_wall = x.clone()
    on_wall[:, 0] = 0.0 if isinstance(dom, Simplex) else float(dom.low[0])
    v = -torch.ones(100, dom.dim, dtype=D64)           # pushes out through the wall x_0 = low
    p = dom.proju(on_wall, v)
    assert (p[:, 0] == 0).all()


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "dopri5"])
def test_sampling_with_box_geometry_keeps_every_stage_inside(method, gen):
    box = Box(0.0, 1.0, dim=2)
    seen = []

    def v(x, t):                                        # strongly outward: a flat solve leaves the box
        seen.append(x.detach().clone())
        return 6.0 * (x - 0.5) + torch.tensor([3.0, -2.0], dtype=x.dtype)

    x_0 = box.random_base(256, gen, dtype=D64)
    kw = dict(steps=8) if method != "dopri5" else {}
    out = sample(v, x_0, method=method, geometry=box, **kw)
    assert box.contains(out).all()
    assert all(box.contains(x).all() for x in seen)
    flat = sample(v, x_0, method=method, **kw)
    assert not box.contains(flat).all()


def test_bases_supported_in_the_domain_and_normalised(gen):
    box = Box([0.0, -1.0], [1.0, 2.0])
    x = box.random_base(1000, gen)
    assert box.contains(x).all()
    torch.testing.assert_close(box.base_log_prob(x), torch.full((1000,), -math.log(3.0)))
    assert box.base_log_prob(torch.tensor([[2.0, 0.0]])).item() == -math.inf
    fold = Box([0.0, -1.0], [1.0, 2.0], base="folded_normal", scale=0.6)
    u = box._uniform(100_000, gen, D64)
    mass = fold.base_log_prob(u).exp().mean() * fold.volume()
    assert abs(float(mass) - 1.0) < 0.01
    xs = fold.random_base(100_000, gen, dtype=D64)
    assert fold.contains(xs).all()
    frac = (xs[:, 0] < 0.25).double().mean()
    pred = ((u[:, 0] < 0.25).double() * fold.base_log_prob(u).exp()).mean() * fold.volume()
    assert abs(float(frac - pred)) < 0.01
    simplex = Simplex(3)
    xs = simplex.random_base(1000, gen)
    assert simplex.contains(xs).all()
    torch.testing.assert_close(simplex.base_log_prob(xs), torch.full((1000,), math.log(6.0)))


@pytest.mark.parametrize("make", [lambda: Box(0.0, 1.0, dim=2, base="folded_normal"), lambda: Simplex(2, base="folded_normal")])
def test_reflected_path_stays_inside_and_its_target_is_the_time_derivative(make, gen):
    dom = make()
    path = ReflectedPath(dom)
    b = 400
    x_1 = dom._uniform(b, gen, D64)
    x_0 = dom.random_source(b, gen, dtype=D64)
    t = torch.rand(b, generator=gen, dtype=D64)
    s = path.sample(x_0, x_1, t)
    assert dom.contains(s.x_t, atol=1e-9).all()
    h = 1e-7
    fd = (path.sample(x_0, x_1, t + h).x_t - s.x_t) / h
    ok = (fd - s.u_t).norm(dim=-1) < 1e-4              # excludes the rare pairs hitting a wall within h
    assert ok.float().mean() > 0.98
    assert not torch.allclose(s.u_t, x_1 - x_0)        # some targets were reflected
    torch.testing.assert_close(path.sample(x_0, x_1, torch.ones(b, dtype=D64)).x_t, x_1, atol=1e-9, rtol=0)
    torch.testing.assert_close(path.sample(x_0, x_1, torch.zeros(b, dtype=D64)).x_t, dom.reflect(x_0))


def test_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="low < high"):
        Box([0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="needs dim"):
        Box(0.0, 1.0)
    with pytest.raises(ValueError, match="base"):
        Simplex(2, base="gaussian")
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\) or \(b, \*event\)"):
        Box(0.0, 1.0, dim=2).reflect(torch.zeros(3, 3))
    with pytest.raises(TypeError):
        ReflectedPath("box")


def test_domains_are_exported_by_manifolds():
    import steerflow.manifolds as m

    assert m.Box is Box and m.Simplex is Simplex and m.ReflectedPath is ReflectedPath


def test_box_acts_on_images_of_any_event_shape(gen):
    """A pixel box Box(-1, 1, dim=C·H·W) takes states (b, C, H, W) as they are (the sampler's shapes)."""
    box = Box(-1.0, 1.0, dim=64)
    x = 3 * torch.randn(5, 1, 8, 8, generator=gen, dtype=D64)
    r = box.reflect(x)
    assert r.shape == x.shape and box.contains(r).shape == (5,) and box.contains(r).all()
    torch.testing.assert_close(r.reshape(5, 64), box.reflect(x.reshape(5, 64)))
    out = sample(lambda z, t: 4 * z, r, steps=4, geometry=box)
    assert out.shape == x.shape and box.contains(out).all()
    assert box.proju(r, torch.ones_like(r)).shape == x.shape
    assert box.base_log_prob(r).shape == (5,)
