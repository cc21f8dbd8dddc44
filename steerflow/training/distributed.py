"""Distributed data parallel plumbing: process group, rank info, collective helpers.

Launched with ``torchrun`` (``python -m torch.distributed.run --nproc_per_node N script.py``), each
process sees ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` joins the group (``gloo`` on
CPU, ``nccl`` on CUDA). Gradients are averaged by ``DistributedDataParallel``; each rank draws its own
batch from a generator seeded with ``seed + rank``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """``rank``/``world_size``/``local_rank`` of this process; ``enabled`` when more than a local run;
    ``owns_group`` when :func:`setup` created the process group (and :func:`teardown` destroys it)."""

    enabled: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_requests_distributed() -> bool:
    """True when torchrun-style variables describe a multi-process run (``WORLD_SIZE > 1``)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(distributed: bool | None, device_type: str) -> DistInfo:
    """Join (or reuse) the default process group. ``distributed=None`` auto-detects torchrun's variables."""
    want = env_requests_distributed() if distributed is None else bool(distributed)
    if not want:
        return DistInfo(enabled=False)
    if not dist.is_available():
        raise RuntimeError("distributed training requested but torch.distributed is not available")
    owns = False
    if not dist.is_initialized():
        for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ValueError(f"distributed=True needs the torchrun environment variable {var}; launch with "
                                 "`python -m torch.distributed.run --nproc_per_node N script.py`")
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        owns = True
    return DistInfo(enabled=True, rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), owns_group=owns)


def teardown(info: DistInfo) -> None:
    if info.enabled and info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def collective_device(info: DistInfo, device: torch.device) -> torch.device:
    """NCCL collectives need CUDA tensors; gloo takes CPU tensors."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")
