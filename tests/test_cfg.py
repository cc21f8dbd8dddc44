"""Classifier-free and classifier guidance against the exact Gaussian-mixture fields."""
import pytest
import torch

import steerflow
from steerflow.data import GaussianMixture
from steerflow.metrics.cost import Cost
from steerflow.metrics.distances import energy_distance
from steerflow.steering.cfg import ClassifierFreeGuidance, ClassifierGuidance

W, MU, VAR = [0.5, 0.5], [[-2.0, 0.0], [2.0, 1.0]], [0.3, 0.5]
GMM = GaussianMixture(W, MU, VAR)
COMPONENTS = [GaussianMixture([1.0], [MU[k]], [VAR[k]]) for k in range(2)]
NULL = 2


class ExactConditional:
    """``model(x, t, cond)``: the component-``c`` velocity for labels 0/1, the mixture's for the null label."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, cond=None):
        self.calls += 1
        if cond is None:
            cond = torch.full((x.shape[0],), NULL)
        out = GMM.velocity(x, t)
        for k in range(2):
            m = cond == k
            if m.any():
                out[m] = COMPONENTS[k].velocity(x[m], t[m])
        return out


def exact_posterior_logits(x, t):
    """``log p(k | x_t = x) + const`` for the mixture: ``log w_k + log N(x; t μ_k, t² σ_k² + (1 − t)²)``."""
    mu = torch.tensor(MU, dtype=x.dtype)
    var = t[:, None] ** 2 * torch.tensor(VAR, dtype=x.dtype) + (1 - t[:, None]) ** 2  # (b, K)
    sq = ((x[:, None, :] - t[:, None, None] * mu) ** 2).sum(-1)
    return torch.log(torch.tensor(W, dtype=x.dtype)) - 0.5 * sq / var - torch.log(var)  # d = 2


def _points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, dtype=torch.float64, generator=g) * 2, torch.rand(n, dtype=torch.float64, generator=g) * 0.9 + 0.05


def test_cfg_scale_one_is_the_conditional_field_and_is_one_batched_call():
    x, t = _points()
    labels = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(1))
    model = ExactConditional()
    cost = Cost()
    field = steerflow.solvers.CountedField(model, cost)
    g = ClassifierFreeGuidance(1.0, labels, null_cond=torch.full_like(labels, NULL))
    out = g.velocity(field, x, t, torch.tensor(0.1))
    assert model.calls == 1 and cost.nfe == 2
    assert torch.allclose(out, model(x, t, labels), atol=1e-12)
    # w = 0 is the unconditional field, and the combination is affine in w
    v_u, v_c = model(x, t, None), model(x, t, labels)
    for w in (0.0, 2.5):
        out = ClassifierFreeGuidance(w, labels, torch.full_like(labels, NULL)).velocity(field, x, t, torch.tensor(0.1))
        assert torch.allclose(out, v_u + w * (v_c - v_u), atol=1e-12)


def test_cfg_in_sample_generates_the_class():
    n = 400
    x0 = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    labels = torch.ones(n, dtype=torch.long)
    out = steerflow.sample(ExactConditional(), x0, steps=50, method="heun",
                           guidance=ClassifierFreeGuidance(1.0, labels, torch.full_like(labels, NULL)))
    direct = steerflow.sample(ExactConditional(), x0, steps=50, method="heun", cond=labels)
    assert torch.allclose(out, direct, atol=1e-12)
    with pytest.raises(ValueError, match="without cond"):
        steerflow.sample(ExactConditional(), x0, steps=2, cond=labels,
                         guidance=ClassifierFreeGuidance(1.0, labels, torch.full_like(labels, NULL)))


def test_cfg_uses_the_null_class_of_a_steerflow_model():
    from steerflow.models.mlp import MLPVelocity

    torch.manual_seed(0)
    model = MLPVelocity(dim=4, hidden=16, depth=2, time_embed_dim=8, n_classes=3).eval()
    x, t = torch.randn(5, 4), torch.rand(5)
    labels = torch.tensor([0, 1, 2, 1, 0])
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out = ClassifierFreeGuidance(3.0, labels).velocity(steerflow.solvers.CountedField(model, Cost()), x, t,
                                                       torch.tensor(0.1))
    handle.remove()
    assert calls == [10]  # one call on the doubled batch
    with torch.no_grad():
        v_u, v_c = model(x, t), model(x, t, labels)
    assert torch.allclose(out, v_u + 3.0 * (v_c - v_u), atol=1e-5)


def test_classifier_guidance_with_the_exact_posterior_is_the_component_velocity():
    """``v + ((1 − t)/t) ∇ log p(k | x_t)`` equals the class-``k`` flow's velocity pointwise (float64)."""
    x, t = _points(seed=3)
    for k in range(2):
        g = ClassifierGuidance(exact_posterior_logits, k, scale=1.0)
        cost = Cost()
        out = g.velocity(GMM.velocity, x, t, torch.tensor(0.01), cost=cost)
        assert cost.vjp == 1
        assert torch.allclose(out, COMPONENTS[k].velocity(x, t), atol=1e-10, rtol=1e-10)
    # scale 0 is the unguided field
    out = ClassifierGuidance(exact_posterior_logits, 0, scale=0.0).velocity(GMM.velocity, x, t, torch.tensor(0.01))
    assert torch.allclose(out, GMM.velocity(x, t), atol=1e-12)


def test_classifier_guidance_samples_the_component():
    n = 800
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(n, 2, dtype=torch.float64, generator=gen)
    out = steerflow.sample(GMM.velocity, x0, steps=100, method="euler",
                           guidance=ClassifierGuidance(exact_posterior_logits, torch.zeros(n, dtype=torch.long)))
    ref = COMPONENTS[0].sample(3000, gen)
    floor = max(energy_distance(COMPONENTS[0].sample(n, gen), ref) for _ in range(8))
    assert energy_distance(out, ref) < 1.5 * floor
    assert float((out[:, 0] < 0).double().mean()) > 0.995


def test_classifier_guidance_on_the_data_prediction_runs_through_the_network():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def v(x, t):
        return net(torch.cat([x, t[:, None]], 1))

    clf = torch.nn.Linear(2, 3)
    x, t = torch.randn(6, 2), torch.full((6,), 0.5)
    cost = Cost()
    out = ClassifierGuidance(clf, 2, scale=2.0, on="x1_hat").velocity(v, x, t, torch.tensor(0.1), cost=cost)
    # reference: autograd of log softmax(clf(x + (1 - t) v(x, t)))[2] times (1 - t)/t = 1
    xr = x.clone().requires_grad_(True)
    lp = torch.log_softmax(clf(xr + 0.5 * v(xr, t)), -1)[:, 2].sum()
    (grad,) = torch.autograd.grad(lp, xr)
    assert torch.allclose(out, v(x, t).detach() + 2.0 * grad, atol=1e-6)
    assert cost.vjp == 1 and not out.requires_grad


def test_bad_arguments():
    with pytest.raises(ValueError, match="cond"):
        ClassifierFreeGuidance(1.0, None)
    with pytest.raises(ValueError, match="unknown classifier input"):
        ClassifierGuidance(exact_posterior_logits, 0, on="x0")
    with pytest.raises(TypeError, match="target"):
        ClassifierGuidance(exact_posterior_logits, torch.zeros(3))
    x, t = _points(4)
    with pytest.raises(ValueError, match="target must have shape"):
        ClassifierGuidance(exact_posterior_logits, torch.zeros(3, dtype=torch.long)).velocity(
            GMM.velocity, x, t, torch.tensor(0.1))
