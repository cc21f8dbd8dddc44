"""Distributed data parallel on CPU (gloo): 2 processes via torch.distributed.run end with identical
weights, and rank 0 wrote a checkpoint that loads."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steerflow.training import load_checkpoint


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_cpu_ranks(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(worker), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # identical weights, EMA and (rank-averaged) loss trace
    assert r0["losses"].shape == (6,) and torch.isfinite(r0["losses"]).all()
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 6 and ckpt.config["training"]["world_size"] == 2
    for k, v in ckpt.model.state_dict().items():
        assert torch.equal(v, r0[f"model.{k}"]), k
    assert ckpt.extra["rng"].shape[0] == 2  # one RNG state per rank, for exact resume
    assert not torch.equal(ckpt.extra["rng"][0], ckpt.extra["rng"][1])  # per-rank seeds
    assert not any(p.name.startswith("rank") for p in (tmp_path / "run").iterdir())
