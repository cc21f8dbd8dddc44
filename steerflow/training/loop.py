"""``train``: the one training loop (AdamW, warm-up + cosine LR, EMA, clipping, bf16 autocast, exact
resume, DDP, callbacks).

One update (Lipman et al. 2023, Algorithm 1; Liu et al. 2022; Tong et al. 2024 for couplings):

    x_1 ~ data,  x_0 ~ source,  (x_0, x_1) ← coupling(x_0, x_1),  t ~ p(t)
    L = flow_matching_loss(v_θ, x_0, x_1, t),  θ ← AdamW(θ, ∇_θ L),  θ̄ ← EMA(θ̄, θ)

The data may also be fixed pairs ``(x_0, x_1)`` (reflow's coupling) or a batch callable
``(n, generator) -> (x_0, x_1[, cond])`` (per-population or paired sources), and the loss any
:class:`~steerflow.training.loss.AbstractTrainingLoss` (c-rectification, multimarginal regression, ...):
every trainer of the library runs this loop.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..models import model_name, unwrap_model
from . import distributed as ddp
from .callbacks import Callbacks
from .checkpoint import LATEST, LOG, cut_log, earlier_run, load_state, read_config, remove_stale, save_checkpoint
from .ema import EMA
from .loss import LR_SCHEDULES, FlowMatchingLoss, lr_factor
from .pairs import PairStream, make_draw

# Training settings that change the numbers: resuming with a different value cannot be exact. The world size
# is not among them: a run may be resumed on another number of processes, not bit-exactly (see ``train``'s
# ``resume``). A key missing from an older checkpoint reads as its default here.
_RESUME_KEYS = ("steps", "batch_size", "lr", "weight_decay", "betas", "warmup", "schedule", "ema_decay",
                "grad_clip", "amp", "seed", "path", "time_sampler", "lr_floor", "loss")
_RESUME_DEFAULTS = {"lr_floor": 0.0, "loss": None}


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation settings of :func:`train`, grouped (each is described there).

    ``steps``/``batch_size`` (per rank), AdamW's ``lr``, ``weight_decay``, ``betas``; the LR schedule
    (``warmup`` steps of linear warm-up, then ``lr_schedule`` ``"cosine"`` down to ``lr_floor · lr`` at
    ``steps``, or ``"constant"``); ``ema_decay`` and ``grad_clip`` (None: off); ``amp`` (``"bf16"``
    autocast, CUDA only); the ``seed``; the bookkeeping ``log_every``, ``ckpt_every``, ``keep_checkpoints``,
    ``max_seconds``, ``stop_at``; ``coupling_workers``.
    """

    steps: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 0
    lr_schedule: str = "cosine"
    lr_floor: float = 0.0
    ema_decay: float | None = None
    grad_clip: float | None = None
    amp: bool | str | None = None
    seed: int = 0
    log_every: int = 100
    ckpt_every: int | None = None
    keep_checkpoints: int = 1
    max_seconds: float | None = None
    stop_at: int | None = None
    coupling_workers: int = 0

    def check(self) -> None:
        """``ValueError`` naming the first setting out of range."""
        for key in ("steps", "batch_size", "log_every"):
            val = getattr(self, key)
            if not (isinstance(val, int) and val >= 1):
                raise ValueError(f"{key} must be a positive int, got {val!r}")
        steps = self.steps
        if self.ckpt_every is not None and not (isinstance(self.ckpt_every, int) and self.ckpt_every >= 1):
            raise ValueError(f"ckpt_every must be a positive int or None, got {self.ckpt_every!r}")
        if not (isinstance(self.warmup, int) and 0 <= self.warmup <= steps):
            raise ValueError(f"warmup must be an int in [0, steps={steps}], got {self.warmup!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown schedule {self.lr_schedule!r} (lr_schedule); expected one of "
                             f"{list(LR_SCHEDULES)}")
        if not (isinstance(self.lr_floor, (int, float)) and 0.0 <= self.lr_floor <= 1.0):
            raise ValueError(f"lr_floor must lie in [0, 1], got {self.lr_floor!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1) or be None, got {self.ema_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.amp not in (None, False, True, "bf16"):
            raise ValueError(f"amp must be None, False, True or 'bf16', got {self.amp!r}")
        if self.stop_at is not None and not (isinstance(self.stop_at, int) and 1 <= self.stop_at <= steps):
            raise ValueError(f"stop_at must be an int in [1, steps={steps}], got {self.stop_at!r}")
        workers = self.coupling_workers
        if not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0):
            raise ValueError(f"coupling_workers must be an int >= 0, got {workers!r}")
        if not (isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 1):
            raise ValueError(f"keep_checkpoints must be a positive int, got {self.keep_checkpoints!r}")


class _Unset:
    """Marks a keyword of :func:`train` left out (its value then comes from ``config`` or the default)."""

    def __repr__(self) -> str:
        return "<from config>"


_UNSET: Any = _Unset()


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


class _Generators:
    """The run's generators: the pair generators ``host`` (CPU) and ``dev`` (the same object on CPU), the
    loss's generator ``time`` (on the device), and, inside the loop's forked scope, torch's global RNG."""

    def __init__(self, seed: int, dev: torch.device) -> None:
        self.dev_type = dev
        self.host = torch.Generator("cpu").manual_seed(seed)
        self.dev = self.host if dev.type == "cpu" else torch.Generator(dev).manual_seed(seed)
        self.time = torch.Generator(dev).manual_seed(_time_seed(seed))

    def seed_global(self, seed: int) -> None:
        torch.default_generator.manual_seed(seed)
        if self.dev_type.type == "cuda":
            torch.cuda.manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """All generators from ``seed`` (a rank joining a resumed run)."""
        self.host.manual_seed(seed)
        if self.dev is not self.host:
            self.dev.manual_seed(seed)
        self.time.manual_seed(_time_seed(seed))
        self.seed_global(seed)

    def states(self, pair_states: list[Tensor]) -> list[Tensor]:
        """Layout: pair generator(s) (host[, device]; :meth:`PairStream.resume_states`), torch's global CPU
        RNG, the t generator[, CUDA global]."""
        states = [*pair_states, torch.get_rng_state(), self.time.get_state()]
        if self.dev_type.type == "cuda":
            states.append(torch.cuda.get_rng_state(self.dev_type))
        return states

    def set_states(self, states: list[Tensor]) -> None:
        cuda = self.dev_type.type == "cuda"
        expected = 3 + (self.dev is not self.host) + cuda
        if len(states) != expected:
            raise ValueError(f"the checkpoint's RNG state has {len(states)} parts, this run needs {expected} (a "
                             "checkpoint from an older steerflow or another device type); it cannot be resumed "
                             "exactly")
        it = iter(states)
        self.host.set_state(next(it))
        if self.dev is not self.host:
            self.dev.set_state(next(it))
        torch.set_rng_state(next(it))
        self.time.set_state(next(it))
        if cuda:
            torch.cuda.set_rng_state(next(it), self.dev_type)


def train(model: nn.Module, data: Any, *, source: Callable[[int, torch.Generator], Tensor] | None = None,
          coupling: Any = None, path: Any = "linear", loss: Callable[..., Tensor] | None = None,
          config: TrainConfig | None = None, steps: int = _UNSET, batch_size: int = _UNSET, lr: float = _UNSET,
          weight_decay: float = _UNSET, betas: tuple[float, float] = _UNSET, warmup: int = _UNSET,
          lr_schedule: str = _UNSET, ema_decay: float | None = _UNSET, grad_clip: float | None = _UNSET,
          amp: bool | str | None = _UNSET, device: str | torch.device = "auto", seed: int = _UNSET,
          out_dir: str | os.PathLike | None = None, ckpt_every: int | None = _UNSET, log_every: int = _UNSET,
          resume: bool = False, progress: bool = True, time_sampler: Any = "uniform",
          weighting: Callable[[Tensor], Tensor] | None = None, max_seconds: float | None = _UNSET,
          stop_at: int | None = _UNSET, distributed: bool | None = None, keep_checkpoints: int = _UNSET,
          coupling_workers: int = _UNSET, lr_floor: float = _UNSET, callbacks: Any = None,
          checkpoints: AbstractRunStore | None = None, schedule: str = _UNSET) -> TrainResult:
    """Train ``model`` by conditional flow matching (or any ``loss``) and return a :class:`TrainResult`.

    The optimisation settings come from ``config`` (a :class:`TrainConfig`), each overridden by the keyword
    of the same name when that is given; without ``config``, ``steps`` and ``batch_size`` are required.

    Args:
        model: ``v_θ(x, t[, cond])``; registered models (``steerflow.models``) can be rebuilt from the
            checkpoint by :func:`~steerflow.training.load_checkpoint`.
        data: what a batch is drawn from, one of
            - a tensor (N, *d) (``x_1`` drawn uniformly with replacement on the device), a
              ``(tensor, labels)`` pair, or an object with ``.sample(n, generator) -> x_1 | (x_1, labels)``
              (called with a CPU generator; labels are passed to the model as ``cond``); ``x_0`` comes from
              ``source``;
            - fixed pairs: ``(x_0, x_1)`` or ``(x_0, x_1, cond)`` tensors of equal shapes, or an object with
              tensors ``x_0``, ``x_1`` (reflow's ``Pairs``): one index set per step picks both;
            - a batch callable ``data(n, generator) -> (x_0, x_1[, cond])`` (CPU generator; e.g. paired or
              per-population sources), or any object a custom ``loss`` understands.
        source: ``source(n, generator) -> x_0`` (CPU generator); default ``N(0, I)`` shaped like ``x_1``.
        coupling: ``coupling(x_0, x_1, labels=, generator=) -> (x_0, x_1)`` re-pairing the batch (it
            must keep ``x_1``'s order when there are labels), or a name for
            ``steerflow.couplings.get_coupling``.
        path: a path name for :func:`steerflow.paths.get_path` or any object with ``sample``.
        loss: ``loss(model, batch, generator) -> scalar``
            (:class:`~steerflow.training.loss.AbstractTrainingLoss`); default
            :class:`~steerflow.training.loss.FlowMatchingLoss` of ``path``, ``time_sampler`` and
            ``weighting`` (which are then left at their defaults).
        config: a :class:`TrainConfig`.
        steps: total optimiser steps of the run (the LR schedule spans them).
        batch_size: samples per step (per rank under DDP).
        lr, weight_decay, betas: AdamW (Loshchilov & Hutter 2019).
        warmup: linear LR warm-up steps; lr_schedule: ``"cosine"`` (decay to ``lr_floor · lr`` at
            ``steps``, default 0) or ``"constant"``. ``schedule=`` is its deprecated old name.
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
        log_every: losses are synchronised, checked for NaN/inf, logged, passed to ``callbacks`` and the
            progress bar updated every this many steps (the only host-device syncs of the loop).
        resume: continue from ``out_dir``'s latest checkpoint (starts fresh if there is none); lines of
            ``log.jsonl`` after the checkpoint's step are dropped. The numerically relevant settings must
            match the checkpoint's. On the same number of processes the result is bit-identical to an
            uninterrupted run. On another number it continues from the checkpoint's weights, EMA,
            optimiser state, step and loss trace, with a ``UserWarning``: it cannot be bit-identical (each
            rank draws its own batches, so the global batch ``world_size * batch_size`` and the batches
            change); ranks present in the checkpoint continue their RNG streams, a joining rank gets a
            stream seeded from ``seed``, its rank and the step.
        progress: show a tqdm bar (rank 0); a str names it.
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
        lr_floor: the cosine schedule's final LR as a fraction of ``lr``.
        callbacks: one or a list of callbacks (rank 0): a callable ``cb(record)`` or an object with
            ``on_log(record)`` and optionally ``on_end(result)``
            (:class:`~steerflow.training.callbacks.Callback`, e.g.
            :class:`~steerflow.training.callbacks.TensorBoardLogger`); ``record`` is the dict written to
            ``log.jsonl`` (``step``, mean ``loss`` since the last record, ``lr``, ``it_s``, ``time``).
        checkpoints: an :class:`AbstractRunStore` keeping the run (its log, checkpoints, resume) in place of the
            default :class:`RunDirectory` of ``out_dir``/``resume``/``ckpt_every``/``keep_checkpoints``
            (the straightening fits number several fits in one directory this way).

    Raises:
        FloatingPointError: a non-finite loss, naming the first bad step (checked at log steps, before
            any checkpoint is written, so the last good checkpoint is never overwritten).
    """
    given = dict(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, betas=betas, warmup=warmup,
                 lr_schedule=lr_schedule, ema_decay=ema_decay, grad_clip=grad_clip, amp=amp, seed=seed,
                 log_every=log_every, ckpt_every=ckpt_every, keep_checkpoints=keep_checkpoints,
                 max_seconds=max_seconds, stop_at=stop_at, coupling_workers=coupling_workers, lr_floor=lr_floor)
    if schedule is not _UNSET:
        warnings.warn("train(schedule=) is deprecated: it names the learning-rate schedule, pass lr_schedule= "
                      "(path= names the probability path)", DeprecationWarning, stacklevel=2)
        if lr_schedule is not _UNSET and lr_schedule != schedule:
            raise ValueError(f"schedule={schedule!r} and lr_schedule={lr_schedule!r} disagree; pass lr_schedule= only")
        given["lr_schedule"] = schedule
    cfg = _config(config, {k: v for k, v in given.items() if v is not _UNSET})
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir")
    if checkpoints is not None and (out_dir is not None or resume):
        raise ValueError("checkpoints= decides where the run is kept; out_dir= and resume= belong to the default one")
    if checkpoints is not None and not isinstance(checkpoints, AbstractRunStore):
        raise TypeError(f"checkpoints must be an AbstractRunStore, got {type(checkpoints).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss is None:
        loss_fn = FlowMatchingLoss(path, time_sampler, weighting)
    elif not callable(loss):
        raise TypeError(f"loss must be a callable (model, batch, generator) -> scalar, got {type(loss).__name__}")
    elif not (isinstance(path, str) and path == "linear" and isinstance(time_sampler, str)
              and time_sampler == "uniform" and weighting is None):
        raise ValueError("path=, time_sampler= and weighting= build the default flow-matching loss; with loss= "
                         "give them to the loss object instead")
    else:
        loss_fn = loss
    if isinstance(coupling, str):
        from ..couplings import get_coupling

        coupling = get_coupling(coupling)
    callbacks = Callbacks(callbacks)

    dev_type = resolve_device(device).type
    info = ddp.setup(distributed, dev_type)
    try:
        dev = resolve_device(device, info.local_rank)
        if cfg.amp and dev.type != "cuda":
            raise ValueError(f"amp (bf16 autocast) is supported on CUDA only; the device is {dev}")
        if checkpoints is None:
            out = Path(out_dir) if out_dir is not None else None
            settings = _settings(cfg, model, path, loss, time_sampler, coupling, source, weighting, dev,
                                 info.world_size)
            checkpoints = RunDirectory(out, resume, cfg, settings, info)
        else:
            out = None
        return _Run(model, data, source, coupling, loss_fn, cfg, dev, info, checkpoints, progress, callbacks).run(out)
    finally:
        ddp.teardown(info)


def _config(config: TrainConfig | None, given: dict[str, Any]) -> TrainConfig:
    """``config`` with the keywords given to :func:`train` replacing its fields, checked."""
    if config is None:
        missing = [k for k in ("steps", "batch_size") if k not in given]
        if missing:
            raise TypeError(f"train() needs {' and '.join(f'{k}=' for k in missing)} (or config=TrainConfig(...))")
        cfg = TrainConfig(**given)
    elif isinstance(config, TrainConfig):
        cfg = replace(config, **given)
    else:
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    cfg.check()
    return cfg


def _settings(cfg: TrainConfig, model: nn.Module, path: Any, loss: Any, time_sampler: Any, coupling: Any,
              source: Any, weighting: Any, dev: torch.device, world: int) -> dict[str, Any]:
    """The run's settings as stored with its checkpoints (``_RESUME_KEYS`` must match on resume)."""
    settings = {
        "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
        "betas": list(cfg.betas), "warmup": cfg.warmup, "schedule": cfg.lr_schedule, "ema_decay": cfg.ema_decay,
        "grad_clip": cfg.grad_clip, "amp": "bf16" if cfg.amp else None, "seed": cfg.seed,
        "path": _describe(path), "time_sampler": _describe(time_sampler),
        "world_size": world, "coupling": _describe(coupling), "source": _describe(source),
        "weighting": _describe(weighting), "device": str(dev), "model_name": model_name(model),
    }
    if cfg.lr_floor != 0.0:
        settings["lr_floor"] = cfg.lr_floor
    if loss is not None:
        settings["loss"] = _describe(loss)
    return settings


class AbstractRunStore:
    """Where :func:`train` keeps a run: it refuses a used place or resumes at the start (:meth:`begin`), says
    which steps are logged and checkpointed and how they are numbered, and writes the checkpoints (:meth:`save`).

    Steps are numbered globally: a run may be one part of a longer one (reflow's rounds share one directory).
    :class:`RunDirectory` is the default (``out_dir``); the straightening fits keep theirs after the
    :class:`~steerflow.straighten.FitCheckpoints` of a run (several fits numbered in one directory).
    """

    log_file: Path | None = None  # ``log.jsonl`` (rank 0 appends to it), or None
    writes: bool = False  # whether the run ends with a checkpoint of its last step

    def begin(self, run: "_Run") -> tuple[int, Tensor]:
        """Refuse or resume: restore what a checkpoint holds into ``run`` (its ``net``, ``ema``, ``optimizer``,
        ``gens``) and return the step this run starts from and the loss trace before it (float32, CPU)."""
        raise NotImplementedError

    def number(self, done: int) -> int:
        """The global number of this run's ``done``-th step."""
        return done

    def is_log(self, done: int) -> bool:
        raise NotImplementedError

    def is_checkpoint(self, done: int) -> bool:
        raise NotImplementedError

    def save(self, run: "_Run", done: int, losses: Tensor) -> None:
        """Checkpoint ``run`` after its ``done``-th step with the loss trace ``losses`` (all ranks call it)."""
        raise NotImplementedError


class RunDirectory(AbstractRunStore):
    """:func:`train`'s training directory ``out`` (``out_dir``, ``resume``, ``ckpt_every``, ``log_every``,
    ``keep_checkpoints``: see there), or no directory (``out=None``: nothing written, only logged)."""

    def __init__(self, out: Path | None, resume: bool, cfg: TrainConfig, settings: dict[str, Any],
                 info: ddp.DistInfo) -> None:
        self.out, self.resume, self.cfg, self.settings, self.info = out, resume, cfg, settings, info
        self.log_file = out / LOG if out is not None else None
        self.writes = out is not None

    def is_log(self, done: int) -> bool:
        return done % self.cfg.log_every == 0

    def is_checkpoint(self, done: int) -> bool:
        every = self.cfg.ckpt_every
        return self.out is not None and every is not None and done % every == 0

    def begin(self, run: "_Run") -> tuple[int, Tensor]:
        out, info = self.out, self.info
        start, prior_losses = 0, torch.zeros(0)
        has_ckpt = out is not None and (out / LATEST).exists()
        found = None if out is None or self.resume else earlier_run(out, log=info.is_main)
        if found is not None:
            raise FileExistsError(f"{out} already holds the {found} of an earlier run; pass resume=True to continue "
                                  "it (or start it over, when it stopped before its first checkpoint), or use a new "
                                  "out_dir")
        if info.is_main and out is not None:
            remove_stale(out)
        if self.resume and has_ckpt:
            start, prior_losses = self._load(run)
        if info.is_main and out is not None:
            out.mkdir(parents=True, exist_ok=True)
            if self.resume:  # drop lines logged after the checkpoint we resume from
                cut_log(out / LOG, start)
        return start, prior_losses

    def _load(self, run: "_Run") -> tuple[int, Tensor]:
        out, info, cfg = self.out, self.info, self.cfg
        stored = read_config(out)["training"]
        now = self.settings
        diff = [k for k in _RESUME_KEYS if stored.get(k, _RESUME_DEFAULTS.get(k)) != now.get(k, _RESUME_DEFAULTS.get(k))]
        if diff:
            raise ValueError(f"cannot resume {out} exactly: settings differ at {diff}: stored "
                             f"{ {k: stored.get(k) for k in diff} } vs now { {k: now.get(k) for k in diff} }")
        start, extra = load_state(out, run.net, ema=run.ema, optimizer=run.optimizer)
        stored_world = int(stored.get("world_size", extra["rng"].shape[0]))
        rank, world = info.rank, info.world_size
        if rank < extra["rng"].shape[0]:
            flat, states, off = extra["rng"][rank], [], 0
            for n in extra["rng_layout"]:
                states.append(flat[off:off + n].clone())
                off += n
            run.gens.set_states(states)
        else:  # a rank the checkpoint's run did not have
            run.gens.reseed(_joining_seed(cfg.seed, rank, start))
        if stored_world != world and info.is_main:
            warnings.warn(f"resuming {out} (step {start}, written by {stored_world} process(es)) on {world}: "
                          f"the global batch changes from {stored_world * cfg.batch_size} to {world * cfg.batch_size} "
                          "and each rank draws other batches, so the run continues from the checkpoint but "
                          "is not bit-identical to an uninterrupted one", UserWarning, stacklevel=5)
        if run.ema is not None:
            run.ema.num_updates = start
        return start, extra["losses"].float()

    def save(self, run: "_Run", done: int, losses: Tensor) -> None:
        info = self.info
        states = run.gens.states(run.stream.resume_states())
        layout = [int(s.numel()) for s in states]
        flat = torch.cat([s.reshape(-1) for s in states])
        if info.enabled:
            cdev = ddp.collective_device(info, run.dev)
            gathered = [torch.empty_like(flat, device=cdev) for _ in range(info.world_size)]
            dist.all_gather(gathered, flat.to(cdev))
            all_flat = torch.stack([g.cpu() for g in gathered])
        else:
            all_flat = flat[None]
        if info.is_main:
            save_checkpoint(self.out, run.net, ema=run.ema, optimizer=run.optimizer, config=self.settings,
                            step=done, extra={"losses": losses, "rng": all_flat, "rng_layout": layout},
                            keep=self.cfg.keep_checkpoints)
        if info.enabled:
            dist.barrier()


class _Log:
    """Rank 0's outputs at log steps: ``log.jsonl``, the progress bar and the callbacks."""

    def __init__(self, log_file: Path | None, start: int, steps: int, progress: bool | str, is_main: bool,
                 callbacks: Callbacks) -> None:
        self.file = self.pbar = None
        self.callbacks = callbacks if is_main else Callbacks(None)
        if is_main and log_file is not None:
            self.file = open(log_file, "a")
        if progress and is_main:
            from tqdm.auto import tqdm

            desc = progress if isinstance(progress, str) else "train"
            self.pbar = tqdm(total=steps, initial=start, desc=desc, dynamic_ncols=True, leave=desc == "train")

    def step(self) -> None:
        if self.pbar is not None:
            self.pbar.update(1)

    def record(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{record['loss']:.4g}", it_s=f"{record['it_s']:.0f}", refresh=False)
        self.callbacks.on_log(record)

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
        if self.file is not None:
            self.file.close()


class _Run:
    """One call of :func:`train`: set-up (:meth:`_prepare`), the store's resume, the loop (:meth:`_loop`) of
    updates (:meth:`_update`) with its log steps and checkpoints."""

    def __init__(self, model: nn.Module, data: Any, source: Any, coupling: Any, loss_fn: Callable[..., Tensor],
                 cfg: TrainConfig, dev: torch.device, info: ddp.DistInfo, store: AbstractRunStore,
                 progress: bool | str, callbacks: Callbacks) -> None:
        self.model, self.data, self.source, self.coupling, self.loss_fn = model, data, source, coupling, loss_fn
        self.cfg, self.dev, self.info, self.store, self.progress = cfg, dev, info, store, progress
        self.callbacks = callbacks

    def run(self, out: Path | None) -> TrainResult:
        cfg, dev, rank = self.cfg, self.dev, self.info.rank
        self.model.to(dev)
        self.net = unwrap_model(self.model)
        self.net.train()  # label dropout and any other train-mode behaviour
        self.dtype = next(iter(self.net.parameters())).dtype
        self.gens = _Generators(cfg.seed + rank, dev)
        fork_devices = [dev.index] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices, device_type=dev.type if dev.type == "cuda" else "cuda"):
            self.gens.seed_global(cfg.seed + rank)
            self._prepare()
            start, prior_losses = self.store.begin(self)
            end = cfg.stop_at if cfg.stop_at is not None else cfg.steps
            if start > end:
                raise ValueError(f"the checkpoint in {out} is at step {start}, past stop_at={end}")
            if self.batches is not None:
                self.batches.step = start  # batches are numbered by the step they are drawn for
            self.log = _Log(self.store.log_file, start, cfg.steps, self.progress, self.info.is_main, self.callbacks)
            self.stream = PairStream(self.draw, self.coupling, cfg.batch_size, self.gens.host, self.gens.dev,
                                     workers=cfg.coupling_workers, total=max(end - start, 0))
            try:
                done, losses, seconds, stopped_early = self._loop(start, end, prior_losses)
            finally:
                self.stream.close()
                self.log.close()
        result = TrainResult(model=self.net, ema=self.ema.module if self.ema is not None else None, losses=losses,
                             step=done, seconds=seconds, out_dir=out, stopped_early=stopped_early or done < cfg.steps)
        if self.info.is_main:
            self.callbacks.on_end(result)
        return result

    def _prepare(self) -> None:
        """The DDP wrapper, optimiser, EMA and the batch draw."""
        cfg, dev, net = self.cfg, self.dev, self.net
        self.wrapped: nn.Module = net
        if self.info.enabled:
            self.wrapped = nn.parallel.DistributedDataParallel(
                net, device_ids=[dev.index] if dev.type == "cuda" else None)
        # the multi-tensor (foreach) update: PyTorch's default on CUDA, asked for here on the CPU too, where it
        # dispatches each operation once for all parameters instead of once per parameter (≈ 2 % of a small
        # model's step, benchmarks/bench_overhead.py); the same arithmetic as the per-parameter loop
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay, foreach=True)
        self.ema = EMA(net, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.draw, self.batches = make_draw(self.data, self.source, self.coupling, cfg.batch_size, dev, self.dtype,
                                             self.gens.host, self.gens.dev)

    def _update(self, step: int) -> Tensor:
        """One optimiser step (0-based ``step``); the loss, not synchronised."""
        cfg = self.cfg
        if not (cfg.lr_schedule == "constant" and cfg.warmup == 0):
            lr_t = cfg.lr * lr_factor(step, steps=cfg.steps, warmup=cfg.warmup, schedule=cfg.lr_schedule,
                                      floor=cfg.lr_floor)
            for g in self.optimizer.param_groups:
                g["lr"] = lr_t
        batch = self.stream.next()
        if cfg.amp:
            with torch.autocast(self.dev.type, dtype=torch.bfloat16):
                loss = self.loss_fn(self.wrapped, batch, self.gens.time)
        else:
            loss = self.loss_fn(self.wrapped, batch, self.gens.time)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        return loss.detach()

    def _synced(self, pending: list[Tensor], done: int, last_ckpt: int | None) -> Tensor:
        """The losses since the last log step on the CPU (the mean over ranks), checked finite."""
        info = self.info
        vals = torch.stack(pending).float()
        if info.enabled:
            vals = vals.to(ddp.collective_device(info, self.dev))
            dist.all_reduce(vals)
            vals = vals / info.world_size
        vals = vals.cpu()
        bad = (~torch.isfinite(vals)).nonzero()
        if bad.numel():
            first = done - vals.numel() + 1 + int(bad[0, 0])
            raise FloatingPointError(
                f"non-finite loss {vals[int(bad[0, 0])].item()} at step {self.store.number(first)}; stopping (last "
                f"checkpoint: {'step ' + str(last_ckpt) if last_ckpt is not None else 'none'}, left untouched)")
        return vals

    def _out_of_time(self, elapsed: float) -> bool:
        """``max_seconds`` passed (on any rank)."""
        flag = torch.tensor([float(elapsed > self.cfg.max_seconds)])
        if self.info.enabled:
            flag = flag.to(ddp.collective_device(self.info, self.dev))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return float(flag) > 0

    def _loop(self, start: int, end: int, prior_losses: Tensor) -> tuple[int, Tensor, float, bool]:
        """Steps ``start .. end - 1``; no host syncs except at log steps. Returns the steps done, the loss
        trace, the seconds and whether ``max_seconds`` stopped it."""
        cfg, store = self.cfg, self.store
        self.params = list(self.net.parameters())
        chunks, pending = [prior_losses], []
        last_ckpt = start if start > 0 else None
        stopped_early = False
        t_start = t_log = time.perf_counter()
        step = start
        for step in range(start, end):
            pending.append(self._update(step))
            self.log.step()
            done = step + 1
            is_ckpt = store.is_checkpoint(done)
            if not (store.is_log(done) or is_ckpt or done == end):
                continue
            # --- log step: sync, check, log, maybe stop / checkpoint -----------------------------------
            vals = self._synced(pending, done, None if last_ckpt is None else store.number(last_ckpt))
            pending.clear()
            chunks.append(vals)
            now = time.perf_counter()
            if self.info.is_main:
                self.log.record({"step": store.number(done), "loss": float(vals.mean()),
                                 "lr": self.optimizer.param_groups[0]["lr"],
                                 "it_s": vals.numel() / max(now - t_log, 1e-9), "time": now - t_start})
            t_log = now
            if cfg.max_seconds is not None and done != end and self._out_of_time(now - t_start):
                stopped_early = True
                break
            if is_ckpt:
                store.save(self, done, torch.cat(chunks))
                last_ckpt = done
        done = step + 1 if end > start else start
        seconds = time.perf_counter() - t_start
        losses = torch.cat(chunks)
        if store.writes and last_ckpt != done:
            store.save(self, done, losses)
        return done, losses, seconds, stopped_early
