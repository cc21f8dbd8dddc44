"""Convex costs, conservative fields (ICNN, potentials) and c-rectified flow (Liu 2022) against Brenier."""
import math

import pytest
import torch

from steerflow.metrics import w2_gaussian
from steerflow.models.potential import ICNN, PotentialMLP, PotentialVelocity, QuadraticPotential
from steerflow.transport import (LpCost, QuadraticCost, brenier_map_gaussian, c_conservative_velocity,
                                 c_rectification_loss, c_rectified_flow, get_cost)

D64 = torch.float64


@pytest.mark.parametrize("cost", [QuadraticCost(), LpCost(1.5), LpCost(3.0)])
def test_cost_conjugate_pair_fenchel_young(cost, gen):
    z = torch.randn(200, 3, generator=gen, dtype=D64)
    y = torch.randn(200, 3, generator=gen, dtype=D64)
    # Fenchel–Young: c(z) + c*(y) ≥ <y, z>, equality at y = ∇c(z); ∇c* inverts ∇c.
    assert (cost(z) + cost.conjugate(y) - (y * z).sum(-1) >= -1e-12).all()
    yz = cost.grad(z)
    torch.testing.assert_close(cost(z) + cost.conjugate(yz), (yz * z).sum(-1))
    torch.testing.assert_close(cost.grad_conjugate(yz), z)
    yy = y.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(cost.conjugate(yy).sum(), yy)
    torch.testing.assert_close(g, cost.grad_conjugate(y))
    with pytest.raises(ValueError, match="p > 1"):
        LpCost(1.0)
    with pytest.raises(ValueError, match="unknown cost"):
        get_cost("l1")


def test_icnn_is_convex_in_x_for_every_t(gen):
    torch.manual_seed(0)
    f = ICNN(2, hidden=16, depth=3, strong_convexity=0.1).double()
    x, y = torch.randn(300, 2, generator=gen, dtype=D64) * 2, torch.randn(300, 2, generator=gen, dtype=D64) * 2
    t = torch.rand(300, generator=gen, dtype=D64)
    lam = torch.rand(300, generator=gen, dtype=D64)
    mid = f(lam[:, None] * x + (1 - lam[:, None]) * y, t)
    assert (mid <= lam * f(x, t) + (1 - lam) * f(y, t) + 1e-10).all()
    # Hessian of f(·, t) is ⪰ μ I at random points.
    for i in range(5):
        H = torch.autograd.functional.hessian(lambda z: f(z[None], t[i:i + 1]).sum(), x[i])
        assert torch.linalg.eigvalsh(H).min() >= 0.1 - 1e-9


def test_potential_velocity_is_the_gradient_and_builds_graph_only_when_needed(gen):
    torch.manual_seed(0)
    pot = QuadraticPotential(3).double()
    with torch.no_grad():
        pot.net[-1].bias.normal_()
    model = PotentialVelocity(pot)
    x = torch.randn(16, 3, generator=gen, dtype=D64)
    t = torch.rand(16, generator=gen, dtype=D64)
    S, b = pot.coefficients(t, x)
    torch.testing.assert_close(model(x, t), torch.einsum("bij,bj->bi", S, x) + b)
    model.train()
    v = model(x, t)
    assert v.requires_grad                     # training: the loss reaches the potential's parameters
    v.sum().backward()
    assert pot.net[-1].weight.grad is not None
    model.eval()
    assert not model(x, t).requires_grad       # sampling: no graph kept
    xg = x.clone().requires_grad_(True)
    assert model(xg, t).requires_grad          # guidance differentiating through v still can
    with pytest.raises(ValueError, match="shape"):
        PotentialVelocity(lambda x, t: x)(x, t)


@pytest.mark.parametrize("potential", ["icnn", "mlp"])
def test_potential_fields_train_by_flow_matching_through_train(potential, gen):
    from steerflow.training import train

    torch.manual_seed(0)
    net = ICNN(2, hidden=32, depth=2) if potential == "icnn" else PotentialMLP(2, hidden=32, depth=2)
    data = torch.randn(2048, 2, generator=gen) * 0.5 + torch.tensor([2.0, -1.0])
    res = train(PotentialVelocity(net), data, steps=100, batch_size=256, lr=1e-2, progress=False, device="cpu")
    first, last = res.losses[:20].mean(), res.losses[-20:].mean()
    assert torch.isfinite(res.losses).all() and last < 0.6 * first


def test_brenier_map_gaussian_pushes_forward_and_costs_w2(gen):
    A0 = torch.randn(3, 3, generator=gen, dtype=D64)
    B0 = torch.randn(3, 3, generator=gen, dtype=D64)
    S1, S2 = A0 @ A0.T + 0.1 * torch.eye(3, dtype=D64), B0 @ B0.T + 0.1 * torch.eye(3, dtype=D64)
    m1, m2 = torch.randn(3, generator=gen, dtype=D64), torch.randn(3, generator=gen, dtype=D64)
    A, b = brenier_map_gaussian(m1, S1, m2, S2)
    torch.testing.assert_close(A, A.T)
    assert torch.linalg.eigvalsh(A).min() > 0
    torch.testing.assert_close(A @ S1 @ A.T, S2)
    torch.testing.assert_close(A @ m1 + b, m2)
    I = torch.eye(3, dtype=D64)
    cost = ((A - I) @ m1 + b).pow(2).sum() + torch.trace((A - I) @ S1 @ (A - I).T)
    assert abs(float(cost) - w2_gaussian(m1, S1, m2, S2) ** 2) < 1e-9


def _gaussian_problem(n, gen):
    S1 = torch.tensor([[1.0, 0.0], [0.0, 0.2]])
    th = math.pi / 4
    R = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    S2 = R @ torch.diag(torch.tensor([1.5, 0.1])) @ R.T
    m1, m2 = torch.zeros(2), torch.tensor([1.0, 0.5])
    x_0 = torch.randn(n, 2, generator=gen) @ torch.linalg.cholesky(S1).T + m1
    x_1 = torch.randn(n, 2, generator=gen) @ torch.linalg.cholesky(S2).T + m2
    return m1, S1, m2, S2, x_0, x_1


def test_c_rectification_loss_vanishes_exactly_on_the_true_field(gen):
    """Pairs x_1 = x_0 + a: the c-conservative field with f(x) = ⟨∇c(a), x⟩ gives v = a and zero loss; any other
    field has positive loss (the objective is a Fenchel–Young gap)."""
    a = torch.tensor([0.7, -1.3], dtype=D64)
    x_0 = torch.randn(64, 2, generator=gen, dtype=D64)
    t = torch.rand(64, generator=gen, dtype=D64)
    for cost in (QuadraticCost(), LpCost(1.5), LpCost(4.0)):
        y = cost.grad(a[None])[0]
        model = c_conservative_velocity(lambda x, t_: x @ y, cost)
        assert abs(float(c_rectification_loss(model, x_0, x_0 + a, t, cost))) < 1e-12
        torch.testing.assert_close(model(x_0, t), a.expand(64, 2))
        wrong = c_conservative_velocity(lambda x, t_: 0.9 * (x @ y), cost)
        assert float(c_rectification_loss(wrong, x_0, x_0 + a, t, cost)) > 1e-4


def test_c_rectified_flow_converges_to_the_brenier_map_and_w2(gen):
    """Quadratic cost, N(0, S1) → N(m2, S2) with non-commuting covariances: the c-rectified (gradient) flow's
    map approaches T(x) = m2 + A(x - m1) and its cost E½|x_1 - x_0|² approaches ½W2² (Liu 2022, Thm 3.4)."""
    torch.manual_seed(0)
    m1, S1, m2, S2, x_0, x_1 = _gaussian_problem(2048, gen)
    A, b = (v.float() for v in brenier_map_gaussian(m1.double(), S1.double(), m2.double(), S2.double()))
    brenier = x_0 @ A.T + b
    res = c_rectified_flow(x_0, x_1, lambda: QuadraticPotential(2, hidden=16), "quadratic", rounds=2, steps=150,
                           batch_size=1024, lr=1e-2, ode_steps=12, generator=gen)
    dist = (res.x_1 - brenier).pow(2).sum(-1).mean()
    indep = (x_1 - brenier).pow(2).sum(-1).mean()
    assert dist < 0.01 and dist < 0.01 * indep
    brenier_cost = 0.5 * (brenier - x_0).pow(2).sum(-1).mean()      # ½ W2² on these samples
    half_w2sq = 0.5 * w2_gaussian(m1, S1, m2, S2) ** 2
    assert abs(float(brenier_cost) - half_w2sq) < 0.05 * half_w2sq
    assert abs(res.rounds[-1].transport_cost - float(brenier_cost)) < 0.05 * float(brenier_cost)


@pytest.mark.parametrize("cost", [QuadraticCost(), LpCost(1.5)])
def test_transport_cost_does_not_increase_across_rounds(cost, gen):
    torch.manual_seed(1)
    *_, x_0, x_1 = _gaussian_problem(512, gen)
    res = c_rectified_flow(x_0, x_1, lambda: PotentialMLP(2, hidden=32, depth=2), cost, rounds=2, steps=150,
                           batch_size=256, lr=5e-3, ode_steps=8, generator=gen)
    costs = [r.transport_cost for r in res.rounds]
    assert costs[1] < 0.7 * costs[0]                       # the first rectification of the independent coupling
    assert costs[2] <= costs[1] * 1.01                     # no increase (up to the fitting error)
