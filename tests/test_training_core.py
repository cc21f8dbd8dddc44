"""The one training core: ``train()`` on fixed pairs and batch callables (checked bit for bit against a bare
loop), ``TrainConfig``, the ``lr_schedule`` rename, custom losses, the LR floor, callbacks and TensorBoard, and
the one ``anything -> sampler(n, generator)`` adapter."""
from __future__ import annotations

import json
import math

import pytest
import torch

from steerflow.models import MLPVelocity
from steerflow.training import (Batch, Callback, FlowMatchingLoss, TensorBoardLogger, TrainConfig, as_sampler,
                                flow_matching_loss, train)
from steerflow.training.loop import _time_seed
from steerflow.training.pairs import seed_from

TINY = dict(hidden=16, depth=2, time_embed_dim=8)


def _model():
    torch.manual_seed(0)
    return MLPVelocity(2, **TINY)


def _bare_loop(model, draw, steps, lr, seed):
    """Flow matching by hand: ``draw(g)`` gives (x_0, x_1); t from the loop's own generator; AdamW, constant LR."""
    g = torch.Generator().manual_seed(seed)
    g_t = torch.Generator().manual_seed(_time_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        x_0, x_1 = draw(g)
        t = torch.rand(x_0.shape[0], generator=g_t)
        x_t = t[:, None] * x_1 + (1 - t[:, None]) * x_0
        loss = ((model(x_t, t) - (x_1 - x_0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_fixed_pairs_match_a_bare_loop_bit_for_bit():
    x_0, x_1 = torch.randn(300, 2), torch.randn(300, 2) + 2.0
    m_ref, m = _model(), _model()
    res = train(m, (x_0, x_1), steps=20, batch_size=16, lr=1e-3, lr_schedule="constant", device="cpu",
                progress=False, seed=4, log_every=5)

    def draw(g):
        idx = torch.randint(300, (16,), generator=g)
        return x_0[idx], x_1[idx]

    assert torch.equal(res.losses, _bare_loop(m_ref, draw, 20, 1e-3, 4))
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m_ref.parameters()))


def test_pairs_object_and_tuple_are_the_same_data():
    from steerflow.straighten import Pairs

    x_0, x_1 = torch.randn(50, 2), torch.randn(50, 2)
    kw = dict(steps=6, batch_size=8, device="cpu", progress=False, seed=1)
    a = train(_model(), Pairs(x_0, x_1), **kw)
    b = train(_model(), (x_0, x_1), **kw)
    assert torch.equal(a.losses, b.losses)


def test_batch_callable_matches_a_bare_loop_bit_for_bit():
    def paired(n, generator):
        x_0 = torch.randn(n, 2, generator=generator)
        return x_0, 0.5 * x_0 + 1.0  # a paired source: x_1 is a function of x_0

    m_ref, m = _model(), _model()
    res = train(m, paired, steps=15, batch_size=12, lr=2e-3, lr_schedule="constant", device="cpu", progress=False,
                seed=9, log_every=4)
    assert torch.equal(res.losses, _bare_loop(m_ref, lambda g: paired(12, g), 15, 2e-3, 9))


def test_config_and_keywords_give_the_same_run_and_keywords_override():
    data = torch.randn(200, 2)
    kw = dict(device="cpu", progress=False)
    cfg = TrainConfig(steps=12, batch_size=16, lr=5e-3, warmup=3, ema_decay=0.9, grad_clip=0.5, seed=2, log_every=4)
    a = train(_model(), data, config=cfg, **kw)
    b = train(_model(), data, steps=12, batch_size=16, lr=5e-3, warmup=3, ema_decay=0.9, grad_clip=0.5, seed=2,
              log_every=4, **kw)
    assert torch.equal(a.losses, b.losses)
    c = train(_model(), data, config=TrainConfig(steps=12, batch_size=16, lr=5e-3, warmup=3, ema_decay=0.9,
                                                 grad_clip=0.5, seed=0, log_every=4), seed=2, **kw)
    assert torch.equal(c.losses, a.losses)  # the keyword replaced the config's seed
    with pytest.raises(TypeError, match="steps= and batch_size="):
        train(_model(), data, **kw)
    with pytest.raises(TypeError, match="TrainConfig"):
        train(_model(), data, config={"steps": 3}, **kw)


def test_schedule_is_a_deprecated_alias_of_lr_schedule():
    data = torch.randn(100, 2)
    kw = dict(steps=8, batch_size=8, warmup=2, device="cpu", progress=False, seed=3)
    new = train(_model(), data, lr_schedule="constant", **kw)
    with pytest.warns(DeprecationWarning, match="lr_schedule"):
        old = train(_model(), data, schedule="constant", **kw)
    assert torch.equal(new.losses, old.losses)
    with pytest.raises(ValueError, match="disagree"), pytest.warns(DeprecationWarning):
        train(_model(), data, schedule="constant", lr_schedule="cosine", **kw)


def test_lr_at_every_step_follows_warmup_then_cosine_down_to_the_floor():
    records = []
    steps, warmup, lr, floor = 20, 4, 1e-2, 0.1
    train(_model(), torch.randn(100, 2), steps=steps, batch_size=8, lr=lr, warmup=warmup, lr_floor=floor,
          device="cpu", progress=False, log_every=1, callbacks=records.append)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        k = r["step"] - 1  # the 0-based update the record describes
        if k < warmup:
            want = lr * (k + 1) / warmup
        else:
            p = (k - warmup) / (steps - warmup)
            want = lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))
        assert r["lr"] == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="lr_floor"):
        train(_model(), torch.randn(10, 2), steps=2, batch_size=4, lr_floor=1.5, device="cpu", progress=False)


def test_sum_reduction_is_d_times_the_mean():
    torch.manual_seed(0)
    model = MLPVelocity(3, **TINY)
    batch = Batch(torch.randn(10, 3), torch.randn(10, 3))
    mean = FlowMatchingLoss("linear")(model, batch, torch.Generator().manual_seed(1))
    total = FlowMatchingLoss("linear", reduction="sum")(model, batch, torch.Generator().manual_seed(1))
    torch.testing.assert_close(total, 3 * mean, rtol=1e-6, atol=0)
    t = torch.rand(10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mean, flow_matching_loss(model, batch.x_0, batch.x_1, t, path="linear"))
    with pytest.raises(ValueError, match="reduction"):
        FlowMatchingLoss(reduction="max")


def test_a_custom_loss_gets_the_batch_object_and_the_loops_generator():
    seen = []

    class Shift:
        """A batch that is not a tuple: the loss reads it."""

        def __init__(self, x):
            self.x = x

    def loss(model, batch, generator):
        seen.append((type(batch).__name__, generator.device.type))
        t = torch.rand(batch.x.shape[0], generator=generator)
        return model(batch.x, t).square().mean()

    res = train(_model(), lambda n, g: Shift(torch.randn(n, 2, generator=g)), loss=loss, steps=4, batch_size=8,
                device="cpu", progress=False)
    assert res.step == 4 and seen == [("Shift", "cpu")] * 4
    with pytest.raises(ValueError, match="loss object"):
        train(_model(), torch.randn(10, 2), loss=loss, path="cosine", steps=2, batch_size=4, device="cpu",
              progress=False)
    with pytest.raises(TypeError, match="coupling re-pairs"):
        train(_model(), lambda n, g: Shift(torch.randn(n, 2)), loss=loss, coupling="exact-ot", steps=2,
              batch_size=4, device="cpu", progress=False)


def test_pairs_and_batch_callables_refuse_a_source_and_bad_pairs():
    kw = dict(steps=2, batch_size=4, device="cpu", progress=False)
    with pytest.raises(ValueError, match="source="):
        train(_model(), (torch.randn(10, 2), torch.randn(10, 2)), source=lambda n, g: torch.randn(n, 2), **kw)
    with pytest.raises(ValueError, match="source="):
        train(_model(), lambda n, g: (torch.randn(n, 2), torch.randn(n, 2)), source=lambda n, g: torch.randn(n, 2),
              **kw)
    bad = torch.randn(10, 2)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="sample 3"):
        train(_model(), (torch.randn(10, 2), bad), **kw)
    with pytest.raises(ValueError, match="non-finite"):
        train(_model(), lambda n, g: (torch.full((n, 2), float("inf")), torch.randn(n, 2)), **kw)


def test_callbacks_get_the_log_records_and_the_result(tmp_path):
    class Recorder(Callback):
        def __init__(self):
            self.records, self.result = [], None

        def on_log(self, record):
            self.records.append(record)

        def on_end(self, result):
            self.result = result

    rec, plain = Recorder(), []
    res = train(_model(), torch.randn(100, 2), steps=9, batch_size=8, device="cpu", progress=False, log_every=4,
                out_dir=tmp_path, callbacks=[rec, plain.append])
    logged = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rec.records == logged == plain and [r["step"] for r in logged] == [4, 8, 9]
    assert rec.result is res
    torch.testing.assert_close(torch.tensor([r["loss"] for r in logged]),
                               torch.stack([res.losses[:4].mean(), res.losses[4:8].mean(), res.losses[8:].mean()]))
    with pytest.raises(TypeError, match="callback"):
        train(_model(), torch.randn(10, 2), steps=2, batch_size=4, device="cpu", progress=False, callbacks=[3])


def test_tensorboard_logger_writes_scalars_through_its_writer(tmp_path):
    class FakeWriter:
        def __init__(self):
            self.scalars, self.closed, self.flushes = [], False, 0

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            self.flushes += 1

        def close(self):
            self.closed = True

    writer = FakeWriter()
    res = train(_model(), torch.randn(100, 2), steps=6, batch_size=8, device="cpu", progress=False, log_every=3,
                callbacks=TensorBoardLogger(tmp_path, writer=writer))
    losses = [v for tag, v, _ in writer.scalars if tag == "train/loss"]
    assert [s for tag, _, s in writer.scalars if tag == "train/loss"] == [3, 6]
    torch.testing.assert_close(torch.tensor(losses), torch.stack([res.losses[:3].mean(), res.losses[3:].mean()]))
    assert {tag for tag, _, _ in writer.scalars} == {"train/loss", "train/lr", "train/it_s"}
    assert writer.closed and writer.flushes == 2


def test_tensorboard_logger_without_tensorboard_names_the_install(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            TensorBoardLogger(tmp_path)
    else:
        logger = TensorBoardLogger(tmp_path)
        logger.on_log({"step": 1, "loss": 0.5, "lr": 1e-3, "it_s": 10.0})
        logger.on_end(None)
        assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_as_sampler_accepts_every_kind_of_source():
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    table = torch.arange(10.0)[:, None].repeat(1, 2)
    rows = as_sampler(table)(40, g(0))
    assert rows.shape == (40, 2) and set(rows[:, 0].tolist()) <= set(range(10))
    assert torch.equal(as_sampler("normal", (3,))(5, g(1)), torch.randn(5, 3, generator=g(1)))
    assert as_sampler("moons")(6, g(2)).shape == (6, 2)
    labelled = lambda n, generator: (torch.ones(n, 2), torch.zeros(n))  # noqa: E731
    assert torch.equal(as_sampler(labelled)(4, g(3)), torch.ones(4, 2))
    assert as_sampler(labelled, labels=True) is labelled
    with pytest.raises(ValueError, match="shape"):
        as_sampler("normal")
    with pytest.raises(TypeError, match="expected a name"):
        as_sampler(3.0)
    with pytest.raises(TypeError, match="must return a tensor"):
        as_sampler(lambda n, generator: "x")(2, g(0))


def test_seed_from_a_generator_is_reproducible_and_advances_it():
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert seed_from(a) == seed_from(b)
    assert seed_from(a) != seed_from(torch.Generator().manual_seed(5))  # a advanced by one draw


def test_population_batches_pair_points_within_one_population():
    from steerflow.transport.population import population_batches

    P, n, d, k, m = 5, 20, 2, 3, 4
    g = torch.Generator().manual_seed(0)
    sources = torch.randn(P, n, d, generator=g)
    targets = torch.randn(P, n, d, generator=g) + 10.0
    conditions = torch.arange(P, dtype=torch.float32)[:, None]
    draw = population_batches(sources, targets, conditions, populations_per_batch=k, points_per_population=m)
    batch = draw(k * m, torch.Generator().manual_seed(1))
    assert batch.x_0.shape == batch.x_1.shape == (k * m, d) and batch.cond.shape == (k, 1)
    pops = batch.cond[:, 0].long()
    assert len(set(pops.tolist())) == k  # drawn without replacement
    for j, p in enumerate(pops.tolist()):
        block = slice(j * m, (j + 1) * m)
        assert all((sources[p] == row).all(-1).any() for row in batch.x_0[block])
        assert all((targets[p] == row).all(-1).any() for row in batch.x_1[block])
    with pytest.raises(ValueError, match="coupling"):
        population_batches(sources, targets, coupling="sinkhorn")


def test_transport_trainers_run_on_train_and_are_reproducible():
    from steerflow.models.potential import PotentialMLP
    from steerflow.transport import fit_c_rectified

    x_0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    x_1 = x_0 + 1.0
    logs = []
    for _ in range(2):
        torch.manual_seed(0)
        log = []
        fit_c_rectified(PotentialMLP(2, hidden=8, depth=1), x_0, x_1, steps=5, batch_size=16,
                        generator=torch.Generator().manual_seed(4), log=log)
        logs.append(log)
    assert len(logs[0]) == 5 and logs[0] == logs[1]
