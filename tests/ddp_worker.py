"""Helper for tests/test_ddp.py, launched by ``torch.distributed.run`` with 2 CPU processes (gloo).

Usage: ``python -m torch.distributed.run --nproc_per_node 2 --standalone tests/ddp_worker.py OUT_DIR [STOP_AT
[resume]]``. Each rank trains the same model on its own batches (DDP averages gradients) into ``OUT_DIR/run``
(:data:`SETTINGS`, stopping after ``STOP_AT`` steps when given, continuing the checkpoint there with
``resume``), then writes its final weights to ``OUT_DIR/rank<r>.safetensors`` for the test to compare.
"""
import os
import sys

import torch
from safetensors.torch import save_file

from steerflow.models import MLPVelocity
from steerflow.training import train

SETTINGS = dict(steps=6, batch_size=16, lr=1e-2, ema_decay=0.9, device="cpu", progress=False, log_every=3,
                ckpt_every=3, seed=5)


def model_and_data(rank: int):
    torch.manual_seed(100 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
    model = MLPVelocity(2, hidden=16, depth=2, time_embed_dim=8, n_classes=2, label_dropout=0.2)
    data = (torch.randn(256, 2, generator=torch.Generator().manual_seed(0)), torch.arange(256) % 2)
    return model, data


def main() -> None:
    out = sys.argv[1]
    stop_at = int(sys.argv[2]) if len(sys.argv) > 2 else None
    resume = len(sys.argv) > 3 and sys.argv[3] == "resume"
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model, data = model_and_data(rank)
    res = train(model, data, out_dir=os.path.join(out, "run"), stop_at=stop_at, resume=resume, **SETTINGS)
    tensors = {f"model.{k}": v for k, v in res.model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in res.ema.state_dict().items()})
    tensors["losses"] = res.losses
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
