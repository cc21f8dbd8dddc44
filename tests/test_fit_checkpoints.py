"""Checkpoints of the straightening fits (``FitCheckpoints``): a reflow or a distillation stopped after any of
its checkpoints and resumed gives the weights, losses, pairs and log of the uninterrupted run, bit for bit —
inside a fit, at the end of one, across reflow's rounds and distillation's warm-start/matching phases, with
the matching loss's memory of data batches."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from steerflow.models import MLPVelocity
from steerflow.straighten import distill, reflow
from steerflow.straighten._fit import FitCheckpoints
from steerflow.training import load_checkpoint

TINY = dict(hidden=16, depth=2, time_embed_dim=8)
WALL_CLOCK = ("it_s", "time")  # the log's timing fields: the only ones that may differ between runs


def _teacher():
    torch.manual_seed(0)
    return MLPVelocity(2, **TINY).eval()


def _source(n, generator=None):
    return torch.randn(n, 2, generator=generator)


def _log(d):
    return [{k: v for k, v in json.loads(ln).items() if k not in WALL_CLOCK}
            for ln in (d / "log.jsonl").read_text().splitlines()]


def _killed_after(full, step, dst):
    """``dst``: what a run into ``full`` killed after writing its checkpoint at ``step`` leaves behind (that
    checkpoint, the log up to the next line, a half-written checkpoint folder)."""
    dst.mkdir()
    name = f"step-{step:08d}"
    shutil.copytree(full / name, dst / name)
    (dst / "latest.json").write_text(json.dumps({"step": step, "checkpoint": name}))
    lines = (full / "log.jsonl").read_text().splitlines()
    kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
    (dst / "log.jsonl").write_text("\n".join(lines[:len(kept) + 1]) + "\n")
    (dst / ".tmp-step-killed").mkdir()
    (dst / ".tmp-step-killed" / "model.safetensors").write_bytes(b"partial")


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _reflow(out, resume=False):
    ck = FitCheckpoints(out, {"run": "reflow"}, every=4, resume=resume, log_every=3, keep=100)
    return reflow(_teacher(), source=_source, n_pairs=40, steps=3, method="euler", train_steps=6, batch_size=8,
                  iterations=2, seed=1, checkpoints=ck)


def test_reflow_resumes_bit_exactly_from_every_checkpoint(tmp_path):
    full = _reflow(tmp_path / "full")
    steps = sorted(int(p.name[5:]) for p in (tmp_path / "full").glob("step-*"))
    assert steps == [4, 6, 8, 12]  # every 4 global steps, and the end of each round of 6
    assert load_checkpoint(tmp_path / "full").step == 12
    for step in steps:
        d = tmp_path / f"killed{step}"
        _killed_after(tmp_path / "full", step, d)
        res = _reflow(d, resume=True)
        assert _same_weights(res.model, full.model), step
        assert res.losses == full.losses, step
        assert torch.equal(res.pairs.x_0, full.pairs.x_0) and torch.equal(res.pairs.x_1, full.pairs.x_1), step
        assert _log(d) == _log(tmp_path / "full"), step  # cut back to the checkpoint, then the same lines
        assert not any(p.name.startswith(".tmp-step-") for p in d.iterdir()), step


def _distill(out, resume=False):
    """The CLI's recipe: regression warm start (fit 0), then matching with a memory of data batches (fit 1)."""
    ck = FitCheckpoints(out, {"run": "distill"}, every=3, resume=resume, log_every=2, keep=100)
    torch.manual_seed(5)
    student = MLPVelocity(2, **TINY)
    data = torch.randn(500, 2, generator=torch.Generator().manual_seed(9)) + 3.0
    warm_ck, main_ck = ck.at(0, 0), ck.at(1, 4)
    pairs = None
    if not warm_ck.finished_before():
        warm = distill(_teacher(), source=_source, n_pairs=48, steps=3, method="euler", train_steps=4, batch_size=8,
                       seed=2, model=student, checkpoints=warm_ck)
        pairs, student = warm.pairs, warm.model
    return distill(_teacher(), pairs=pairs, source=_source, n_pairs=48, steps=3, method="euler", train_steps=7,
                   batch_size=32, seed=3, model=student, match="ot-energy-full", data=data, match_batch_size=8,
                   match_memory=2, regression_weight=0.5, sliced_weight=0.3, sliced_memory=3,
                   checkpoints=main_ck)


def test_distill_resumes_bit_exactly_from_every_checkpoint(tmp_path):
    full = _distill(tmp_path / "full")
    steps = sorted(int(p.name[5:]) for p in (tmp_path / "full").glob("step-*"))
    assert steps == [3, 4, 6, 9, 11]
    for step in steps:
        d = tmp_path / f"killed{step}"
        _killed_after(tmp_path / "full", step, d)
        res = _distill(d, resume=True)
        assert _same_weights(res.model, full.model), step
        assert res.fit.losses == full.fit.losses, step
        assert torch.equal(res.pairs.x_1, full.pairs.x_1), step
        assert _log(d) == _log(tmp_path / "full"), step


def test_fit_checkpoints_refuse_a_used_directory_and_other_settings(tmp_path):
    _reflow(tmp_path / "run")
    with pytest.raises(FileExistsError, match="latest.json"):
        _reflow(tmp_path / "run")
    ck = FitCheckpoints(tmp_path / "run", {"run": "other"}, resume=True)
    with pytest.raises(ValueError, match="settings differ"):
        reflow(_teacher(), source=_source, n_pairs=40, steps=3, method="euler", train_steps=6, batch_size=8,
               iterations=2, seed=1, checkpoints=ck)
    # a run killed before its first checkpoint left a log only: refused fresh, started over with resume
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "log.jsonl").write_text('{"step": 3, "loss": 1.0}\n')
    with pytest.raises(FileExistsError, match="log.jsonl"):
        _reflow(tmp_path / "early")
    res = _reflow(tmp_path / "early", resume=True)
    assert _log(tmp_path / "early") == _log(tmp_path / "run") and len(res.losses) == 12
