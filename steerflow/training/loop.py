"""``train``: the flow-matching training loop (AdamW, warm-up + cosine LR, EMA, clipping, bf16 autocast,
exact resume, DDP).

One update (Lipman et al. 2023, Algorithm 1; Liu et al. 2022; Tong et al. 2024 for couplings):

    x_1 ~ data,  x_0 ~ source,  (x_0, x_1) ← coupling(x_0, x_1),  t ~ p(t)
    L = flow_matching_loss(v_θ, x_0, x_1, t),  θ ← AdamW(θ, ∇_θ L),  θ̄ ← EMA(θ̄, θ)

Every random draw comes from generators seeded by ``seed`` (plus the rank) and from torch's global
RNG (label dropout), which is seeded inside a forked RNG scope so the caller's state is untouched.
All of them are checkpointed, so a run stopped at step ``k`` and resumed gives the same weights and
loss trace, bit for bit, as an uninterrupted run on the same device and number of processes (on another
number of processes it resumes correctly, not bit for bit; see ``resume``).
"""
from __future__ import annotations

import json
import os
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..models import model_name, unwrap_model
from ..paths import get_path
from . import distributed as ddp
from .checkpoint import LATEST, LOG, cut_log, earlier_run, load_state, read_config, remove_stale, save_checkpoint
from .ema import EMA
from .loss import LR_SCHEDULES, flow_matching_loss, get_time_sampler, lr_factor
from .pairs import PairStream

# Training hyper-parameters that change the numbers: resuming with a different value cannot be exact.
# The world size is not among them: a run may be resumed on another number of processes, not bit-exactly
# (see ``train``'s ``resume``).
_RESUME_KEYS = ("steps", "batch_size", "lr", "weight_decay", "betas", "warmup", "schedule", "ema_decay",
                "grad_clip", "amp", "seed", "path", "time_sampler")


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained network (unwrapped from DDP), on the training device, in train mode.
        ema: the EMA network (eval mode) or None.
        losses: per-step losses (step,) float32 on CPU, from step 1 (including steps before a resume);
            in DDP the mean over ranks.
        step: completed optimiser steps.
        seconds: wall time of this call's loop.
        out_dir: the training directory, or None.
        stopped_early: True when ``max_seconds`` or ``stop_at`` ended the run before ``steps``.
    """

    model: nn.Module
    ema: nn.Module | None
    losses: Tensor
    step: int
    seconds: float
    out_dir: Path | None
    stopped_early: bool


def resolve_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
    """``"auto"`` picks ``cuda:<local_rank>`` when CUDA is available, else CPU."""
    if isinstance(device, str) and device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def _check_data_dtype(dtype: torch.dtype, what: str) -> None:
    """Real numbers only: bool and complex data are refused (integers are converted by the caller)."""
    if dtype == torch.bool or dtype.is_complex:
        raise TypeError(f"{what} has dtype {dtype}; expected real numbers (a floating-point tensor, or integers, "
                        "which are converted to the model's floating-point dtype)")


def _first_non_finite(x: Tensor) -> int | None:
    """The index of the first sample (row) of ``x`` holding NaN/inf, or None when all values are finite.

    A finite sum proves every value finite in one reduction (a NaN/inf makes the sum NaN/inf); only a
    non-finite sum (bad data, or finite values that overflow it) is looked at row by row."""
    if not x.is_floating_point() or bool(torch.isfinite(x.sum())):
        return None
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


class _Batches:
    """Draws ``(x_1, labels)`` from a tensor, a ``(tensor, labels)`` pair or an object with ``.sample``.

    Data must be real numbers: integer data is converted to the model's floating-point ``dtype`` (as
    floating-point data of another precision is), bool or complex data is a ``TypeError``. NaN/inf in the
    data is a ``ValueError`` naming the sample: a tensor is checked once, whole; a batch from ``.sample`` is
    checked as it is drawn when it arrives on the CPU (a cheap reduction, no device sync), and only the first
    batch when it arrives on an accelerator (a later bad batch then shows as a non-finite loss).
    """

    def __init__(self, data: Any, device: torch.device, dtype: torch.dtype, gen_host: torch.Generator,
                 gen_dev: torch.Generator) -> None:
        self.device, self.dtype, self.gen_host, self.gen_dev = device, dtype, gen_host, gen_dev
        self.x = self.labels = None
        self.obj = None
        self.step = 0  # the step the next batch is drawn for, minus one (batches are drawn in step order)
        if torch.is_tensor(data) or (isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0])):
            x, labels = (data, None) if torch.is_tensor(data) else data
            if x.ndim < 2 or x.shape[0] < 1:
                raise ValueError(f"data tensor must have shape (N, *d) with N >= 1, got {tuple(x.shape)}")
            if labels is not None and (not torch.is_tensor(labels) or labels.shape != (x.shape[0],)):
                raise ValueError(f"labels must be a tensor of shape ({x.shape[0]},), got "
                                 f"{tuple(getattr(labels, 'shape', ()))}")
            _check_data_dtype(x.dtype, "the data tensor")
            i = _first_non_finite(x)
            if i is not None:
                n_bad = int((~torch.isfinite(x)).sum())
                raise ValueError(f"the data tensor holds {n_bad} non-finite value{'s' * (n_bad != 1)} (NaN/inf), "
                                 f"the first in sample {i} of {x.shape[0]}; flow matching needs finite data")
            self.x = x.to(device=device, dtype=dtype)
            self.labels = None if labels is None else labels.to(device)
        elif hasattr(data, "sample") and callable(data.sample):
            self.obj = data
        else:
            raise TypeError("data must be a tensor (N, *d), a (tensor, labels) pair, or an object with "
                            f".sample(n, generator); got {type(data).__name__}")
        self.first = True

    def __call__(self, n: int) -> tuple[Tensor, Tensor | None]:
        self.step += 1
        if self.x is not None:
            idx = torch.randint(self.x.shape[0], (n,), generator=self.gen_dev, device=self.device)
            return self.x[idx], (None if self.labels is None else self.labels[idx])
        out = self.obj.sample(n, self.gen_host)
        x, labels = (out if isinstance(out, (tuple, list)) else (out, None))
        if not torch.is_tensor(x) or x.shape[0] != n:
            raise ValueError(f"data.sample({n}, generator) must return a tensor (n, *d) or (x, labels); got "
                             f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
        _check_data_dtype(x.dtype, f"data.sample({n}, generator)'s batch")
        if self.first or x.device.type == "cpu":
            i = _first_non_finite(x)
            if i is not None:
                raise ValueError(f"data.sample({n}, generator) returned non-finite values (NaN/inf) in sample {i} "
                                 f"of the batch for step {self.step}; flow matching needs finite data")
        self.first = False
        x = x.to(self.device, dtype=self.dtype, non_blocking=True)
        return x, (None if labels is None else labels.to(self.device, non_blocking=True))


def _describe(obj: Any) -> Any:
    """A stable JSON description of a setting: plain values as they are, functions by qualified name."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    text = repr(obj)
    return type(obj).__qualname__ if " at 0x" in text else text


def _time_seed(seed: int) -> int:
    """Seed of the generator for ``t`` (kept apart from the pair generators, see ``pairs.py``)."""
    return (seed * 1_000_003 + 0x5EED) % 2**63


def _joining_seed(seed: int, rank: int, step: int) -> int:
    """Seed of a rank that joins a resumed run (its rank was not in the checkpoint's world): apart from the
    ``seed + rank`` streams of a fresh run, so it does not replay batches another rank drew before."""
    return ((seed + rank) * 1_000_003 + (step + 1) * 7_919 + 0xC0FFEE) % 2**63


def _rng_states(pair_states: list[Tensor], gen_time: torch.Generator, device: torch.device) -> list[Tensor]:
    """Layout: pair generator(s) (host[, device]; :meth:`PairStream.resume_states`), torch's global CPU RNG,
    the t generator[, CUDA global]."""
    states = [*pair_states, torch.get_rng_state(), gen_time.get_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_rng_states(states: list[Tensor], gen_host: torch.Generator, gen_dev: torch.Generator,
                    gen_time: torch.Generator, device: torch.device) -> None:
    expected = 3 + (gen_dev is not gen_host) + (device.type == "cuda")
    if len(states) != expected:
        raise ValueError(f"the checkpoint's RNG state has {len(states)} parts, this run needs {expected} (a "
                         "checkpoint from an older steerflow or another device type); it cannot be resumed exactly")
    it = iter(states)
    gen_host.set_state(next(it))
    if gen_dev is not gen_host:
        gen_dev.set_state(next(it))
    torch.set_rng_state(next(it))
    gen_time.set_state(next(it))
    if device.type == "cuda":
        torch.cuda.set_rng_state(next(it), device)


def train(model: nn.Module, data: Any, *, source: Callable[[int, torch.Generator], Tensor] | None = None,
          coupling: Any = None, path: Any = "linear", steps: int, batch_size: int, lr: float = 1e-3,
          weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), warmup: int = 0,
          schedule: str = "cosine", ema_decay: float | None = None, grad_clip: float | None = None,
          amp: bool | str | None = None, device: str | torch.device = "auto", seed: int = 0,
          out_dir: str | os.PathLike | None = None, ckpt_every: int | None = None, log_every: int = 100,
          resume: bool = False, progress: bool = True, time_sampler: Any = "uniform",
          weighting: Callable[[Tensor], Tensor] | None = None, max_seconds: float | None = None,
          stop_at: int | None = None, distributed: bool | None = None, keep_checkpoints: int = 1,
          coupling_workers: int = 0) -> TrainResult:
    """Train ``model`` by conditional flow matching and return a :class:`TrainResult`.

    Args:
        model: ``v_θ(x, t[, cond])``; registered models (``steerflow.models``) can be rebuilt from the
            checkpoint by :func:`~steerflow.training.load_checkpoint`.
        data: a tensor (N, *d) (batches drawn uniformly with replacement on the device), a
            ``(tensor, labels)`` pair, or an object with ``.sample(n, generator) -> x_1 | (x_1, labels)``
            (called with a CPU generator; labels are passed to the model as ``cond``).
        source: ``source(n, generator) -> x_0`` (CPU generator); default ``N(0, I)`` shaped like ``x_1``.
        coupling: ``coupling(x_0, x_1, labels=, generator=) -> (x_0, x_1)`` re-pairing the batch (it
            must keep ``x_1``'s order when there are labels), or a name for
            ``steerflow.couplings.get_coupling``.
        path: a path name for :func:`steerflow.paths.get_path` or any object with ``sample``.
        steps: total optimiser steps of the run (the LR schedule spans them).
        batch_size: samples per step (per rank under DDP).
        lr, weight_decay, betas: AdamW (Loshchilov & Hutter 2019).
        warmup: linear LR warm-up steps; schedule: ``"cosine"`` (decay to 0 at ``steps``) or ``"constant"``.
        ema_decay: keep an EMA of the weights with this decay (None: no EMA).
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        amp: ``True``/``"bf16"`` for bfloat16 autocast (CUDA only); None/False for full precision.
        device: ``"auto"`` (CUDA if available), or a device.
        seed: seeds the training generators (``seed + rank``) and, inside a forked RNG scope, torch's
            global RNG (label dropout). Same seed, same device → bit-identical loss trace.
        out_dir: training directory for ``log.jsonl`` and checkpoints (None: nothing is written). A fresh
            run (``resume=False``) refuses a directory that holds a checkpoint or a ``log.jsonl`` already
            (``FileExistsError``), so two runs never share one log. What killed checkpoint writes left there
            (``.tmp-step-*``) is removed.
        ckpt_every: checkpoint every this many steps (and always at the end when ``out_dir`` is set).
        log_every: losses are synchronised, checked for NaN/inf, logged and the progress bar updated
            every this many steps (the only host-device syncs of the loop).
        resume: continue from ``out_dir``'s latest checkpoint (starts fresh if there is none); lines of
            ``log.jsonl`` after the checkpoint's step are dropped. The numerically relevant settings must
            match the checkpoint's. On the same number of processes the result is bit-identical to an
            uninterrupted run. On another number it continues from the checkpoint's weights, EMA,
            optimiser state, step and loss trace, with a ``UserWarning``: it cannot be bit-identical (each
            rank draws its own batches, so the global batch ``world_size * batch_size`` and the batches
            change); ranks present in the checkpoint continue their RNG streams, a joining rank gets a
            stream seeded from ``seed``, its rank and the step.
        progress: show a tqdm bar (rank 0).
        time_sampler: ``"uniform"``, ``"logit_normal"`` or a callable ``(n, generator=, device=, dtype=)``.
        weighting: per-sample loss weight ``w(t)`` (b,) -> (b,).
        max_seconds: stop (and checkpoint) at the first log step after this much wall time.
        stop_at: stop after this many steps as if interrupted (the schedule still spans ``steps``);
            resume later with ``resume=True``.
        distributed: DDP on/off; None auto-detects torchrun's ``RANK``/``WORLD_SIZE``.
        keep_checkpoints: how many checkpoint directories to keep.
        coupling_workers: couple this many batches ahead in background threads while the current
            step trains (0: inline). Pays off when the coupling dominates the step (exact OT with a
            small model on CPU, or any CPU coupling next to GPU training) and a core is free. The loss
            trace does not depend on it (see ``steerflow.training.pairs``). The coupling then runs in
            threads: per-call diagnostics such as ``Sinkhorn.last_result`` describe whichever batch
            finished last.

    Raises:
        FloatingPointError: a non-finite loss, naming the first bad step (checked at log steps, before
            any checkpoint is written, so the last good checkpoint is never overwritten).
    """
    # --- arguments --------------------------------------------------------------------------------
    for key, val in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if not (isinstance(val, int) and val >= 1):
            raise ValueError(f"{key} must be a positive int, got {val!r}")
    if ckpt_every is not None and not (isinstance(ckpt_every, int) and ckpt_every >= 1):
        raise ValueError(f"ckpt_every must be a positive int or None, got {ckpt_every!r}")
    if not (isinstance(warmup, int) and 0 <= warmup <= steps):
        raise ValueError(f"warmup must be an int in [0, steps={steps}], got {warmup!r}")
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {list(LR_SCHEDULES)}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1) or be None, got {ema_decay}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
    if amp not in (None, False, True, "bf16"):
        raise ValueError(f"amp must be None, False, True or 'bf16', got {amp!r}")
    if stop_at is not None and not (isinstance(stop_at, int) and 1 <= stop_at <= steps):
        raise ValueError(f"stop_at must be an int in [1, steps={steps}], got {stop_at!r}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir")
    if not (isinstance(coupling_workers, int) and not isinstance(coupling_workers, bool) and coupling_workers >= 0):
        raise ValueError(f"coupling_workers must be an int >= 0, got {coupling_workers!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path_obj = get_path(path) if isinstance(path, str) else path
    if not callable(getattr(path_obj, "sample", None)):
        raise TypeError(f"path must be a name or an object with .sample(x_0, x_1, t), got {type(path).__name__}")
    sample_t = get_time_sampler(time_sampler)
    if isinstance(coupling, str):
        from ..couplings import get_coupling

        coupling = get_coupling(coupling)
    use_amp = bool(amp)

    dev_type = resolve_device(device).type
    info = ddp.setup(distributed, dev_type)
    try:
        dev = resolve_device(device, info.local_rank)
        if use_amp and dev.type != "cuda":
            raise ValueError(f"amp (bf16 autocast) is supported on CUDA only; the device is {dev}")
        return _run(model=model, data=data, source=source, coupling=coupling, path_obj=path_obj, path=path,
                    steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, betas=betas,
                    warmup=warmup, schedule=schedule, ema_decay=ema_decay, grad_clip=grad_clip, use_amp=use_amp,
                    dev=dev, seed=seed, out_dir=out_dir, ckpt_every=ckpt_every, log_every=log_every,
                    resume=resume, progress=progress, time_sampler=time_sampler, sample_t=sample_t,
                    weighting=weighting, max_seconds=max_seconds, stop_at=stop_at, info=info,
                    keep_checkpoints=keep_checkpoints, coupling_workers=coupling_workers)
    finally:
        ddp.teardown(info)


def _run(*, model, data, source, coupling, path_obj, path, steps, batch_size, lr, weight_decay, betas, warmup,
         schedule, ema_decay, grad_clip, use_amp, dev, seed, out_dir, ckpt_every, log_every, resume,
         progress, time_sampler, sample_t, weighting, max_seconds, stop_at, info, keep_checkpoints,
         coupling_workers):
    rank, world = info.rank, info.world_size
    out = Path(out_dir) if out_dir is not None else None
    train_config = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "betas": list(betas),
        "warmup": warmup, "schedule": schedule, "ema_decay": ema_decay, "grad_clip": grad_clip,
        "amp": "bf16" if use_amp else None, "seed": seed, "path": _describe(path if isinstance(path, str) else path_obj),
        "time_sampler": _describe(time_sampler), "world_size": world, "coupling": _describe(coupling),
        "source": _describe(source), "weighting": _describe(weighting), "device": str(dev),
        "model_name": model_name(model),
    }

    model.to(dev)
    net = unwrap_model(model)
    net.train()  # label dropout and any other train-mode behaviour
    dtype = next(iter(net.parameters())).dtype
    gen_host = torch.Generator("cpu").manual_seed(seed + rank)
    gen_dev = gen_host if dev.type == "cpu" else torch.Generator(dev).manual_seed(seed + rank)
    gen_time = torch.Generator(dev).manual_seed(_time_seed(seed + rank))
    fork_devices = [dev.index] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices, device_type=dev.type if dev.type == "cuda" else "cuda"):
        torch.default_generator.manual_seed(seed + rank)
        if dev.type == "cuda":
            torch.cuda.manual_seed(seed + rank)

        wrapped: nn.Module = net
        if info.enabled:
            wrapped = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
        # the multi-tensor (foreach) update: PyTorch's default on CUDA, asked for here on the CPU too, where it
        # dispatches each operation once for all parameters instead of once per parameter (≈ 2 % of a small
        # model's step, benchmarks/bench_overhead.py); the same arithmetic as the per-parameter loop
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      foreach=True)
        ema = EMA(net, ema_decay) if ema_decay is not None else None
        batches = _Batches(data, dev, dtype, gen_host, gen_dev)

        start, prior_losses = 0, torch.zeros(0)
        has_ckpt = out is not None and (out / LATEST).exists()
        found = None if out is None or resume else earlier_run(out, log=info.is_main)
        if found is not None:
            raise FileExistsError(f"{out} already holds the {found} of an earlier run; pass resume=True to continue "
                                  "it (or start it over, when it stopped before its first checkpoint), or use a new "
                                  "out_dir")
        if info.is_main and out is not None:
            remove_stale(out)
        if resume and has_ckpt:
            stored = read_config(out)["training"]
            diff = [k for k in _RESUME_KEYS if stored.get(k) != train_config[k]]
            if diff:
                raise ValueError(f"cannot resume {out} exactly: settings differ at {diff}: stored "
                                 f"{ {k: stored.get(k) for k in diff} } vs now { {k: train_config[k] for k in diff} }")
            start, extra = load_state(out, net, ema=ema, optimizer=optimizer)
            prior_losses = extra["losses"].float()
            stored_world = int(stored.get("world_size", extra["rng"].shape[0]))
            if rank < extra["rng"].shape[0]:
                layout = extra["rng_layout"]
                flat = extra["rng"][rank]
                states, off = [], 0
                for n in layout:
                    states.append(flat[off:off + n].clone())
                    off += n
                _set_rng_states(states, gen_host, gen_dev, gen_time, dev)
            else:  # a rank the checkpoint's run did not have
                joining = _joining_seed(seed, rank, start)
                gen_host.manual_seed(joining)
                if gen_dev is not gen_host:
                    gen_dev.manual_seed(joining)
                gen_time.manual_seed(_time_seed(joining))
                torch.default_generator.manual_seed(joining)
                if dev.type == "cuda":
                    torch.cuda.manual_seed(joining)
            if stored_world != world and info.is_main:
                warnings.warn(f"resuming {out} (step {start}, written by {stored_world} process(es)) on {world}: "
                              f"the global batch changes from {stored_world * batch_size} to {world * batch_size} "
                              "and each rank draws other batches, so the run continues from the checkpoint but "
                              "is not bit-identical to an uninterrupted one", UserWarning, stacklevel=3)
            if ema is not None:
                ema.num_updates = start
        end = stop_at if stop_at is not None else steps
        if start > end:
            raise ValueError(f"the checkpoint in {out} is at step {start}, past stop_at={end}")
        batches.step = start  # batches are numbered by the step they are drawn for

        log_file = None
        pbar = None
        if info.is_main and out is not None:
            out.mkdir(parents=True, exist_ok=True)
            log_path = out / LOG
            if resume:  # drop lines logged after the checkpoint we resume from
                cut_log(log_path, start)
            log_file = open(log_path, "a")
        if progress and info.is_main:
            from tqdm.auto import tqdm

            pbar = tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True, leave=True)

        def checkpoint(step: int, losses: Tensor) -> None:
            states = _rng_states(stream.resume_states(), gen_time, dev)
            layout = [int(s.numel()) for s in states]
            flat = torch.cat([s.reshape(-1) for s in states])
            if info.enabled:
                cdev = ddp.collective_device(info, dev)
                gathered = [torch.empty_like(flat, device=cdev) for _ in range(world)]
                dist.all_gather(gathered, flat.to(cdev))
                all_flat = torch.stack([g.cpu() for g in gathered])
            else:
                all_flat = flat[None]
            if info.is_main:
                save_checkpoint(out, net, ema=ema, optimizer=optimizer, config=train_config, step=step,
                                extra={"losses": losses, "rng": all_flat, "rng_layout": layout},
                                keep=keep_checkpoints)
            if info.enabled:
                dist.barrier()

        # --- the hot loop: no host syncs except at log steps --------------------------------------
        def draw_x0(x_1: Tensor) -> Tensor:
            if source is None:
                return torch.randn(x_1.shape, generator=gen_dev, device=dev, dtype=x_1.dtype)
            return source(batch_size, gen_host).to(dev, dtype=x_1.dtype, non_blocking=True)

        stream = PairStream(batches, draw_x0, coupling, batch_size, gen_host, gen_dev, workers=coupling_workers,
                            total=max(end - start, 0))
        params = list(net.parameters())
        constant_lr = schedule == "constant" and warmup == 0
        groups = optimizer.param_groups
        chunks = [prior_losses]
        pending: list[Tensor] = []
        last_ckpt = start if start > 0 else None
        stopped_early = False
        t_start = t_log = time.perf_counter()
        step = start
        try:
            for step in range(start, end):
                if not constant_lr:
                    lr_t = lr * lr_factor(step, steps=steps, warmup=warmup, schedule=schedule)
                    for g in groups:
                        g["lr"] = lr_t
                x_0, x_1, labels = stream.next()
                t = sample_t(batch_size, generator=gen_time, device=dev, dtype=x_1.dtype)
                if use_amp:
                    with torch.autocast(dev.type, dtype=torch.bfloat16):
                        loss = flow_matching_loss(wrapped, x_0, x_1, t, path=path_obj, cond=labels, weighting=weighting)
                else:
                    loss = flow_matching_loss(wrapped, x_0, x_1, t, path=path_obj, cond=labels, weighting=weighting)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                if ema is not None:
                    ema.update()
                pending.append(loss.detach())
                if pbar is not None:
                    pbar.update(1)
                done = step + 1
                is_ckpt = out is not None and ckpt_every is not None and done % ckpt_every == 0
                if done % log_every and not is_ckpt and done != end:
                    continue
                # --- log step: sync, check, log, maybe stop / checkpoint ---------------------------
                vals = torch.stack(pending).float()
                if info.enabled:
                    vals = vals.to(ddp.collective_device(info, dev))
                    dist.all_reduce(vals)
                    vals = vals / world
                vals = vals.cpu()
                pending.clear()
                bad = (~torch.isfinite(vals)).nonzero()
                if bad.numel():
                    first = done - vals.numel() + 1 + int(bad[0, 0])
                    raise FloatingPointError(
                        f"non-finite loss {vals[int(bad[0, 0])].item()} at step {first}; stopping (last checkpoint: "
                        f"{'step ' + str(last_ckpt) if last_ckpt is not None else 'none'}, left untouched)")
                chunks.append(vals)
                now = time.perf_counter()
                rate = (vals.numel()) / max(now - t_log, 1e-9)
                if info.is_main:
                    mean = float(vals.mean())
                    if log_file is not None:
                        log_file.write(json.dumps({"step": done, "loss": mean, "lr": groups[0]["lr"],
                                                   "it_s": rate, "time": now - t_start}) + "\n")
                        log_file.flush()
                    if pbar is not None:
                        pbar.set_postfix(loss=f"{mean:.4g}", it_s=f"{rate:.0f}", refresh=False)
                t_log = now
                if max_seconds is not None and done != end:
                    flag = torch.tensor([float(now - t_start > max_seconds)])
                    if info.enabled:
                        flag = flag.to(ddp.collective_device(info, dev))
                        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    if float(flag) > 0:
                        stopped_early = True
                        break
                if is_ckpt:
                    checkpoint(done, torch.cat(chunks))
                    last_ckpt = done
            done = step + 1 if end > start else start
            seconds = time.perf_counter() - t_start
            losses = torch.cat(chunks)
            if out is not None and last_ckpt != done:
                checkpoint(done, losses)
        finally:
            stream.close()
            if pbar is not None:
                pbar.close()
            if log_file is not None:
                log_file.close()
        stopped_early = stopped_early or done < steps
        return TrainResult(model=net, ema=ema.module if ema is not None else None, losses=losses, step=done,
                           seconds=seconds, out_dir=out, stopped_early=stopped_early)
