"""Measurement operators: true adjoints, closed-form normal solves, shape errors, the noise model."""
import math

import pytest
import torch

from steerflow.steering.operators import (AvgPool, Blur, Dense, GaussianNoise, Identity, Mask, NonLinear,
                                          conjugate_gradient, get_operator, operator_norm)

D = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _linear_ops():
    g = _gen(1)
    return {
        "identity": (Identity((3, 4)), (3, 4)),
        "mask-box": (Mask.box((2, 6, 6), 1, 2, 3, 2), (2, 6, 6)),
        "mask-random": (Mask.random((3, 5, 5), 0.4, _gen(2)), (3, 5, 5)),
        "mask-coords": (Mask.coordinates(8, [0, 3, 5]), (8,)),
        "avgpool": (AvgPool(2, (3, 6, 8)), (3, 6, 8)),
        "avgpool-3": (AvgPool(3), (2, 9, 6)),
        "blur-gauss": (Blur.gaussian(5, 1.2, (2, 7, 9)), (2, 7, 9)),
        "blur-asym": (Blur(torch.rand(3, 5, generator=g, dtype=D)), (3, 8, 6)),
        "dense": (Dense(torch.randn(5, 12, generator=g, dtype=D), (3, 4)), (3, 4)),
    }


@pytest.mark.parametrize("name", list(_linear_ops()))
def test_adjoint_identity(name):
    """⟨A x, u⟩ = ⟨x, Aᵀ u⟩ to float64 precision for random x, u."""
    op, shape = _linear_ops()[name]
    g = _gen(3)
    x = torch.randn(4, *shape, generator=g, dtype=D)
    Ax = op(x)
    u = torch.randn(Ax.shape, generator=g, dtype=D)
    lhs = (Ax * u).reshape(4, -1).sum(-1)
    rhs = (x * op.adjoint(u)).reshape(4, -1).sum(-1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(_linear_ops()))
def test_solve_normal_matches_dense_solve(name):
    """(r A Aᵀ + σ² I)⁻¹ b against the dense matrix (closed forms, Cholesky and the CG fallback)."""
    op, shape = _linear_ops()[name]
    M = op.matrix(shape)
    m = M.shape[0]
    b = torch.randn(3, m, generator=_gen(4), dtype=D)
    r, s2 = 0.7, 0.09
    want = torch.linalg.solve(r * M @ M.T + s2 * torch.eye(m, dtype=D), b.T).T
    out_shape = op(torch.zeros(1, *shape, dtype=D)).shape[1:]
    got = op.solve_normal(r, s2, b.reshape(3, *out_shape), n_iter=200).reshape(3, -1)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)


def test_avgpool_adjoint_is_repetition_over_k2():
    op = AvgPool(2)
    u = torch.arange(4.0, dtype=D).reshape(1, 1, 2, 2)
    up = op.adjoint(u)
    assert up.shape == (1, 1, 4, 4)
    torch.testing.assert_close(up[0, 0, :2, :2], torch.zeros(2, 2, dtype=D) / 4)
    torch.testing.assert_close(up[0, 0, 2:, 2:], torch.full((2, 2), 3.0 / 4, dtype=D))
    # A Aᵀ = I / k²
    torch.testing.assert_close(op(op.adjoint(u)), u / 4)


def test_blur_adjoint_is_flipped_correlation():
    k = torch.rand(3, 3, generator=_gen(5), dtype=D)
    op = Blur(k)
    u = torch.randn(2, 1, 6, 6, generator=_gen(6), dtype=D)
    torch.testing.assert_close(op.adjoint(u), torch.nn.functional.conv_transpose2d(u, k[None, None], padding=1))
    assert not torch.allclose(op.adjoint(u), op(u))  # a non-symmetric kernel is not self-adjoint


def test_mask_solve_normal_noiseless_pseudo_inverse():
    op = Mask.coordinates(4, [1, 2])
    b = torch.tensor([[0.0, 2.0, 4.0, 0.0]], dtype=D)
    torch.testing.assert_close(op.solve_normal(2.0, 0.0, b), torch.tensor([[0.0, 1.0, 2.0, 0.0]], dtype=D))


def test_conjugate_gradient_solves_spd_system():
    g = _gen(7)
    B = torch.randn(6, 6, generator=g, dtype=D)
    M = B @ B.T + 0.5 * torch.eye(6, dtype=D)
    b = torch.randn(3, 6, generator=g, dtype=D)
    x = conjugate_gradient(lambda z: z @ M, b, n_iter=50)
    torch.testing.assert_close(x, torch.linalg.solve(M, b.T).T, rtol=1e-8, atol=1e-8)


def test_operator_norm_matches_svd():
    A = torch.randn(4, 7, generator=_gen(8), dtype=D)
    assert math.isclose(operator_norm(Dense(A), (7,), n_iter=300, generator=_gen(9)),
                        float(torch.linalg.matrix_norm(A, 2)), rel_tol=1e-6)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="expects inputs of shape"):
        Dense(torch.randn(2, 5, dtype=D))(torch.randn(3, 4, dtype=D))
    with pytest.raises(ValueError, match="divisible"):
        AvgPool(3)(torch.randn(1, 1, 4, 6, dtype=D))
    with pytest.raises(ValueError, match="odd"):
        Blur(torch.ones(2, 2))
    with pytest.raises(ValueError, match="does not fit"):
        Mask.box((4, 4), 2, 2, 3, 1)
    with pytest.raises(ValueError, match="expects inputs of shape"):
        Mask.coordinates(5, [0])(torch.randn(2, 6, dtype=D))
    with pytest.raises(ValueError, match="columns"):
        Dense(torch.randn(2, 5), in_shape=(2, 2))
    with pytest.raises(ValueError, match="unknown operator"):
        get_operator("fft")


def test_nonlinear_without_gradient_is_detached():
    op = NonLinear(lambda x: x.pow(2).sum(-1, keepdim=True), differentiable=False)
    x = torch.randn(3, 2, dtype=D, requires_grad=True)
    assert not op(x).requires_grad
    assert NonLinear(torch.tanh)(x).requires_grad


def test_gaussian_noise_is_seeded_and_its_log_likelihood_is_normal():
    noise = GaussianNoise(0.3)
    y0 = torch.zeros(2, 5, dtype=D)
    torch.testing.assert_close(noise.sample(y0, _gen(1)), noise.sample(y0, _gen(1)))
    y = noise.sample(y0, _gen(2))
    want = torch.distributions.Normal(y0, 0.3).log_prob(y).sum(-1)
    torch.testing.assert_close(noise.log_likelihood(y, y0), want)
    with pytest.raises(ValueError):
        GaussianNoise(-1.0)
    with pytest.raises(ValueError, match="std = 0"):
        GaussianNoise(0.0).log_likelihood(y, y0)


def test_conjugate_gradient_refuses_a_zero_tolerance():
    with pytest.raises(ValueError, match="tol must be a positive relative residual"):
        conjugate_gradient(lambda z: z, torch.ones(1, 2, dtype=D), tol=0.0)


def test_conjugate_gradient_on_a_singular_system_stops_at_the_projection():
    """M = a aᵀ (rank 1, not axis-aligned) with b = a y in its range, started at x_0 and run far past
    convergence (tol 1e-300): the answer is x_0's projection onto {aᵀx = y}, not a step along rounding noise."""
    a = torch.tensor([0.6, 0.8], dtype=D)
    M = torch.outer(a, a)
    x0 = torch.randn(64, 2, generator=_gen(11), dtype=D)
    y = torch.randn(64, generator=_gen(12), dtype=D)
    x = conjugate_gradient(lambda z: z @ M, y[:, None] * a, x0, n_iter=50, tol=1e-300)
    torch.testing.assert_close(x, x0 + (y - x0 @ a)[:, None] * a, rtol=0, atol=1e-12)


def test_dense_from_a_float32_matrix_solves_in_the_input_precision():
    A32 = torch.randn(5, 12, generator=_gen(13)).float()
    M = A32.double()
    b = torch.randn(3, 5, generator=_gen(14), dtype=D)
    want = torch.linalg.solve(0.7 * M @ M.T + 0.09 * torch.eye(5, dtype=D), b.T).T
    torch.testing.assert_close(Dense(A32).solve_normal(0.7, 0.09, b), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigma2", [1e-4, 1e-6])
def test_blur_solve_normal_converges_at_its_defaults(sigma2):
    """126 unknowns, condition numbers 5e3 and 5e5: CG runs to its relative tolerance, not to 100 iterations."""
    shape = (2, 7, 9)
    op = Blur.gaussian(5, 1.2, shape)
    M = op.matrix(shape)
    b = torch.randn(3, M.shape[0], generator=_gen(4), dtype=D)
    want = torch.linalg.solve(0.7 * M @ M.T + sigma2 * torch.eye(M.shape[0], dtype=D), b.T).T
    got = op.solve_normal(0.7, sigma2, b.reshape(3, *shape)).reshape(3, -1)
    assert float((got - want).norm() / want.norm()) < 1e-9
    got32 = op.solve_normal(0.7, sigma2, b.float().reshape(3, *shape)).reshape(3, -1)
    assert float((got32.double() - want).norm() / want.norm()) < 1e-3


def test_generic_solve_normal_counts_its_products_and_closed_forms_count_none():
    from steerflow.metrics.cost import Cost

    g = torch.Generator().manual_seed(0)
    blur = Blur.gaussian(3, 1.0, (1, 6, 6))
    b = torch.randn(2, 1, 6, 6, generator=g, dtype=torch.float64)
    cost = Cost()
    w = blur.solve_normal(0.7, 0.01, b, n_iter=4, cost=cost)
    assert torch.equal(w, blur.solve_normal(0.7, 0.01, b, n_iter=4))
    assert cost.operator_calls == 2 * 4  # four CG products of A Aᵀ, two operator calls each
    mask, cost = Mask.box((1, 6, 6), 1, 1, 2, 2), Cost()
    mask.solve_normal(0.7, 0.01, mask(b), n_iter=4, cost=cost)
    assert cost.operator_calls == 0
