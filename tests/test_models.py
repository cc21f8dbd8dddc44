"""Velocity networks: shapes, dtypes, conditioning, the config round trip, parity with torchcfm's MLP."""
import json

import pytest
import torch

from steerflow.models import MODELS, EndpointMLP, MLPVelocity, SeluMLP, UNetVelocity, build_model, model_name
from steerflow.paths import LinearPath
from steerflow.solvers import sample
from steerflow.models.base import SinusoidalTimeEmbedding


def _small_unet(**kw):
    cfg = dict(in_channels=2, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention=True,
               n_classes=3, label_dropout=0.1, image_size=8)
    cfg.update(kw)
    return UNetVelocity(**cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlp_shapes_and_dtypes(dtype):
    torch.manual_seed(0)
    m = MLPVelocity(3, hidden=32, depth=2).to(dtype)
    x, t = torch.randn(5, 3, dtype=dtype), torch.rand(5, dtype=dtype)
    v = m(x, t)
    assert v.shape == x.shape and v.dtype == dtype
    # (b, *d) states with prod(d) = dim are flattened and reshaped back
    m4 = MLPVelocity(4, hidden=16, depth=1)
    assert m4(torch.randn(2, 2, 2), torch.rand(2)).shape == (2, 2, 2)
    assert m.event_shape == (3,)


def test_mlp_conditional_and_null_class():
    torch.manual_seed(0)
    m = MLPVelocity(2, hidden=32, depth=2, n_classes=4, label_dropout=0.5).eval()
    x, t = torch.randn(6, 2), torch.rand(6)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    v_c, v_u = m(x, t, y), m(x, t)
    assert v_c.shape == v_u.shape == (6, 2)
    assert not torch.allclose(v_c, v_u)
    # cond=None means the null class, index n_classes
    torch.testing.assert_close(v_u, m(x, t, torch.full((6,), 4)))
    # eval mode: no label dropout, deterministic
    torch.testing.assert_close(v_c, m(x, t, y))


def test_label_dropout_rate_in_training_mode():
    torch.manual_seed(0)
    m = MLPVelocity(2, hidden=16, depth=1, n_classes=3, label_dropout=0.3).train()
    n = 4000
    x, t, y = torch.zeros(n, 2), torch.full((n,), 0.5), torch.zeros(n, dtype=torch.long)
    with torch.no_grad():
        v = m(x, t, y)
        null = m.eval()(x[:1], t[:1])
    dropped = (v - null).abs().sum(1) < 1e-6
    assert abs(dropped.float().mean().item() - 0.3) < 0.04


def test_selu_mlp_matches_torchcfm():
    models = pytest.importorskip("torchcfm.models.models")
    torch.manual_seed(3)
    ref = models.MLP(2, w=64, time_varying=True)
    torch.manual_seed(3)
    ours = SeluMLP(2, width=64)
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)
    x, t = torch.randn(7, 2), torch.rand(7)
    assert torch.equal(ref(torch.cat([x, t[:, None]], -1)), ours(x, t))


def test_unet_shapes_conditional_and_zero_init():
    torch.manual_seed(0)
    m = _small_unet()
    x, t, y = torch.randn(3, 2, 8, 8), torch.rand(3), torch.tensor([0, 2, 1])
    for cond in (y, None):
        v = m(x, t, cond)
        assert v.shape == x.shape and v.dtype == x.dtype
        assert torch.count_nonzero(v) == 0  # zero-initialised output conv: v ≡ 0 at init
    # with the zero-initialised layers opened up, time and class must reach the output at a visible scale
    # (guards against a normalisation that cancels the per-channel embedding)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim > 1 and not p.any():
                torch.nn.init.normal_(p, std=0.1)
    m.eval()
    v = m(x, t, y)
    scale = v.abs().mean()
    assert (v - m(x, t)).abs().mean() > 1e-2 * scale
    assert (v - m(x, 0.5 * t, y)).abs().mean() > 1e-2 * scale
    assert m.event_shape == (2, 8, 8)


@pytest.mark.parametrize("mult,size", [((1,), 8), ((1, 2, 2), 16), ((1, 2), 32)])
def test_unet_resolutions(mult, size):
    m = UNetVelocity(in_channels=1, base_channels=8, channel_mult=mult, image_size=size)
    assert m(torch.randn(2, 1, size, size), torch.rand(2)).shape == (2, 1, size, size)


@pytest.mark.parametrize("name,config", [
    ("mlp", dict(dim=3, hidden=16, depth=2, time_embed_dim=8, activation="gelu", n_classes=5, label_dropout=0.1)),
    ("mlp-selu", dict(dim=2, width=16)),
    ("mlp-endpoint", dict(dim=2, hidden=16, depth=2, time_embed_dim=8, activation="silu", n_classes=None,
                          label_dropout=0.0, bounded=True, min_remaining=0.01)),
    ("unet", dict(in_channels=1, base_channels=8, channel_mult=[1, 2], num_res_blocks=2, attention=False,
                  n_classes=None, label_dropout=0.0, image_size=8)),
])
def test_build_model_round_trip(name, config):
    m = build_model(name, **config)
    assert model_name(m) == name == m.name
    cfg = json.loads(json.dumps(m.config))  # JSON-able
    m2 = build_model(name, **cfg)
    assert m2.config == m.config
    m2.load_state_dict(m.state_dict())
    m.eval(), m2.eval()
    x = torch.randn(2, *m.event_shape)
    t = torch.rand(2)
    torch.testing.assert_close(m(x, t), m2(x, t), rtol=0, atol=0)


def test_model_errors():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope")
    with pytest.raises(TypeError, match="bad config"):
        build_model("mlp", dim=2, bogus=1)
    m = MLPVelocity(2, hidden=8, depth=1)
    with pytest.raises(ValueError, match="dim=2"):
        m(torch.randn(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match="n_classes=None"):
        m(torch.randn(4, 2), torch.rand(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="t must have shape"):
        m(torch.randn(4, 2), torch.rand(3))
    with pytest.raises(ValueError, match="divisible"):
        UNetVelocity(channel_mult=(1, 2, 2), image_size=10)
    with pytest.raises(ValueError, match=r"\(b, 1, 8, 8\)"):
        UNetVelocity(base_channels=8, image_size=8)(torch.randn(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(TypeError, match="integer label"):
        MLPVelocity(2, n_classes=2)(torch.randn(2, 2), torch.rand(2), torch.rand(2))
    assert set(MODELS) >= {"mlp", "mlp-endpoint", "mlp-selu", "unet"}
    with pytest.raises(ValueError, match="bounded"):
        EndpointMLP(2, bounded=1)
    with pytest.raises(ValueError, match="min_remaining"):
        EndpointMLP(2, min_remaining=1.0)


def test_sinusoidal_embedding_formula():
    emb = SinusoidalTimeEmbedding(8)
    t = torch.tensor([0.0, 0.25])
    out = emb(t)
    k = torch.arange(4)
    freqs = 1000.0 * 10000.0 ** (-k / 4)
    torch.testing.assert_close(out[1], torch.cat([torch.cos(0.25 * freqs), torch.sin(0.25 * freqs)]))
    torch.testing.assert_close(out[0], torch.cat([torch.ones(4), torch.zeros(4)]))


def test_endpoint_mlp_velocity_is_the_linear_path_velocity_towards_its_prediction():
    """``v = (x̂₁ − x) / (1 − t)``: the linear path's x̂₁ of ``v`` is the network's output, and one Euler step
    from ``t = 0`` is exactly ``x̂₁(x, 0)`` (no identity skip), also on image-shaped conditional input."""
    torch.manual_seed(0)
    m = EndpointMLP(dim=12, hidden=16, depth=2, n_classes=3).double().eval()
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * 0.9
    y = torch.tensor([0, 1, 2, 0, 1])
    v = m(x, t, y)
    assert v.shape == x.shape
    torch.testing.assert_close(LinearPath().x1_from_velocity(v, x, t), m.endpoint(x, t, y), rtol=1e-12, atol=1e-12)
    x_0 = torch.randn(7, 12, dtype=torch.float64)
    m1 = EndpointMLP(dim=12, hidden=16, depth=2).double().eval()
    torch.testing.assert_close(sample(m1, x_0, steps=1, method="euler"), m1.endpoint(x_0, torch.zeros(7)),
                               rtol=1e-12, atol=1e-12)
    assert torch.isfinite(m1(x_0, torch.ones(7))).all()  # 1 − t clamped at min_remaining


def test_bounded_endpoint_mlp_keeps_samples_in_the_head_box():
    """With a tanh last hidden layer every prediction lies in ``|x̂₁_k| ≤ Σ_j |W_kj| + |b_k|``, however far the input."""
    torch.manual_seed(1)
    m = EndpointMLP(dim=2, hidden=32, depth=3, bounded=True).eval()
    head = m.net[-1]
    box = head.weight.abs().sum(1) + head.bias.abs()
    x = torch.randn(1000, 2) * torch.logspace(0, 6, 1000)[:, None]
    with torch.no_grad():
        out = m.endpoint(x, torch.zeros(1000))
    assert (out.abs() <= box + 1e-5).all()
    free = EndpointMLP(dim=2, hidden=32, depth=3).eval()  # unbounded: far inputs go far
    with torch.no_grad():
        assert free.endpoint(x, torch.zeros(1000)).abs().max() > 100 * box.max()


def test_mlp_in_dim_takes_wider_features_than_it_returns():
    """``in_dim``: (b, in_dim) features in, (b, dim) out; the config round trip keeps it; older configs have none."""
    torch.manual_seed(0)
    m = MLPVelocity(2, hidden=8, depth=2, in_dim=4)
    out = m(torch.randn(5, 4), torch.rand(5))
    assert out.shape == (5, 2)
    m2 = build_model("mlp", **json.loads(json.dumps(m.config)))
    m2.load_state_dict(m.state_dict())
    x, t = torch.randn(3, 4), torch.rand(3)
    torch.testing.assert_close(m2(x, t), m(x, t), rtol=0, atol=0)
    assert "in_dim" not in MLPVelocity(2).config
    with pytest.raises(ValueError, match="in_dim=4"):
        m(torch.randn(5, 2), torch.rand(5))
    with pytest.raises(ValueError, match="in_dim"):
        MLPVelocity(2, in_dim=0)


def test_zero_output_makes_the_velocity_zero_and_keeps_the_hidden_layers():
    m = MLPVelocity(3, hidden=16, depth=2)
    hidden = m.net[0].weight.clone()
    assert m.zero_output_() is m
    x, t = torch.randn(5, 3), torch.rand(5)
    assert torch.equal(m(x, t), torch.zeros(5, 3)) and torch.equal(m.net[0].weight, hidden)
    loss = (m(x, t) - 1).pow(2).sum()
    loss.backward()
    assert m.net[-1].weight.grad.abs().sum() > 0  # the first step reaches the output layer
