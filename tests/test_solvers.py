import math

import numpy as np
import pytest
import torch

import steerflow
from steerflow.metrics.cost import Cost
from steerflow.solvers import SOLVERS, Dopri5, get_solver, shifted_grid, uniform_grid

torch.manual_seed(0)
M = torch.tensor([[-0.5, 2.0, 0.0], [-2.0, -0.5, 0.3], [0.1, 0.0, -1.0]], dtype=torch.float64)


def linear_field(x, t):
    # time-dependent linear ODE dx/dt = (1 + t) M x with solution x(t) = expm(M (t + t²/2)) x(0)
    return (1 + t)[:, None] * (x @ M.T)


def exact(x0, t):
    return x0 @ torch.linalg.matrix_exp(M * (t + 0.5 * t * t)).T


X0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_fitted_convergence_order(method, order):
    ns = [8, 16, 32, 64]
    errs = [float((steerflow.sample(linear_field, X0, steps=n, method=method) - exact(X0, 1.0)).abs().max())
            for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.25, (method, slope, errs)


def test_dopri5_meets_tolerance_and_counts_nfe():
    for tol in (1e-4, 1e-7):
        cost = Cost()
        out = steerflow.sample(linear_field, X0, method="dopri5", atol=tol, rtol=tol, cost=cost)
        err = float((out - exact(X0, 1.0)).abs().max())
        assert err < 50 * tol, (tol, err)
        assert cost.nfe > 6
    # tighter tolerance costs more evaluations
    c1, c2 = Cost(), Cost()
    steerflow.sample(linear_field, X0, method="dopri5", atol=1e-4, rtol=1e-4, cost=c1)
    steerflow.sample(linear_field, X0, method="dopri5", atol=1e-8, rtol=1e-8, cost=c2)
    assert c2.nfe > c1.nfe


def test_trajectory_and_nfe_counts():
    tr = steerflow.sample(linear_field, X0, steps=10, method="rk4", return_trajectory=True)
    assert tr.xs.shape == (11, 5, 3) and tr.nfe == 40
    assert torch.equal(tr.xs[0], X0) and torch.equal(tr.xs[-1], tr.x)
    for i in (3, 7):
        assert torch.allclose(tr.xs[i], exact(X0, float(tr.ts[i])), atol=5e-4)


@pytest.mark.parametrize("method", ["euler", "heun", "rk4", "dopri5"])
def test_inversion_is_the_flipped_grid(method):
    x1 = steerflow.sample(linear_field, X0, ts=uniform_grid(200), method=method)
    x0 = steerflow.sample(linear_field, x1, ts=uniform_grid(200).flip(0), method=method)
    tol = {"euler": 1e-1, "heun": 1e-4, "rk4": 1e-8, "dopri5": 1e-4}[method]
    assert float((x0 - X0).abs().max()) < tol


def test_shifted_grid_properties():
    g = shifted_grid(10, shift=3.0)
    assert g[0] == 0 and g[-1] == 1 and (g[1:] > g[:-1]).all()
    # shift > 1 puts more steps near the noise end (t small): first step is smaller than uniform
    assert g[1] < 0.1
    assert torch.allclose(shifted_grid(10, shift=1.0), uniform_grid(10))


def test_sample_is_differentiable_when_asked():
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    x0 = torch.ones(4, 2, dtype=torch.float64)
    x1 = steerflow.sample(lambda x, t: theta * x, x0, steps=200, method="rk4", enable_grad=True)
    x1.sum().backward()
    # x(1) = e^θ x0, d/dθ Σ x(1) = e^θ Σ x0
    assert abs(float(theta.grad) - math.exp(0.7) * 8) < 1e-6


def test_plain_sampling_records_no_graph_even_in_grad_mode():
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    seen = []

    def v(x, t):
        out = theta * x
        seen.append(out.requires_grad)
        return out

    assert torch.is_grad_enabled()
    x1 = steerflow.sample(v, torch.ones(4, 2, dtype=torch.float64), steps=5)
    assert not x1.requires_grad and x1.grad_fn is None
    assert seen and not any(seen)  # no graph inside the loop either
    assert torch.is_grad_enabled()  # the caller's mode is restored
    tr = steerflow.sample(v, torch.ones(4, 2, dtype=torch.float64), steps=5, return_trajectory=True)
    assert not tr.xs.requires_grad


def test_bad_inputs_are_refused():
    f = lambda x, t: x
    with pytest.raises(ValueError, match="unknown method"):
        steerflow.sample(f, X0, method="rk45")
    with pytest.raises(ValueError, match="batch dimension"):
        steerflow.sample(f, torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        steerflow.sample(f, torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="monotone|increasing"):
        steerflow.sample(f, X0, ts=torch.tensor([0.0, 0.5, 0.4, 1.0]))
    with pytest.raises(ValueError, match="positive integer"):
        steerflow.sample(f, X0, steps=0)
    with pytest.raises(ValueError, match="returned shape"):
        steerflow.sample(lambda x, t: x[:, :1], X0, steps=2)


def test_nonfinite_state_names_the_step():
    def blowup(x, t):
        return torch.where(t[:, None] > 0.45, torch.full_like(x, float("inf")), x)

    with pytest.raises(FloatingPointError, match=r"step \d+/10"):
        steerflow.sample(blowup, X0, steps=10)


def test_registry_and_solver_objects():
    assert sorted(SOLVERS) == ["dopri5", "euler", "heun", "midpoint", "rk4"]
    assert isinstance(get_solver("dopri5", atol=1e-3), Dopri5)
    with pytest.raises(ValueError, match="takes no options"):
        get_solver("euler", atol=1e-3)
