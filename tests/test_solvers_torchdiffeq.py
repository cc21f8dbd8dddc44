"""Parity of the own fixed-step and adaptive solvers with ``torchdiffeq.odeint`` (the reference ODE library).

* Euler and midpoint are the same rules in both libraries: the trajectories agree to float64 round-off on a
  non-linear, time-dependent field.
* torchdiffeq's ``rk4`` is Kutta's 3/8 rule, ours the classical RK4; both are 4-stage order-4 methods, which on a
  linear autonomous system ``dx/dt = A x`` have the same step map ``Σ_{k≤4} (hA)^k / k!`` — equal to round-off
  there; on a non-linear field they differ by the O(h⁴) truncation error only (checked by its fitted order).
* Dopri5 at tight tolerances agrees with torchdiffeq's dopri5 to the tolerance on a non-linear field and on a
  random MLP velocity, forward and backward in time.
"""
from __future__ import annotations

import math

import pytest
import torch

from steerflow import sample, uniform_grid

torchdiffeq = pytest.importorskip("torchdiffeq")


def _field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A non-linear, time-dependent velocity field on R² (rotation + cubic damping + forcing in t)."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    rot = torch.stack([-x[:, 1], x[:, 0]], dim=1)
    return (1.0 + t) * rot - 0.3 * x ** 3 + torch.sin(3.0 * t) * torch.ones_like(x)


def _reference(v, x_0: torch.Tensor, ts: torch.Tensor, method: str, **opts) -> torch.Tensor:
    """``torchdiffeq.odeint`` on the same field; its ``func(t, y)`` takes a scalar time."""
    def func(t, y):
        return v(y, t.expand(y.shape[0]))

    return torchdiffeq.odeint(func, x_0, ts, method=method, **opts)[-1]


@pytest.fixture
def x_0() -> torch.Tensor:
    return torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_fixed_step_rules_match_torchdiffeq(x_0, method):
    ts = uniform_grid(40).double()
    ours = sample(_field, x_0, ts=ts, method=method)
    ref = _reference(_field, x_0, ts, method)
    assert (ours - ref).abs().max().item() < 1e-13


def test_rk4_equals_the_3_8_rule_on_a_linear_system(x_0):
    A = torch.tensor([[-0.5, 2.0], [-1.5, 0.3]], dtype=torch.float64)

    def linear(x, t):
        return x @ A.T

    ts = uniform_grid(7).double()
    ours = sample(linear, x_0, ts=ts, method="rk4")
    ref = _reference(linear, x_0, ts, "rk4")
    assert (ours - ref).abs().max().item() < 1e-13
    exact = x_0 @ torch.linalg.matrix_exp(A).T
    assert (ours - exact).abs().max().item() < 1e-3  # and both are the exponential to O(h⁴)


def test_rk4_differs_from_the_3_8_rule_by_fourth_order_only(x_0):
    gaps = []
    ns = (8, 16, 32, 64)
    for n in ns:
        ts = uniform_grid(n).double()
        gaps.append((sample(_field, x_0, ts=ts, method="rk4") - _reference(_field, x_0, ts, "rk4")).abs().max().item())
    order = -(math.log(gaps[-1]) - math.log(gaps[0])) / (math.log(ns[-1]) - math.log(ns[0]))
    assert 3.6 < order < 5.5, (gaps, order)
    assert gaps[-1] < 1e-7


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_dopri5_matches_torchdiffeq(x_0, direction):
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    if direction == "backward":  # from the forward solution back to t = 0 (the cubic damping explodes elsewhere)
        x_0 = _reference(_field, x_0, ts, "dopri5", atol=1e-12, rtol=1e-12)
        ts = ts.flip(0)
    ours = sample(_field, x_0, ts=ts, method="dopri5", atol=1e-10, rtol=1e-10)
    ref = _reference(_field, x_0, ts, "dopri5", atol=1e-12, rtol=1e-12)
    assert (ours - ref).abs().max().item() < 1e-8


def test_dopri5_matches_torchdiffeq_on_a_random_mlp():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).double()

    def v(x, t):
        return net(torch.cat([x, t.reshape(-1, 1)], dim=1))

    x_0 = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        ours = sample(v, x_0, ts=ts, method="dopri5", atol=1e-9, rtol=1e-9)
        ref = _reference(v, x_0, ts, "dopri5", atol=1e-12, rtol=1e-12)
        loose = sample(v, x_0, ts=ts, method="dopri5", atol=1e-5, rtol=1e-5)
    assert (ours - ref).abs().max().item() < 1e-7
    assert (loose - ref).abs().max().item() < 1e-4  # the default tolerance is honoured
