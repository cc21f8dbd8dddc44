"""save_pretrained / from_pretrained: every model the library makes round-trips bit for bit; training checkpoints
(library and CLI, manifold runs included) load through the same reader; a wrapped network of your own saves
weights its own code loads; bad folders fail with one line naming the file."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from steerflow.manifolds import FlatTorus, Product, Sphere, TangentVelocity
from steerflow.manifolds.velocity import manifold_spec
from steerflow.models import (ICNN, ConditionedVelocityMLP, EndpointMLP, ExternalVelocity, MLPVelocity,
                              PopulationVelocity, PotentialMLP, PotentialVelocity, QuadraticPotential, SeluMLP,
                              SetEncoder, UNetVelocity, build_model, from_pretrained, model_name, save_pretrained)
from steerflow.straighten.distill import OneStep  # (re-exported from steerflow.models)
from steerflow.training import load_checkpoint, load_state, save_checkpoint, train
from steerflow.paths.multimarginal import MultimarginalInterpolant
from steerflow.transport.costs import LpCost, get_cost
from steerflow.transport.multimarginal import ConditionalMeansNet


class TinyNet(nn.Module):
    """A user's own network, unknown to steerflow: ``forward(x, t)``."""

    def __init__(self, dim: int = 3, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim + 1, width), nn.Tanh(), nn.Linear(width, dim))
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x, t, labels=None):
        out = self.body(torch.cat([x, t[:, None]], -1)) * self.scale
        return out if labels is None else out + labels[:, None].to(out)


class Output:
    def __init__(self, sample):
        self.sample = sample


class TimestepNet(TinyNet):
    """A network with a diffusers-like calling convention: an output object, labels by keyword."""

    def forward(self, x, timestep, class_labels=None):
        return Output(super().forward(x, timestep / 1000.0, class_labels))


def _sphere_field():
    return TangentVelocity(MLPVelocity(3, hidden=16, depth=2), Sphere(2))


# name, factory, (inputs) -> called as model(*inputs)
def _xt(*shape):
    g = torch.Generator().manual_seed(1)
    return torch.randn(*shape, generator=g), torch.rand(shape[0], generator=g)


CASES = {
    "mlp": (lambda: MLPVelocity(2, hidden=16, depth=2), lambda: _xt(5, 2)),
    "mlp-conditional": (lambda: MLPVelocity(2, hidden=16, depth=2, n_classes=3, label_dropout=0.2),
                        lambda: (*_xt(5, 2), torch.tensor([0, 1, 2, 1, 0]))),
    "mlp-endpoint": (lambda: EndpointMLP(2, hidden=16, depth=2, bounded=True), lambda: _xt(5, 2)),
    "mlp-selu": (lambda: SeluMLP(2, width=8), lambda: _xt(5, 2)),
    "unet-conditional": (lambda: UNetVelocity(in_channels=1, base_channels=8, channel_mult=(1, 2), attention=True,
                                              n_classes=3, image_size=8),
                         lambda: (*_xt(2, 1, 8, 8), torch.tensor([2, 0]))),
    "potential-mlp": (lambda: PotentialMLP(3, hidden=16, depth=2), lambda: _xt(5, 3)),
    "icnn": (lambda: ICNN(3, hidden=8, depth=2, strong_convexity=0.1), lambda: _xt(5, 3)),
    "quadratic-potential": (lambda: QuadraticPotential(2, hidden=8), lambda: _xt(5, 2)),
    "potential-velocity": (lambda: PotentialVelocity(ICNN(2, hidden=8, depth=2)), lambda: _xt(5, 2)),
    "potential-velocity-lp": (lambda: PotentialVelocity(PotentialMLP(2, hidden=8, depth=1),
                                                        link=LpCost(1.5).grad_conjugate), lambda: _xt(5, 2)),
    "population": (lambda: PopulationVelocity.build(2, embed_dim=4, hidden=16, depth=2, pooling="attention",
                                                    encoder_hidden=8),
                   lambda: (*_xt(6, 2), torch.randn(3, 7, 2, generator=torch.Generator().manual_seed(2)))),
    "set-encoder": (lambda: SetEncoder(2, hidden=8, embed_dim=4, pooling="mean"),
                    lambda: (torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(3)),)),
    "conditioned-mlp": (lambda: ConditionedVelocityMLP(2, cond_dim=3, hidden=8, depth=1),
                        lambda: (*_xt(4, 2), torch.randn(4, 3, generator=torch.Generator().manual_seed(4)))),
    "tangent-sphere": (_sphere_field, lambda: (Sphere(2).random_base(5, generator=torch.Generator().manual_seed(0)),
                                               torch.rand(5))),
    "tangent-torus-periodic": (lambda: TangentVelocity(MLPVelocity(2, hidden=16, depth=2, in_dim=4), FlatTorus(2),
                                                       embed="periodic"),
                               lambda: (torch.rand(5, 2) * 6.0, torch.rand(5))),
    "tangent-product-periodic": (lambda: TangentVelocity(MLPVelocity(4, hidden=16, depth=1, in_dim=5),
                                                         Product(Sphere(2), FlatTorus(1)),
                                                         embed=Product(Sphere(2), FlatTorus(1)).periodic_features),
                                 lambda: (Product(Sphere(2), FlatTorus(1)).random_base(
                                     4, generator=torch.Generator().manual_seed(0)), torch.rand(4))),
    "conditional-means-latent": (lambda: ConditionalMeansNet(2, MultimarginalInterpolant(3, gamma_scale=0.5),
                                                             hidden=8, depth=2),
                                 lambda: (torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]), _xt(2, 2)[0])),
    "one-step": (lambda: OneStep(EndpointMLP(2, hidden=16, depth=2)), lambda: (_xt(5, 2)[0],)),
    "one-step-tangent": (lambda: OneStep(_sphere_field()), lambda: (Sphere(2).random_base(
        4, generator=torch.Generator().manual_seed(0)),)),
}


def _perturb(model: nn.Module) -> None:
    """Move every parameter off its initial value: a reload that re-initialised would not match."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_library_model_round_trips_bit_for_bit(case, tmp_path):
    make, inputs = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    _perturb(model)
    args = inputs()
    with torch.no_grad() if not isinstance(model, PotentialVelocity) else torch.enable_grad():
        expected = model(*args)
    path = model.save_pretrained(tmp_path / case)
    meta = json.loads((path / "config.json").read_text())
    assert meta["format"] == "steerflow.model" and meta["format_version"] == 1
    assert meta["class"] == type(model).name == model_name(model)
    assert meta["config"] == json.loads(json.dumps(model.config))
    torch.manual_seed(123)  # a fresh initialisation would differ
    children = {"link": model.link} if getattr(model, "link", None) is not None else {}
    loaded = from_pretrained(path, **children)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config == model.config
    assert type(model).from_pretrained(path, **children).config == model.config
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad() if not isinstance(model, PotentialVelocity) else torch.enable_grad():
        assert torch.equal(loaded(*args), expected)
    # build_model takes the same (nested) config
    if not children:
        assert build_model(meta["class"], **meta["config"]).config == model.config


def test_nested_configs_name_the_children_and_the_manifold(tmp_path):
    v = TangentVelocity(MLPVelocity(2, hidden=8, depth=1, in_dim=4), FlatTorus(2), embed="periodic")
    assert v.config == {"model": {"class": "mlp", "config": v.model.config}, "manifold": "torus2",
                        "embed": "periodic", "flatten": False}
    pv = PotentialVelocity(PotentialMLP(2, hidden=8, depth=1), link=LpCost(3.0).grad_conjugate)
    assert pv.config["link"] == {"cost": "lp", "options": {"p": 3.0}}
    d = save_pretrained(pv, tmp_path / "pv")
    # costs live above the models: the link is passed again, and checked against the record
    with pytest.raises(ValueError, match=r"pass link=get_cost\('lp', p=3.0\).grad_conjugate"):
        from_pretrained(d)
    with pytest.raises(ValueError, match="not the stored link"):
        from_pretrained(d, link=LpCost(2.0).grad_conjugate)
    loaded = from_pretrained(d, link=get_cost("lp", p=3.0).grad_conjugate)
    y = torch.randn(4, 2)
    assert torch.equal(loaded.link(y), LpCost(3.0).grad_conjugate(y))


def test_float64_models_keep_their_dtype(tmp_path):
    model = MLPVelocity(2, hidden=8, depth=1).double().eval()
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    loaded = from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert next(loaded.parameters()).dtype == torch.float64
    assert torch.equal(loaded(x, t), model(x, t))


def test_unsaveable_models_say_why(tmp_path):
    with pytest.raises(TypeError, match="ExternalVelocity"):
        save_pretrained(TinyNet(), tmp_path / "a")
    with pytest.raises(TypeError, match="not a registered steerflow model"):
        TangentVelocity(TinyNet(3), Sphere(2)).save_pretrained(tmp_path / "b")
    with pytest.raises(TypeError, match="embed"):
        TangentVelocity(MLPVelocity(3), Sphere(2), embed=torch.tanh).save_pretrained(tmp_path / "c")
    from steerflow.manifolds import Hyperbolic

    assert manifold_spec(Hyperbolic(2)) == "hyperbolic2"
    with pytest.raises(TypeError, match="spec name"):
        manifold_spec(Hyperbolic(2, base_std=0.5))
    with pytest.raises(TypeError, match="link"):
        PotentialVelocity(ICNN(2), link=torch.tanh).save_pretrained(tmp_path / "d")
    assert not (tmp_path / "a" / "config.json").exists()


def test_loading_errors_name_the_file_and_the_problem(tmp_path):
    model = MLPVelocity(2, hidden=8, depth=1)
    d = model.save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        from_pretrained(tmp_path)

    def broken(name, edit):
        b = tmp_path / name
        shutil.copytree(d, b)
        edit(b)
        return b

    b = broken("nojson", lambda b: (b / "config.json").write_text("{not json"))
    with pytest.raises(ValueError, match=r"corrupt JSON in .*nojson/config.json"):
        from_pretrained(b)
    b = broken("noweights", lambda b: (b / "model.safetensors").unlink())
    with pytest.raises(FileNotFoundError, match=r"missing weights file .*noweights/model.safetensors"):
        from_pretrained(b)
    b = broken("truncated", lambda b: (b / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:100]))
    with pytest.raises(ValueError, match=r"corrupt weights file .*truncated/model.safetensors"):
        from_pretrained(b)

    def set_meta(b, **kw):
        meta = json.loads((b / "config.json").read_text())
        meta.update(kw)
        (b / "config.json").write_text(json.dumps(meta))

    b = broken("unknown", lambda b: set_meta(b, **{"class": "transformer-xl"}))
    with pytest.raises(ValueError, match=r"unknown/config.json: unknown model class 'transformer-xl'"):
        from_pretrained(b)
    b = broken("wider", lambda b: set_meta(b, config={**model.config, "hidden": 9}))
    with pytest.raises(ValueError, match=r"wider/model.safetensors does not match the model: shape mismatch at "
                                         r"net.0.bias: stored \(8,\) vs model \(9,\), net.0.weight: stored "
                                         r"\(8, 66\) vs model \(9, 66\)"):
        from_pretrained(b)
    b = broken("badkey", lambda b: set_meta(b, config={**model.config, "bogus": 1}))
    with pytest.raises(ValueError, match="bad config for model 'mlp'"):
        from_pretrained(b)
    b = broken("future", lambda b: set_meta(b, format_version=99))
    with pytest.raises(ValueError, match="format_version 99"):
        from_pretrained(b)
    b = broken("foreign", lambda b: set_meta(b, format="diffusers"))
    with pytest.raises(ValueError, match="not a steerflow model"):
        from_pretrained(b)
    with pytest.raises(ValueError, match="holds a MLPVelocity, not a UNetVelocity"):
        UNetVelocity.from_pretrained(d)


def test_a_class_defined_above_the_models_names_its_package_until_imported(tmp_path, monkeypatch):
    from steerflow.models import REGISTRY

    d = _sphere_field().save_pretrained(tmp_path / "v")
    monkeypatch.delitem(REGISTRY, "tangent")  # as in a process that has not imported steerflow.manifolds
    with pytest.raises(ValueError, match="'tangent' is defined in steerflow.manifolds: import it first"):
        from_pretrained(d)


def test_a_training_checkpoint_is_read_by_from_pretrained_with_ema_by_default(tmp_path):
    torch.manual_seed(0)
    data = torch.randn(256, 2)
    res = train(MLPVelocity(2, hidden=16, depth=2), data, steps=6, batch_size=32, ema_decay=0.5, device="cpu",
                out_dir=tmp_path / "run", progress=False)
    x, t = _xt(5, 2)
    with torch.no_grad():
        ema = from_pretrained(tmp_path / "run")
        raw = from_pretrained(tmp_path / "run", ema=False)
        assert torch.equal(ema(x, t), res.ema.eval()(x, t))
        assert torch.equal(raw(x, t), res.model.eval()(x, t))
        assert not torch.equal(ema(x, t), raw(x, t))
        ckpt = load_checkpoint(tmp_path / "run")
        assert torch.equal(ckpt.ema_model(x, t), ema(x, t))
    step = next((tmp_path / "run").glob("step-*"))
    assert isinstance(MLPVelocity.from_pretrained(step), MLPVelocity)


def test_a_wrapper_checkpoint_rebuilds_without_cli_code(tmp_path):
    """TangentVelocity / OneStep in a training checkpoint: load_checkpoint alone rebuilds them."""
    torch.manual_seed(0)
    v = TangentVelocity(MLPVelocity(2, hidden=8, depth=1, in_dim=4), FlatTorus(2), embed="periodic")
    save_checkpoint(tmp_path / "c", v, config={}, step=3)
    ckpt = load_checkpoint(tmp_path / "c")
    assert isinstance(ckpt.model, TangentVelocity) and ckpt.model.embed_name == "periodic"
    x, t = torch.rand(4, 2) * 6, torch.rand(4)
    with torch.no_grad():
        assert torch.equal(ckpt.model(x, t), v.eval()(x, t))
    meta = json.loads((tmp_path / "c" / "step-00000003" / "config.json").read_text())
    assert meta["model"]["name"] == "tangent" and meta["model"]["config"]["manifold"] == "torus2"


def test_a_manifold_run_trained_by_the_cli_reloads_with_the_library_alone(tmp_path):
    from steerflow.cli.main import main

    pts = Sphere(2).random_base(64, generator=torch.Generator().manual_seed(0))
    import numpy as np

    np.save(tmp_path / "pts.npy", pts.numpy())
    out = tmp_path / "run"
    rc = main(["train", "--manifold", "sphere2", "--data", str(tmp_path / "pts.npy"), "--steps", "4", "--hidden",
               "8", "--batch", "16", "--quiet", "--out", str(out)])
    assert rc == 0
    from steerflow.cli._common import load_flow

    by_cli = load_flow(out, allow_manifold=True).model
    x, t = pts[:8], torch.rand(8)
    with torch.no_grad():
        for model in (load_checkpoint(out).ema_model or load_checkpoint(out).model, from_pretrained(out)):
            assert isinstance(model, TangentVelocity) and model.manifold.name == "sphere2"
            assert torch.equal(model(x, t), by_cli(x, t))
    # a checkpoint from before the spec was stored in config.json: rebuilt from run.json's network and manifold
    step = next(out.glob("step-*"))
    meta = json.loads((step / "config.json").read_text())
    meta["model"] = {"name": None, "config": None}
    (step / "config.json").write_text(json.dumps(meta))
    with torch.no_grad():
        assert torch.equal(from_pretrained(out)(x, t), by_cli(x, t))
        old = load_checkpoint(out)
        assert torch.equal((old.ema_model or old.model)(x, t), by_cli(x, t))


def test_a_wrapped_network_saves_weights_its_own_code_loads(tmp_path):
    torch.manual_seed(0)
    v = ExternalVelocity(TinyNet(3))
    _perturb(v)
    x, t = _xt(4, 3)
    d = v.save_pretrained(tmp_path / "ext")
    tensors = load_file(str(d / "model.safetensors"))
    assert set(tensors) == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias", "scale"}
    mine = TinyNet(3)
    mine.load_state_dict(tensors)  # strict: the user's own class reads the file as it is
    with torch.no_grad():
        assert torch.equal(mine(x, t), v(x, t))
        loaded = ExternalVelocity.from_pretrained(d, network=TinyNet(3))
        assert torch.equal(loaded(x, t), v(x, t))
    meta = json.loads((d / "config.json").read_text())
    assert meta["class"] == "external" and meta["config"]["network_class"].endswith("TinyNet")
    with pytest.raises(ValueError, match=r"network=<a freshly built TinyNet>"):
        from_pretrained(d)
    with pytest.raises(ValueError, match="shape mismatch"):
        from_pretrained(d, network=TinyNet(3, width=8))


def test_a_wrapped_network_trains_and_its_checkpoint_is_unprefixed(tmp_path):
    """train() on an ExternalVelocity: the checkpoint's weights load into the bare network, resume works."""
    torch.manual_seed(0)
    v = ExternalVelocity(TimestepNet(2), time_scale=1000.0, cond_keyword="class_labels", output="sample")
    x, t = _xt(4, 2)
    labels = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():  # the adapter calls the network as network(x, 1000 t, class_labels=...).sample
        torch.testing.assert_close(v(x, t, labels), TinyNet.forward(v.network, x, t, labels), rtol=0, atol=0)
    data = torch.randn(128, 2)
    res = train(v, data, steps=4, batch_size=16, ema_decay=0.5, device="cpu", out_dir=tmp_path / "run",
                progress=False)
    step = next((tmp_path / "run").glob("step-*"))
    bare = TimestepNet(2)
    bare.load_state_dict(load_file(str(step / "ema.safetensors")))
    with torch.no_grad():
        assert torch.equal(bare(x, 1000 * t).sample, res.ema(x, t))
        loaded = from_pretrained(tmp_path / "run", network=TimestepNet(2))
        assert torch.equal(loaded(x, t), res.ema(x, t))
    again = ExternalVelocity(TimestepNet(2), time_scale=1000.0, cond_keyword="class_labels", output="sample")
    assert load_state(tmp_path / "run", again)[0] == 4
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), res.model.parameters()))


def test_a_class_of_your_own_registers_by_subclassing_the_mixin(tmp_path):
    from steerflow.models import PretrainedMixin

    class ScaledNet(PretrainedMixin, TinyNet):
        name = "test-scaled-net"

        def __init__(self, dim: int, width: int = 16) -> None:
            super().__init__(dim, width)
            self._set_config(dim=dim, width=width)

    torch.manual_seed(0)
    net = ScaledNet(3, width=4).eval()
    x, t = _xt(4, 3)
    loaded = from_pretrained(net.save_pretrained(tmp_path / "s"))
    assert type(loaded) is ScaledNet and loaded.config == {"dim": 3, "width": 4}
    with torch.no_grad():
        assert torch.equal(loaded(x, t), net(x, t))
    with pytest.raises(TypeError, match="'mlp' is taken"):
        type("Clash", (PretrainedMixin, nn.Module), {"name": "mlp"})
