"""Distributed data parallel on CPU (gloo): 2 processes via torch.distributed.run end with identical
weights, and rank 0 wrote a checkpoint that loads; a run resumes on another number of processes; the
command line prints its summary once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddp_worker import SETTINGS, model_and_data
from steerflow.training import load_checkpoint, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
ROOT = Path(__file__).resolve().parents[1]


def _torchrun(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEERFLOW_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _same_on_both_ranks(tmp_path):
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # identical weights, EMA and (rank-averaged) loss trace
    return r0


def test_ddp_two_cpu_ranks(tmp_path):
    _torchrun(Path(__file__).with_name("ddp_worker.py"), tmp_path)
    r0 = _same_on_both_ranks(tmp_path)
    assert r0["losses"].shape == (6,) and torch.isfinite(r0["losses"]).all()
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 6 and ckpt.config["training"]["world_size"] == 2
    for k, v in ckpt.model.state_dict().items():
        assert torch.equal(v, r0[f"model.{k}"]), k
    assert ckpt.extra["rng"].shape[0] == 2  # one RNG state per rank, for exact resume
    assert not torch.equal(ckpt.extra["rng"][0], ckpt.extra["rng"][1])  # per-rank seeds
    assert not any(p.name.startswith("rank") for p in (tmp_path / "run").iterdir())


def test_resume_on_another_number_of_processes(tmp_path):
    """1 process to step 2, 2 processes to step 4, 1 process to step 6: each resume continues the checkpoint
    (weights, optimiser, step, loss trace) and warns that the run is not bit-identical to an uninterrupted one."""
    run = tmp_path / "run"
    model, data = model_and_data(0)
    first = train(model, data, out_dir=run, stop_at=2, **SETTINGS)
    assert first.step == 2 and load_checkpoint(run).extra["rng"].shape[0] == 1

    proc = _torchrun(Path(__file__).with_name("ddp_worker.py"), tmp_path, 4, "resume")
    assert "written by 1 process(es)) on 2" in proc.stderr and "not bit-identical" in proc.stderr
    assert proc.stderr.count("not bit-identical") == 1  # rank 0 warns
    r0 = _same_on_both_ranks(tmp_path)
    ckpt = load_checkpoint(run)
    assert ckpt.step == 4 and ckpt.config["training"]["world_size"] == 2
    assert torch.equal(r0["losses"][:2], first.losses)  # the trace continues the first run's
    assert ckpt.extra["rng"].shape[0] == 2 and not torch.equal(ckpt.extra["rng"][0], ckpt.extra["rng"][1])

    with pytest.warns(UserWarning, match=r"written by 2 process\(es\)\) on 1.*not bit-identical"):
        last = train(model_and_data(0)[0], data, out_dir=run, resume=True, **SETTINGS)
    assert last.step == 6 and not last.stopped_early
    assert torch.equal(last.losses[:4], r0["losses"]) and torch.isfinite(last.losses).all()
    ckpt = load_checkpoint(run)
    assert ckpt.config["training"]["world_size"] == 1 and ckpt.extra["rng"].shape[0] == 1
    lines = [json.loads(s)["step"] for s in (run / "log.jsonl").read_text().splitlines()]
    assert lines == [2, 3, 4, 6]  # stop_at and checkpoint/log steps, no duplicates


def test_cli_under_torchrun_prints_its_summary_on_rank_0_only(tmp_path):
    proc = _torchrun("-m", "steerflow", "train", "--data", "moons", "--steps", 4, "--batch", 16, "--model", "mlp",
                     "--hidden", 16, "--ckpt-every", 2, "--quiet", "--out", tmp_path / "run", cwd=tmp_path)
    assert (proc.stdout + proc.stderr).count("trained MLPVelocity for 4 steps") == 1
    assert load_checkpoint(tmp_path / "run").config["training"]["world_size"] == 2
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data"] == "moons"
