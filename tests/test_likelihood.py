import math

import pytest
import torch

from steerflow import log_likelihood
from steerflow.data import GaussianMixture


def test_gaussian_flow_log_likelihood_is_exact(gen):
    gm = GaussianMixture([1.0], [[1.0, -0.5, 0.3]], [[[0.5, 0.1, 0.0], [0.1, 0.3, 0.05], [0.0, 0.05, 0.8]]])
    x = gm.sample(20, generator=gen)
    with torch.no_grad():
        lp = log_likelihood(gm.velocity, x, method="dopri5", atol=1e-9, rtol=1e-9)
    assert float((lp - gm.log_prob(x)).abs().max()) < 1e-5


def test_mixture_flow_log_likelihood_fixed_step(gen):
    gm = GaussianMixture([0.4, 0.6], [[-1.5, 0.0], [1.5, 0.5]], [0.3, 0.2])
    x = gm.sample(10, generator=gen)
    with torch.no_grad():
        lp = log_likelihood(gm.velocity, x, steps=200, method="rk4")
    assert float((lp - gm.log_prob(x)).abs().max()) < 1e-4


def test_likelihood_has_parameter_gradient():
    # v_θ(x, t) = θ x pushes N(0, I) to N(0, e^{2θ} I): log p = -|x|² e^{-2θ}/2 - dθ - d/2 log 2π
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[0.5, -1.0, 2.0], [0.1, 0.2, 0.3]], dtype=torch.float64)
    lp = log_likelihood(lambda x_, t: theta * x_, x, steps=100, method="rk4", enable_grad=True)
    d = 3
    sq = (x**2).sum(-1)
    expected = -0.5 * sq * math.exp(-0.6) - d * 0.3 - 0.5 * d * math.log(2 * math.pi)
    assert torch.allclose(lp.detach(), expected, atol=1e-5)
    lp.sum().backward()
    grad_expected = float((sq * math.exp(-0.6) - d).sum())
    assert abs(float(theta.grad) - grad_expected) < 1e-5


def test_likelihood_keeps_no_graph_unless_asked():
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    lp = log_likelihood(lambda x_, t: theta * x_, x, steps=10, method="rk4")
    assert lp.grad_fn is None and not lp.requires_grad
    same = log_likelihood(lambda x_, t: theta * x_, x, steps=10, method="rk4", enable_grad=True)
    assert torch.allclose(lp, same.detach(), atol=1e-12)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_likelihood_refuses_bad_steps(steps):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        log_likelihood(lambda x_, t: x_, torch.zeros(2, 2), steps=steps)


def test_hutchinson_is_unbiased(gen):
    # linear field v = B x has div = tr B; Hutchinson with Rademacher probes is exact in expectation
    B = torch.tensor([[0.2, 1.0], [-0.5, -0.7]], dtype=torch.float64)
    f = lambda x, t: x @ B.T
    x = torch.randn(4000, 2, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        exact = log_likelihood(f, x, steps=20, method="rk4", divergence="exact")
        hutch = log_likelihood(f, x, steps=20, method="rk4", divergence="hutchinson", generator=gen)
    assert abs(float((hutch - exact).mean())) < 0.05
    with pytest.raises(ValueError, match="unknown divergence"):
        log_likelihood(f, x[:2], divergence="bogus")


# --- batches with bounded memory, points the flow does not reach ----------------------------------------

def test_likelihood_in_batches_is_the_same_and_solves_at_most_batch_size_points(gen):
    B = torch.tensor([[0.2, 1.0], [-0.5, -0.7]], dtype=torch.float64)
    seen = []

    def f(x, t):
        seen.append(x.shape[0])
        return torch.tanh(x @ B.T)

    x = torch.randn(10, 2, generator=gen, dtype=torch.float64)
    for divergence in ("exact", "hutchinson"):
        whole = log_likelihood(f, x, steps=8, divergence=divergence, generator=torch.Generator().manual_seed(1))
        seen.clear()
        parts = log_likelihood(f, x, steps=8, divergence=divergence, generator=torch.Generator().manual_seed(1),
                               batch_size=3)
        assert max(seen) == 3 and sum(seen) == 10 * 8 * 4  # 4 batches (3+3+3+1), 8 RK4 steps of 4 stages
        torch.testing.assert_close(parts, whole, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="batch_size"):
        log_likelihood(f, x, batch_size=0)


def test_points_the_flow_does_not_reach_get_minus_inf_and_the_rest_are_kept():
    """``v(x, t) = -x²`` on R: backward, ``dx/dτ = x²`` reaches infinity before τ = 1 from every ``x_1 > 1``,
    which no base point flows to (density 0). Elsewhere ``x_0 = x_1 / (1 - x_1)`` and
    ``log p_1(x_1) = log N(x_0) - 2 log|1 - x_1|``."""
    def v(x, t):
        return -x * x

    x_1 = torch.tensor([[0.5], [2.0], [-2.0], [5.0], [0.9]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="2 of 5 points left the numeric range"):
        lp = log_likelihood(v, x_1, steps=400, method="rk4")
    assert lp[1] == -math.inf and lp[3] == -math.inf
    good = torch.tensor([0, 2, 4])
    x_0 = x_1[good] / (1 - x_1[good])
    exact = (-0.5 * x_0 ** 2 - 0.5 * math.log(2 * math.pi) - 2 * torch.log((1 - x_1[good]).abs()))[:, 0]
    torch.testing.assert_close(lp[good], exact, rtol=0, atol=1e-5)
    # the escaping points change nothing for the others (fixed steps: the very same numbers)
    torch.testing.assert_close(lp[good], log_likelihood(v, x_1[good], steps=400, method="rk4"), rtol=0, atol=0)
    # a finite point outside the numeric range to begin with is NaN, counted apart; NaN/inf input is refused
    with pytest.warns(RuntimeWarning, match="1 lie outside it to begin with"):
        lp = log_likelihood(v, torch.tensor([[0.5], [1e100]], dtype=torch.float64), steps=8)
    assert math.isfinite(float(lp[0])) and math.isnan(float(lp[1]))
    with pytest.raises(ValueError, match="NaN or inf"):
        log_likelihood(v, torch.tensor([[0.5], [math.inf]], dtype=torch.float64), steps=8)
