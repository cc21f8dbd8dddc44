import pytest
import torch

from steerflow.paths import SCHEDULES, AffinePath, LinearPath, get_path


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_boundaries_and_derivatives(name):
    path = AffinePath(name)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    c = path.schedule(t)
    # the VP schedule reaches alpha = 0 only in the limit: alpha_0 = exp(-(beta_min + beta_max) / 4)
    atol = 1e-2 if name == "vp" else 1e-12
    assert torch.allclose(c.alpha_t, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=atol)
    assert torch.allclose(c.sigma_t, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=atol)
    # derivatives against central finite differences in float64
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    cp, cm, c = path.schedule(t + h), path.schedule(t - h), path.schedule(t)
    assert torch.allclose((cp.alpha_t - cm.alpha_t) / (2 * h), c.d_alpha_t, rtol=1e-6, atol=1e-7)
    assert torch.allclose((cp.sigma_t - cm.sigma_t) / (2 * h), c.d_sigma_t, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["linear", "cosine", "vp", "polynomial"])
def test_velocity_conversions_round_trip_float64(name, gen):
    path = get_path(name)
    x_0 = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    x_1 = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    t = torch.rand(64, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    s = path.sample(x_0, x_1, t)
    # the conditional velocity is exactly recovered into (x_1, x_0)
    assert torch.allclose(path.x1_from_velocity(s.u_t, s.x_t, t), x_1, atol=1e-10)
    assert torch.allclose(path.x0_from_velocity(s.u_t, s.x_t, t), x_0, atol=1e-10)
    assert torch.allclose(path.velocity_from_x1(x_1, s.x_t, t), s.u_t, atol=1e-9)
    assert torch.allclose(path.velocity_from_x0(x_0, s.x_t, t), s.u_t, atol=1e-9)
    score = path.score_from_velocity(s.u_t, s.x_t, t)
    assert torch.allclose(path.velocity_from_score(score, s.x_t, t), s.u_t, atol=1e-9)


def test_linear_path_matches_affine_linear(gen):
    x_0, x_1 = torch.randn(2, 8, 5, generator=gen, dtype=torch.float64)
    t = torch.rand(8, generator=gen, dtype=torch.float64)
    a, b = LinearPath().sample(x_0, x_1, t), AffinePath("linear").sample(x_0, x_1, t)
    assert torch.allclose(a.x_t, b.x_t) and torch.allclose(a.u_t, b.u_t)
    assert torch.allclose(a.u_t, x_1 - x_0)


def test_path_finite_difference_velocity(gen):
    path = AffinePath("cosine")
    x_0, x_1 = torch.randn(2, 16, 2, generator=gen, dtype=torch.float64)
    t = torch.full((16,), 0.3, dtype=torch.float64)
    h = 1e-6
    fd = (path.sample(x_0, x_1, t + h).x_t - path.sample(x_0, x_1, t - h).x_t) / (2 * h)
    assert torch.allclose(fd, path.sample(x_0, x_1, t).u_t, atol=1e-7)


def test_path_errors():
    with pytest.raises(ValueError, match="same shape"):
        LinearPath().sample(torch.zeros(4, 2), torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="t must have shape"):
        LinearPath().sample(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="unknown path"):
        get_path("bogus")
