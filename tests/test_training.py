"""Training: the CFM loss against hand computation, samplers, EMA math, train() convergence to the exact
Gaussian velocity, bit-exact seeds and resume, non-finite stops, checkpoint errors."""
import json
import math
import os

import pytest
import torch

from steerflow.data import GaussianMixture
from steerflow.models import MLPVelocity, SeluMLP, build_model
from steerflow.paths import AffinePath, LinearPath
from steerflow.couplings import ConditionalOT, Sinkhorn
from steerflow.training import (EMA, LogitNormalTime, UniformTime, flow_matching_loss, get_time_sampler,
                                load_checkpoint, lr_factor, save_checkpoint, train)
from steerflow.training.loop import _time_seed

GM = GaussianMixture([1.0], [[2.0, -1.0]], [[[0.5, 0.2], [0.2, 0.3]]])
TINY = dict(hidden=32, depth=2, time_embed_dim=16)


# --- loss ---------------------------------------------------------------------------------------
def test_loss_equals_hand_computation():
    torch.manual_seed(0)
    m = MLPVelocity(2, **TINY)
    x_0, x_1, t = torch.randn(16, 2), torch.randn(16, 2), torch.rand(16)
    x_t = t[:, None] * x_1 + (1 - t[:, None]) * x_0
    expected = ((m(x_t, t) - (x_1 - x_0)) ** 2).mean()
    torch.testing.assert_close(flow_matching_loss(m, x_0, x_1, t, path=LinearPath()), expected, rtol=0, atol=0)
    # cosine path: x_t = sin(πt/2) x_1 + cos(πt/2) x_0, u_t = π/2 (cos(πt/2) x_1 − sin(πt/2) x_0)
    a, s = torch.sin(math.pi * t / 2)[:, None], torch.cos(math.pi * t / 2)[:, None]
    x_t = a * x_1 + s * x_0
    u_t = math.pi / 2 * (s * x_1 - a * x_0)
    torch.testing.assert_close(flow_matching_loss(m, x_0, x_1, t, path=AffinePath("cosine")),
                               ((m(x_t, t) - u_t) ** 2).mean())


def test_loss_weighting_is_per_sample_and_checked():
    torch.manual_seed(0)
    m = MLPVelocity(2, **TINY)
    x_0, x_1, t = torch.randn(32, 2), torch.randn(32, 2), torch.rand(32)
    seen = []

    def w(tt):
        seen.append(tt.shape)
        return 1.0 / (1.0 - tt + 0.1)

    x_t = t[:, None] * x_1 + (1 - t[:, None]) * x_0
    per = ((m(x_t, t) - (x_1 - x_0)) ** 2).mean(1)
    torch.testing.assert_close(flow_matching_loss(m, x_0, x_1, t, path=LinearPath(), weighting=w),
                               (w(t) * per).mean())
    assert seen[0] == (32,)  # O(B): one weight per sample, never a B×B matrix
    with pytest.raises(ValueError, match="one weight per sample"):
        flow_matching_loss(m, x_0, x_1, t, path=LinearPath(), weighting=lambda tt: tt[:, None] * tt[None, :])


def test_loss_uses_path_sq_norm():
    class MetricPath:  # a diagonal metric g = diag(1, 4): ||w||² = w_1² + 4 w_2²
        def sample(self, x_0, x_1, t):
            return LinearPath().sample(x_0, x_1, t)

        def sq_norm(self, x_t, w):
            return w[:, 0] ** 2 + 4 * w[:, 1] ** 2

    torch.manual_seed(0)
    m = MLPVelocity(2, **TINY)
    x_0, x_1, t = torch.randn(8, 2), torch.randn(8, 2), torch.rand(8)
    x_t = t[:, None] * x_1 + (1 - t[:, None]) * x_0
    d = m(x_t, t) - (x_1 - x_0)
    torch.testing.assert_close(flow_matching_loss(m, x_0, x_1, t, path=MetricPath()),
                               ((d[:, 0] ** 2 + 4 * d[:, 1] ** 2) / 2).mean())


def test_time_samplers():
    g = torch.Generator().manual_seed(0)
    u = UniformTime()(20000, generator=g)
    assert u.shape == (20000,) and u.min() >= 0 and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
    t = get_time_sampler("logit_normal")(20000, generator=torch.Generator().manual_seed(1))
    z = torch.log(t / (1 - t))
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    t2 = LogitNormalTime(0.5, 2.0)(20000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.log(t2 / (1 - t2)), 0.5 + 2.0 * z, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="unknown time sampler"):
        get_time_sampler("beta")


def test_lr_schedule():
    assert lr_factor(0, steps=100, warmup=10, schedule="cosine") == pytest.approx(0.1)
    assert lr_factor(9, steps=100, warmup=10, schedule="cosine") == pytest.approx(1.0)
    assert lr_factor(10, steps=100, warmup=10, schedule="cosine") == pytest.approx(1.0)
    assert lr_factor(55, steps=100, warmup=10, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(100, steps=100, warmup=10, schedule="cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(70, steps=100, warmup=0, schedule="constant") == 1.0


def test_ema_closed_form():
    lin = torch.nn.Linear(3, 2)
    theta0 = [p.detach().clone() for p in lin.parameters()]
    beta = 0.9
    ema = EMA(lin, beta, warmup=False)
    thetas = []
    for k in range(5):
        with torch.no_grad():
            for p in lin.parameters():
                p.add_(float(k + 1))
        thetas.append([p.detach().clone() for p in lin.parameters()])
        ema.update()
    n = len(thetas)
    for i, p in enumerate(ema.module.parameters()):
        expected = beta**n * theta0[i] + (1 - beta) * sum(beta ** (n - 1 - k) * thetas[k][i] for k in range(n))
        torch.testing.assert_close(p, expected)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_warmup_schedule():
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = EMA(lin, 0.999)
    expected = torch.zeros(())
    for n in range(50):
        with torch.no_grad():
            lin.weight.fill_(float(n + 1))
        beta_n = min(0.999, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(beta_n)
        ema.update()
        expected = beta_n * expected + (1 - beta_n) * (n + 1)
    torch.testing.assert_close(ema.module.weight.reshape(()), expected)


# --- train ----------------------------------------------------------------------------------------
def _exact_error(model, n=4000):
    g = torch.Generator().manual_seed(5)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x_1 = GM.sample(n, g)
    x_0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x_t = t[:, None] * x_1 + (1 - t[:, None]) * x_0
    v_star = GM.velocity(x_t, t)
    with torch.no_grad():
        v = model(x_t.float(), t.float()).double()
    rel = ((v - v_star) ** 2).sum(1).mean() / (v_star**2).sum(1).mean()
    # the least achievable CFM loss: E||u_t − v*(x_t, t)||² / D
    l_star = ((x_1 - x_0 - v_star) ** 2).mean()
    return rel.item(), l_star.item()


def test_train_learns_exact_gaussian_velocity():
    torch.manual_seed(0)
    res = train(MLPVelocity(2, hidden=64, depth=2), GM, steps=300, batch_size=256, lr=1e-2, warmup=20,
                ema_decay=0.9, device="cpu", progress=False, seed=1)
    assert res.losses.shape == (300,) and res.step == 300
    assert res.losses[-50:].mean() < 0.5 * res.losses[:10].mean()
    rel, l_star = _exact_error(res.model)
    assert rel < 0.02, rel
    assert _exact_error(res.ema)[0] < 0.02
    # the trained loss sits at the irreducible CFM loss of the exact field (Monte Carlo, ±5%)
    assert abs(res.losses[-100:].mean().item() - l_star) < 0.05 * l_star


def test_train_matches_bare_loop_bit_for_bit():
    data = torch.randn(500, 2)
    torch.manual_seed(0)
    m_ref = SeluMLP(2)
    m = build_model("mlp-selu", **m_ref.config)
    m.load_state_dict(m_ref.state_dict())
    res = train(m, data, steps=30, batch_size=64, lr=1e-3, lr_schedule="constant", device="cpu", progress=False,
                seed=7, log_every=7)
    g = torch.Generator().manual_seed(7)  # pairs (x_1, x_0)
    g_t = torch.Generator().manual_seed(_time_seed(7))  # t has a generator of its own
    # PyTorch's default AdamW on the CPU (the per-parameter loop): train()'s foreach update must match it exactly
    opt = torch.optim.AdamW(m_ref.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        x_1 = data[torch.randint(500, (64,), generator=g)]
        x_0 = torch.randn(x_1.shape, generator=g)
        t = torch.rand(64, generator=g_t)
        x_t = t[:, None] * x_1 + (1 - t[:, None]) * x_0
        loss = ((m_ref(x_t, t) - (x_1 - x_0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    assert torch.equal(res.losses, torch.stack(losses))
    for a, b in zip(res.model.parameters(), m_ref.parameters()):
        assert torch.equal(a, b)


class _LabelledData:
    """``sample(n, generator) -> (x_1, labels)``: class k is the Gaussian with mean (2k − 1, 0)."""

    def sample(self, n, generator):
        y = torch.randint(2, (n,), generator=generator)
        x = torch.randn(n, 2, generator=generator) * 0.3
        x[:, 0] += 2.0 * y - 1.0
        return x, y


def _resume_kwargs(tmp):
    return dict(steps=24, batch_size=32, lr=5e-3, warmup=5, lr_schedule="cosine", ema_decay=0.8, grad_clip=1.0,
                device="cpu", progress=False, seed=3, log_every=4, ckpt_every=8, out_dir=tmp,
                time_sampler="logit_normal")


def _cond_model():
    torch.manual_seed(11)
    return MLPVelocity(2, n_classes=2, label_dropout=0.3, **TINY)


def test_resume_is_bit_identical(tmp_path):
    full = train(_cond_model(), _LabelledData(), **_resume_kwargs(tmp_path / "full"))
    part = train(_cond_model(), _LabelledData(), stop_at=10, **_resume_kwargs(tmp_path / "part"))
    assert part.step == 10 and part.stopped_early
    assert json.loads((tmp_path / "part" / "latest.json").read_text())["step"] == 10
    torch.manual_seed(999)  # the caller's RNG must not matter
    other_init = MLPVelocity(2, n_classes=2, label_dropout=0.3, **TINY)
    resumed = train(other_init, _LabelledData(), resume=True, **_resume_kwargs(tmp_path / "part"))
    assert resumed.step == 24 and not resumed.stopped_early
    assert torch.equal(resumed.losses, full.losses)
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(resumed.ema.parameters(), full.ema.parameters()):
        assert torch.equal(a, b)
    lines = [json.loads(s) for s in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines] == [4, 8, 10, 12, 16, 20, 24]


@pytest.mark.parametrize("coupling", [ConditionalOT(), Sinkhorn(reg=0.1)])
def test_coupling_workers_give_the_same_trace(coupling):
    """Coupling ahead in threads changes nothing: deterministic (exact OT within labels) and sampled
    (Sinkhorn draws from its own per-batch generator) couplings give bit-identical traces for 0/1/3 workers."""
    kw = dict(steps=13, batch_size=24, device="cpu", progress=False, log_every=5, seed=4, coupling=coupling)
    runs = [train(_cond_model(), _LabelledData(), coupling_workers=w, **kw) for w in (0, 1, 3)]
    for r in runs[1:]:
        assert torch.equal(r.losses, runs[0].losses)
        for a, b in zip(r.model.parameters(), runs[0].model.parameters()):
            assert torch.equal(a, b)


def test_resume_with_coupling_workers_is_bit_identical(tmp_path):
    """Batches drawn ahead at a checkpoint are drawn again after resuming: same weights as one run."""
    kw = {**_resume_kwargs(tmp_path / "part"), "coupling": "conditional-ot"}
    full = train(_cond_model(), _LabelledData(), coupling_workers=0, **{**kw, "out_dir": tmp_path / "full"})
    # max_seconds=0 stops at the first log step (4) with two batches still coupling in the threads
    part = train(_cond_model(), _LabelledData(), max_seconds=0.0, coupling_workers=2, **kw)
    assert part.step == 4 and part.stopped_early
    resumed = train(_cond_model(), _LabelledData(), resume=True, coupling_workers=1, **kw)
    assert torch.equal(resumed.losses, full.losses)
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(a, b)


def test_coupling_workers_errors():
    with pytest.raises(ValueError, match="coupling_workers"):
        train(_cond_model(), _LabelledData(), steps=2, batch_size=8, device="cpu", progress=False, coupling_workers=-1)

    def bad(x_0, x_1, labels=None, generator=None):
        return x_0[:-1], x_1
    with pytest.raises(ValueError, match="changed the batch shapes"):  # a worker's error reaches the caller
        train(_cond_model(), _LabelledData(), steps=3, batch_size=8, device="cpu", progress=False, coupling=bad,
              coupling_workers=2)


def test_resume_checks_settings_and_existing_dir(tmp_path):
    kw = _resume_kwargs(tmp_path)
    train(_cond_model(), _LabelledData(), stop_at=8, **kw)
    with pytest.raises(FileExistsError, match="resume=True"):
        train(_cond_model(), _LabelledData(), **kw)
    with pytest.raises(ValueError, match="lr"):
        train(_cond_model(), _LabelledData(), resume=True, **{**kw, "lr": 1e-3})


def test_same_seed_same_trace_and_different_seed_differs():
    kw = dict(steps=20, batch_size=32, device="cpu", progress=False, log_every=5, ema_decay=0.9)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(0)
        runs.append(train(MLPVelocity(2, n_classes=2, label_dropout=0.5, **TINY), _LabelledData(), seed=seed, **kw))
    assert torch.equal(runs[0].losses, runs[1].losses)
    assert not torch.equal(runs[0].losses, runs[2].losses)
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(a, b)


class _PoisonedData:
    """Finite batches, then NaN (or ``bad``) from the ``bad_call``-th draw on."""

    def __init__(self, bad_call, bad=float("nan")):
        self.calls, self.bad_call, self.bad = 0, bad_call, bad

    def sample(self, n, generator):
        self.calls += 1
        x = torch.randn(n, 2, generator=generator)
        if self.calls >= self.bad_call:
            x[n // 2, 1] = self.bad
        return x


class _PoisonedWeight:
    """A loss weighting w(t) = 1 that turns NaN from the ``bad_call``-th step on (finite data, NaN loss)."""

    def __init__(self, bad_call):
        self.calls, self.bad_call = 0, bad_call

    def __call__(self, t):
        self.calls += 1
        return torch.full_like(t, float("nan") if self.calls >= self.bad_call else 1.0)


def test_non_finite_loss_names_step_and_keeps_checkpoint(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(FloatingPointError, match="at step 7;.*step 5"):
        train(MLPVelocity(2, **TINY), torch.randn(64, 2), steps=20, batch_size=16, device="cpu", progress=False,
              log_every=5, ckpt_every=5, out_dir=tmp_path, weighting=_PoisonedWeight(7))
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 5
    assert all(torch.isfinite(p).all() for p in ckpt.model.parameters())
    assert torch.isfinite(ckpt.extra["losses"]).all() and ckpt.extra["losses"].shape == (5,)


# --- bad data ------------------------------------------------------------------------------------------
_QUICK = dict(steps=3, batch_size=8, device="cpu", progress=False, seed=0)


def test_integer_data_is_converted_to_the_model_dtype():
    """Integer data trains as the same values in the model's floating-point dtype (a torch-internal
    'normal_kernel_cpu not implemented' error before)."""
    ints = torch.randint(-3, 4, (50, 2))
    runs = []
    for data in (ints, ints.to(torch.get_default_dtype()), (ints.to(torch.int32), torch.arange(50) % 2)):
        torch.manual_seed(0)
        cond = isinstance(data, tuple)
        runs.append(train(MLPVelocity(2, n_classes=2 if cond else None, **TINY), data, **_QUICK))
    assert torch.equal(runs[0].losses, runs[1].losses)
    assert torch.isfinite(runs[2].losses).all()

    class IntSampler:
        def sample(self, n, generator):
            return torch.randint(-3, 4, (n, 2), generator=generator, dtype=torch.int16)

    torch.manual_seed(0)
    assert torch.isfinite(train(MLPVelocity(2, **TINY), IntSampler(), **_QUICK).losses).all()
    torch.manual_seed(0)
    double = train(MLPVelocity(2, **TINY).double(), ints, **_QUICK)  # to the model's dtype, here float64
    assert double.losses.shape == (3,) and next(double.model.parameters()).dtype == torch.float64


def test_bool_and_complex_data_are_a_type_error_naming_the_dtype():
    for data in (torch.rand(20, 2) > 0.5, torch.randn(20, 2, dtype=torch.complex64),
                 (torch.rand(20, 2) > 0.5, torch.arange(20) % 2)):
        with pytest.raises(TypeError, match=r"torch\.(bool|complex64)"):
            train(MLPVelocity(2, **TINY), data, **_QUICK)

    class BoolSampler:
        def sample(self, n, generator):
            return torch.rand(n, 2, generator=generator) > 0.5

    with pytest.raises(TypeError, match=r"data\.sample.*torch\.bool"):
        train(MLPVelocity(2, **TINY), BoolSampler(), **_QUICK)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_data_is_a_value_error_naming_the_data(bad, tmp_path):
    x = torch.randn(30, 2)
    x[17, 0] = bad
    for data in (x, (x, torch.arange(30) % 2)):
        with pytest.raises(ValueError, match="data tensor holds 1 non-finite value.*sample 17"):
            train(MLPVelocity(2, n_classes=2, **TINY), data, **_QUICK)
    # a sampler: the first batch, and each later one, before any step trains on it
    with pytest.raises(ValueError, match=r"data\.sample.*non-finite.*sample 8 of the batch for step 1"):
        train(MLPVelocity(2, **TINY), _PoisonedData(1, bad), steps=3, batch_size=16, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"data\.sample.*non-finite.*batch for step 7"):
        train(MLPVelocity(2, **TINY), _PoisonedData(7, bad), steps=20, batch_size=16, device="cpu",
              progress=False, log_every=5, ckpt_every=5, out_dir=tmp_path / str(bad))
    assert load_checkpoint(tmp_path / str(bad)).step == 5  # the last good checkpoint stays
    # a batch drawn ahead for a background coupling is checked too, and named by its step
    with pytest.raises(ValueError, match=r"batch for step 4"):
        train(MLPVelocity(2, **TINY), _PoisonedData(4, bad), steps=10, batch_size=16, device="cpu", progress=False,
              coupling="exact-ot", coupling_workers=2)


def test_a_fresh_run_refuses_a_directory_with_a_log(tmp_path):
    """A run stopped before its first checkpoint leaves log.jsonl only: a second fresh run must not append to
    it; resume=True starts over with a clean log."""
    (tmp_path / "log.jsonl").write_text('{"step": 100, "loss": 1.0}\n')
    kw = dict(steps=4, batch_size=8, device="cpu", progress=False, log_every=2, out_dir=tmp_path)
    with pytest.raises(FileExistsError, match="log.jsonl"):
        train(MLPVelocity(2, **TINY), torch.randn(20, 2), **kw)
    train(MLPVelocity(2, **TINY), torch.randn(20, 2), resume=True, **kw)
    assert [json.loads(s)["step"] for s in (tmp_path / "log.jsonl").read_text().splitlines()] == [2, 4]


def test_stale_temporary_checkpoint_folders_are_removed(tmp_path):
    from steerflow.training import remove_stale

    kw = _resume_kwargs(tmp_path)
    train(_cond_model(), _LabelledData(), stop_at=8, **kw)
    (tmp_path / ".tmp-step-abc123").mkdir()  # a checkpoint write killed before its rename
    (tmp_path / ".latest.json.xyz.tmp").write_text("{")
    # a rewrite of step 8 killed between moving the old folder aside and renaming the new one into place
    os.rename(tmp_path / "step-00000008", tmp_path / ".old-step-00000008-4242")
    assert sorted(p.name for p in remove_stale(tmp_path)) == [".latest.json.xyz.tmp", ".tmp-step-abc123"]
    assert (tmp_path / "step-00000008").is_dir()  # moved back: latest.json points at it
    (tmp_path / ".tmp-step-def456").mkdir()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 12, "loss": 0.5}\n{"step": 16, "lo')  # lines past the checkpoint, the last one cut by a kill
    resumed = train(_cond_model(), _LabelledData(), resume=True, **kw)  # train() removes them itself
    assert resumed.step == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "log.jsonl", "step-00000024"]
    steps = [json.loads(s)["step"] for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16, 20, 24]


def test_train_options_and_errors(tmp_path):
    torch.manual_seed(0)
    calls = []

    def reverse_coupling(x_0, x_1, labels=None, generator=None):
        calls.append(labels is not None)
        return x_0.flip(0), x_1

    data = (torch.randn(100, 2), torch.randint(2, (100,)))
    res = train(MLPVelocity(2, n_classes=2, **TINY), data, steps=6, batch_size=8, device="cpu", progress=False,
                coupling=reverse_coupling, source=lambda n, g: torch.rand(n, 2, generator=g), path="cosine",
                max_seconds=0.0, log_every=2)
    assert calls and all(calls)
    assert res.stopped_early and res.step == 2
    with pytest.raises(ValueError, match="CUDA only"):
        train(MLPVelocity(2, **TINY), torch.randn(10, 2), steps=2, batch_size=4, device="cpu", amp=True)
    with pytest.raises(ValueError, match="unknown schedule"):
        train(MLPVelocity(2, **TINY), torch.randn(10, 2), steps=2, batch_size=4, lr_schedule="linear")
    with pytest.raises(TypeError, match="data must be"):
        train(MLPVelocity(2, **TINY), [1, 2, 3], steps=2, batch_size=4, device="cpu", progress=False)


# --- checkpoints -------------------------------------------------------------------------------------
def _saved(tmp_path):
    torch.manual_seed(0)
    m = MLPVelocity(2, **TINY)
    ema = EMA(m, 0.5)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(4, 2), torch.rand(4)).square().mean().backward()
    opt.step()
    ema.update()
    d = save_checkpoint(tmp_path, m, ema=ema, optimizer=opt, config={"note": "x"}, step=3,
                        extra={"tag": "a", "vec": torch.arange(3.0)})
    return m, ema, d


def test_checkpoint_round_trip(tmp_path):
    m, ema, d = _saved(tmp_path)
    ck = load_checkpoint(tmp_path)
    assert ck.step == 3 and ck.path == d and ck.config["training"] == {"note": "x"}
    assert ck.config["model"] == {"name": "mlp", "config": m.config}
    for a, b in zip(ck.model.parameters(), m.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ck.ema_model.parameters(), ema.module.parameters()):
        assert torch.equal(a, b)
    assert ck.extra["tag"] == "a" and torch.equal(ck.extra["vec"], torch.arange(3.0))
    # a second save replaces the first and keeps only the newest directory
    save_checkpoint(tmp_path, m, config={}, step=4)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-00000004"]
    assert load_checkpoint(tmp_path).step == 4


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="latest.json"):
        load_checkpoint(tmp_path)
    _, _, d = _saved(tmp_path)
    with pytest.raises(ValueError, match=r"config differs at keys \['hidden'\]"):
        load_checkpoint(tmp_path, expect_config={"hidden": 64, "dim": 2})
    with pytest.raises(ValueError, match="holds model 'mlp', expected 'unet'"):
        load_checkpoint(tmp_path, model_name="unet")
    # config edited after the fact: the weights no longer fit, and the keys are named
    meta = json.loads((d / "config.json").read_text())
    meta["model"]["config"]["hidden"] = 16
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"shape mismatch at .*net\.0\.weight: stored \(32, 18\) vs model \(16, 18\)"):
        load_checkpoint(tmp_path)
    meta["model"]["config"]["hidden"] = 32
    (d / "config.json").write_text(json.dumps(meta))
    # truncated safetensors
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupt checkpoint file .*model.safetensors"):
        load_checkpoint(tmp_path)
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        load_checkpoint(tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt checkpoint file .*config.json"):
        load_checkpoint(d)
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "b", MLPVelocity(2, **TINY), config={"f": object()}, step=1)


def test_train_unet_on_labelled_images_and_reload(tmp_path):
    from steerflow.models import UNetVelocity

    torch.manual_seed(0)
    model = UNetVelocity(in_channels=1, base_channels=8, channel_mult=(1, 2), n_classes=3, image_size=8)
    imgs, labels = torch.randn(32, 1, 8, 8), torch.arange(32) % 3
    res = train(model, (imgs, labels), steps=4, batch_size=4, lr=1e-3, ema_decay=0.5, device="cpu",
                progress=False, out_dir=tmp_path, log_every=2)
    assert res.losses.shape == (4,) and torch.isfinite(res.losses).all()
    ck = load_checkpoint(tmp_path, expect_config={"channel_mult": (1, 2), "image_size": 8})
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 2])
    res.model.eval()
    torch.testing.assert_close(ck.model(x, t, y), res.model(x, t, y), rtol=0, atol=0)
    torch.testing.assert_close(ck.ema_model(x, t), res.ema(x, t), rtol=0, atol=0)
    logged = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [d["step"] for d in logged] == [2, 4] and set(logged[0]) >= {"loss", "lr", "it_s", "time"}
