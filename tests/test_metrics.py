import math

import numpy as np
import pytest
import scipy.stats
import torch
from scipy.integrate import quad
from scipy.linalg import expm

from steerflow.data import GaussianMixture
from steerflow.metrics import (Cost, energy_distance, mmd_rbf, mode_weight_tv, psnr, sliced_energy_constant,
                               sliced_energy_distance, ssim, straightness, trace_cov_ratio, transport_cost, w2,
                               w2_gaussian)
from steerflow.metrics import distances


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _brute_energy(x, y, unbiased=False):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n, m = len(x), len(y)
    sxy = sum(np.linalg.norm(x[i] - y[j]) for i in range(n) for j in range(m))
    sxx = sum(np.linalg.norm(x[i] - x[j]) for i in range(n) for j in range(n))
    syy = sum(np.linalg.norm(y[i] - y[j]) for i in range(m) for j in range(m))
    if unbiased:
        return 2 * sxy / (n * m) - sxx / (n * (n - 1)) - syy / (m * (m - 1))
    return 2 * sxy / (n * m) - sxx / n**2 - syy / m**2


def test_cost_still_exported():
    assert Cost().nfe == 0


# --- energy distance -----------------------------------------------------------------------------------
def test_energy_distance_zero_for_identical_positive_for_shifted():
    x = torch.randn(300, 3, generator=_gen())
    assert energy_distance(x, x.clone()) == pytest.approx(0.0, abs=1e-12)
    assert energy_distance(x, x + torch.tensor([0.5, 0.0, 0.0])) > 0.05


@pytest.mark.parametrize("d", [3, 100])  # 100 > 64 exercises the |a|² + |b|² - 2ab path
@pytest.mark.parametrize("unbiased", [False, True])
def test_energy_distance_matches_double_loop(d, unbiased):
    g = _gen(1)
    x = torch.randn(17, d, generator=g, dtype=torch.float64)
    y = 0.7 * torch.randn(23, d, generator=g, dtype=torch.float64) + 0.3
    ref = _brute_energy(x, y, unbiased)
    assert energy_distance(x, y, unbiased=unbiased) == pytest.approx(ref, rel=1e-9, abs=1e-10)


def test_energy_distance_matches_scipy_in_1d():
    g = _gen(2)
    a = torch.randn(200, generator=g, dtype=torch.float64)
    b = 1.3 * torch.randn(150, generator=g, dtype=torch.float64) + 0.4
    ref = scipy.stats.energy_distance(a.numpy(), b.numpy()) ** 2  # scipy returns sqrt(D²)
    assert energy_distance(a[:, None], b[:, None]) == pytest.approx(ref, rel=1e-10)


def test_energy_distance_blocking_is_exact(monkeypatch):
    g = _gen(3)
    x, y = torch.randn(500, 2, generator=g), torch.randn(400, 2, generator=g) + 0.2
    full_e, full_m = energy_distance(x, y), mmd_rbf(x, y, bandwidths=[0.5, 1.0])
    monkeypatch.setattr(distances, "_BLOCK", 1000)  # 2-3 rows per block: hundreds of blocks
    assert energy_distance(x, y) == pytest.approx(full_e, rel=1e-12)
    assert mmd_rbf(x, y, bandwidths=[0.5, 1.0]) == pytest.approx(full_m, rel=1e-12)


def test_energy_distance_input_errors():
    with pytest.raises(ValueError, match="same dimension"):
        energy_distance(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="NaN"):
        energy_distance(torch.tensor([[float("nan"), 0.0]]), torch.zeros(3, 2))
    with pytest.raises(TypeError):
        energy_distance([[0.0]], torch.zeros(3, 1))


# --- sliced energy distance ------------------------------------------------------------------------------
def test_sliced_energy_constant_values():
    assert sliced_energy_constant(1) == pytest.approx(1.0)
    assert sliced_energy_constant(2) == pytest.approx(2 / math.pi)
    assert sliced_energy_constant(3) == pytest.approx(0.5)
    # E|θ_1| for θ uniform on S^{d-1}, by Monte Carlo
    th = torch.randn(200_000, 6, generator=_gen(4), dtype=torch.float64)
    mc = (th[:, 0].abs() / th.norm(dim=1)).mean().item()
    assert mc == pytest.approx(sliced_energy_constant(6), rel=5e-3)


def test_sliced_equals_exact_in_1d():
    g = _gen(5)
    a, b = torch.randn(300, 1, generator=g), 2 * torch.randn(257, 1, generator=g) - 1
    assert sliced_energy_distance(a, b, generator=g) == pytest.approx(energy_distance(a, b), rel=1e-10)


def test_sliced_ratio_to_exact_is_dimension_constant():
    d, P = 5, 3000
    g = _gen(6)
    x = torch.randn(200, d, generator=g, dtype=torch.float64)
    y = torch.randn(150, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 1.5, d) + 0.3
    exact = energy_distance(x, y)
    c = sliced_energy_constant(d)
    sliced = sliced_energy_distance(x, y, n_projections=P, generator=_gen(7))
    # Monte-Carlo standard error from an independent batch of directions
    th = torch.randn(P, d, generator=_gen(8), dtype=torch.float64)
    th = th / th.norm(dim=1, keepdim=True)
    per_dir = distances._energy_1d(th @ x.T, th @ y.T)
    se = per_dir.std().item() / math.sqrt(P)
    assert abs(sliced - c * exact) < 4 * se, (sliced, c * exact, se)
    assert abs(per_dir.mean().item() - c * exact) < 4 * se
    resc = sliced_energy_distance(x, y, n_projections=P, generator=_gen(7), rescale=True)
    assert resc == pytest.approx(sliced / c)
    assert sliced_energy_distance(x, y, n_projections=8, generator=_gen(9)) == \
        sliced_energy_distance(x, y, n_projections=8, generator=_gen(9))


# --- W2 --------------------------------------------------------------------------------------------------
def test_w2_exact_for_permuted_translate():
    g = _gen(10)
    x = torch.randn(200, 3, generator=g, dtype=torch.float64)
    s = torch.tensor([0.3, -1.2, 0.5], dtype=torch.float64)
    y = (x + s)[torch.randperm(200, generator=g)]
    assert w2(x, y) == pytest.approx(s.norm().item(), rel=1e-10)
    assert w2(x, x[torch.randperm(200, generator=g)]) == pytest.approx(0.0, abs=1e-12)


def test_w2_unequal_sizes_with_pot():
    pytest.importorskip("ot")
    g = _gen(11)
    x = torch.randn(60, 2, generator=g, dtype=torch.float64)
    s = torch.tensor([1.0, 2.0], dtype=torch.float64)
    y = torch.cat([x, x]) + s  # each x_i split in half onto two copies of x_i + s
    assert w2(x, y) == pytest.approx(math.sqrt(5.0), rel=1e-8)


def test_w2_matches_gaussian_closed_form_for_large_n():
    g = _gen(12)
    n = 1200
    m1, m2 = torch.tensor([0.0, 0.0]), torch.tensor([2.0, -1.0])
    S1 = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    S2 = torch.tensor([[0.4, -0.1], [-0.1, 1.5]], dtype=torch.float64)
    x = m1 + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(S1).T
    y = m2 + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(S2).T
    ref = w2_gaussian(m1, S1, m2, S2)
    assert w2(x, y) == pytest.approx(ref, rel=0.03)


def test_w2_gaussian_closed_forms():
    # 1-D: W2² = (m1 - m2)² + (s1 - s2)²
    assert w2_gaussian([1.0], [[4.0]], [-1.0], [[0.25]]) == pytest.approx(math.sqrt(4 + 1.5**2))
    # commuting covariances: W2² = |Δm|² + |S1^½ - S2^½|_F²
    S1, S2 = np.diag([1.0, 9.0]), np.diag([4.0, 1.0])
    assert w2_gaussian([0, 0], S1, [3, 4], S2) == pytest.approx(math.sqrt(25 + 1 + 4))
    A = np.array([[2.0, 0.5], [0.5, 1.0]])
    B = np.array([[1.0, -0.3], [-0.3, 0.7]])
    assert w2_gaussian([0, 1], A, [1, 0], B) == pytest.approx(w2_gaussian([1, 0], B, [0, 1], A), rel=1e-10)
    assert w2_gaussian([0, 1], A, [0, 1], A) == pytest.approx(0.0, abs=1e-7)


# --- MMD -------------------------------------------------------------------------------------------------
def test_mmd_zero_positive_and_brute_force():
    g = _gen(13)
    x, x2 = torch.randn(400, 2, generator=g), torch.randn(400, 2, generator=g)
    y = torch.randn(400, 2, generator=g) + torch.tensor([1.0, 0.0])
    assert mmd_rbf(x, x.clone()) == pytest.approx(0.0, abs=1e-12)
    same, diff = mmd_rbf(x, x2), mmd_rbf(x, y)
    assert diff > 10 * same > 0
    assert abs(mmd_rbf(x, x2, unbiased=True)) < 0.2 * diff
    a, b = x[:20].double().numpy(), y[:25].double().numpy()
    hs = [0.5, 2.0]
    k = lambda u, v: np.mean([np.exp(-np.sum((u - v) ** 2) / (2 * h * h)) for h in hs])  # noqa: E731
    kxx = np.mean([k(u, v) for u in a for v in a])
    kyy = np.mean([k(u, v) for u in b for v in b])
    kxy = np.mean([k(u, v) for u in a for v in b])
    assert mmd_rbf(a, b, bandwidths=hs) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-9)
    with pytest.raises(ValueError, match="bandwidths"):
        mmd_rbf(a, b, bandwidths=[0.0])


# --- straightness and transport cost -------------------------------------------------------------------
def test_straightness_zero_for_constant_field():
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x_0 = torch.randn(64, 3, generator=_gen(14), dtype=torch.float64)
    assert straightness(lambda x, t: c.expand_as(x), x_0, steps=10) == pytest.approx(0.0, abs=1e-20)


def test_straightness_linear_field_closed_form():
    # v(x, t) = a x: Z_t = e^{at} Z_0, Z_1 - Z_0 = (e^a - 1) Z_0, so
    # S = E|Z_0|² ∫ (e^a - 1 - a e^{at})² dt = E|Z_0|² (a (e^{2a} - 1) / 2 - (e^a - 1)²)
    a = 0.8
    x_0 = torch.randn(256, 3, generator=_gen(15), dtype=torch.float64)
    ez2 = x_0.square().sum(1).mean().item()
    ref = ez2 * (a * (math.exp(2 * a) - 1) / 2 - (math.exp(a) - 1) ** 2)
    assert straightness(lambda x, t: a * x, x_0, steps=200, method="rk4") == pytest.approx(ref, rel=1e-4)


def test_straightness_matrix_field_against_quadrature():
    A = np.array([[0.0, 1.5], [-1.5, -0.2]])
    x_0 = torch.randn(128, 2, generator=_gen(16), dtype=torch.float64)
    Sig = (x_0.T @ x_0 / x_0.shape[0]).numpy()
    eA = expm(A)

    def integrand(t):
        M = eA - np.eye(2) - A @ expm(A * t)
        return np.trace(M @ Sig @ M.T)

    ref = quad(integrand, 0.0, 1.0, epsabs=1e-12)[0]
    At = torch.tensor(A)
    s = straightness(lambda x, t: x @ At.T, x_0, steps=200, method="rk4")
    assert s == pytest.approx(ref, rel=1e-4)


def test_transport_cost():
    x_0 = torch.zeros(10, 2, 3)
    x_1 = torch.ones(10, 2, 3) * 0.5
    assert transport_cost(x_0, x_1) == pytest.approx(6 * 0.25)
    with pytest.raises(ValueError, match="same shape"):
        transport_cost(x_0, x_1[:5])


# --- PSNR / SSIM -----------------------------------------------------------------------------------------
def test_psnr_constant_offset_and_identity():
    x = torch.rand(3, 1, 8, 8, generator=_gen(17)) * 2 - 1
    assert psnr(x, x + 0.1, data_range=2.0) == pytest.approx(20 * math.log10(2.0 / 0.1), rel=1e-6)
    assert math.isinf(psnr(x, x, data_range=2.0))
    assert psnr(x, x - 0.2, data_range=2.0, reduction="none").shape == (3,)
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0)


def _ssim_reference(x, y, R, ws, gaussian, sigma, pad):
    """Plain-numpy SSIM (Wang et al. 2004) by explicit windows."""
    k1, k2 = 0.01, 0.03
    c1, c2 = (k1 * R) ** 2, (k2 * R) ** 2
    r = np.arange(ws) - (ws - 1) / 2
    g = np.exp(-r**2 / (2 * sigma**2)) if gaussian else np.ones(ws)
    w = np.outer(g, g)
    w /= w.sum()
    out = []
    for b in range(x.shape[0]):
        vals = []
        for c in range(x.shape[1]):
            X, Y = x[b, c], y[b, c]
            if pad:
                p = ws // 2
                X, Y = np.pad(X, p, mode="reflect"), np.pad(Y, p, mode="reflect")
            for i in range(X.shape[0] - ws + 1):
                for j in range(X.shape[1] - ws + 1):
                    px, py = X[i:i + ws, j:j + ws], Y[i:i + ws, j:j + ws]
                    mx, my = (w * px).sum(), (w * py).sum()
                    vx = (w * (px - mx) ** 2).sum()
                    vy = (w * (py - my) ** 2).sum()
                    cxy = (w * (px - mx) * (py - my)).sum()
                    vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        out.append(np.mean(vals))
    return np.array(out)


@pytest.mark.parametrize("ws,gaussian,padding,hw", [(7, True, "valid", (8, 8)), (5, True, "valid", (8, 8)),
                                                      (3, False, "valid", (8, 8)), (5, True, "reflect", (9, 11)),
                                                      (7, False, "valid", (12, 10))])
def test_ssim_matches_numpy_reference(ws, gaussian, padding, hw):
    g = _gen(18)
    x = torch.rand(3, 2, *hw, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(3, 2, *hw, generator=g, dtype=torch.float64)).clamp(0, 1)
    ref = _ssim_reference(x.numpy(), y.numpy(), 1.0, ws, gaussian, 1.5, padding == "reflect")
    got = ssim(x, y, data_range=1.0, window_size=ws, gaussian=gaussian, padding=padding, reduction="none")
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10)
    assert ssim(x, y, 1.0, ws, gaussian, padding=padding) == pytest.approx(ref.mean(), rel=1e-10)


def test_ssim_properties():
    g = _gen(19)
    x = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    assert ssim(x, x, data_range=2.0, window_size=5) == pytest.approx(1.0, abs=1e-12)
    y = x + 0.3 * torch.randn(4, 1, 8, 8, generator=g)
    s = ssim(x, y, data_range=2.0, window_size=5)
    assert s < 0.95 and s == pytest.approx(ssim(y, x, data_range=2.0, window_size=5), rel=1e-12)
    assert ssim(x, x + 0.3 * torch.randn(4, 1, 8, 8, generator=g) * 2, 2.0, 5) < s
    with pytest.raises(ValueError, match="does not fit"):
        ssim(x, y, data_range=2.0, window_size=9)
    with pytest.raises(ValueError, match="odd"):
        ssim(x, y, data_range=2.0, window_size=4)
    with pytest.raises(ValueError, match=r"\(b, c, h, w\)"):
        ssim(x[0], y[0], data_range=2.0)


# --- posterior scores ---------------------------------------------------------------------------------------
def _mixture():
    return GaussianMixture([0.2, 0.3, 0.5], [[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]], [0.5, 1.0, 0.3])


def test_mode_weight_tv():
    gm = _mixture()
    x, k = gm.sample(4000, generator=_gen(20), return_labels=True)
    # well-separated components: assignment recovers the labels, TV is the multinomial fluctuation
    p_hat = torch.bincount(k, minlength=3).double() / 4000
    assert mode_weight_tv(x, gm) == pytest.approx(0.5 * (p_hat - gm.weights).abs().sum().item(), abs=1e-12)
    assert mode_weight_tv(x, gm) < 0.03
    only_last = x[k == 2]
    assert mode_weight_tv(only_last, gm) == pytest.approx(1 - 0.5, abs=1e-12)
    with pytest.raises(ValueError, match="dimension"):
        mode_weight_tv(torch.zeros(5, 3), gm)


def test_trace_cov_ratio():
    gm = _mixture()
    x = gm.sample(20000, generator=_gen(21))
    assert trace_cov_ratio(x, gm) == pytest.approx(1.0, rel=0.03)
    y = gm.sample(300, generator=_gen(22))
    shrunk = y.mean(0) + 0.5 * (y - y.mean(0))
    assert trace_cov_ratio(shrunk, y) == pytest.approx(0.25, rel=1e-12)
    with pytest.raises(ValueError, match="dimension"):
        trace_cov_ratio(torch.zeros(5, 3), gm)
