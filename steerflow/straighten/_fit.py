"""Fits on fixed pairs, shared by reflow (flow matching on fixed pairs) and distillation, run by
:func:`steerflow.training.train`.

Both straightening steps train on a *fixed* finite set of pairs ``(x_0, x_1)``, so they need neither a
data loader nor a coupling: a minibatch is a random index set into the pair tensors. The loss is
supplied as ``loss_fn(model, x_0, x_1, generator) -> scalar`` (a CPU generator of the fit's own).

With :class:`FitCheckpoints` a fit writes ``log.jsonl`` and checkpoints into a training directory (the layout
of :mod:`steerflow.training.checkpoint`) and resumes from them bit for bit: a checkpoint holds the weights, the
optimiser state, the training generators and the caller's, the loss trace, the fit's pairs and the memory of a
loss that keeps state between steps.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..training import AbstractRunStore, train
from ..training.checkpoint import (LATEST, LOG, cut_log, earlier_run, load_extra, load_state, read_config,
                                   remove_stale, resolve_checkpoint, save_checkpoint)
from ..training.pairs import Batch, seed_from


@dataclass(frozen=True)
class FitResult:
    """What a fit did: per-step losses, the number of steps, wall-clock seconds."""

    losses: tuple[float, ...]
    steps: int
    seconds: float

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 10% of steps (the noisy last step alone says little)."""
        k = max(1, len(self.losses) // 10)
        return float(sum(self.losses[-k:]) / k)


LossFn = Callable[[nn.Module, Tensor, Tensor, torch.Generator], Tensor]


def check_fit_args(steps: int, batch_size: int, lr: float) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")


@dataclass(frozen=True)
class ResumePoint:
    """Where a checkpoint of a fitted run stands: global ``step``, the fit (``phase``) it was written in and
    the steps of that fit done (``phase_step``) out of ``phase_steps``."""

    step: int
    phase: int
    phase_step: int
    phase_steps: int


@dataclass(frozen=True)
class FitCheckpoints:
    """Checkpoints and ``log.jsonl`` of a run made of one or more fits, in the training directory ``out_dir``.

    A run's steps are counted globally: fit number ``phase`` (reflow's rounds; distillation's warm start, then
    its matching phase) covers the steps ``offset + 1 .. offset + steps`` (:meth:`at` names them). A checkpoint
    is written at every multiple of ``every`` (None or 0: none between) and at the end of each fit, and keeps
    the ``keep`` newest; a line of ``log.jsonl`` (``step``, mean ``loss`` since the last line, ``lr``, and the
    wall-clock ``it_s`` and ``time``) every ``log_every`` steps and at each checkpoint. ``config`` (the run's
    settings, a JSON object) is stored with every checkpoint, and resuming with other settings is refused.

    A fresh run (``resume=False``) refuses a directory holding a checkpoint or a log already. ``resume=True``
    continues from the latest checkpoint (from scratch when there is none), drops the lines of ``log.jsonl``
    after its step, and gives the weights, losses and log of an uninterrupted run. What killed checkpoint
    writes left in ``out_dir`` is removed (:func:`~steerflow.training.remove_stale`).
    """

    out_dir: str | Path
    config: dict[str, Any]
    every: int | None = 1000
    resume: bool = False
    log_every: int = 100
    keep: int = 1
    phase: int = 0
    offset: int = 0

    def __post_init__(self) -> None:
        if self.every is not None and (not isinstance(self.every, int) or isinstance(self.every, bool)
                                       or self.every < 0):
            raise ValueError(f"every must be an integer >= 0 or None, got {self.every!r}")
        if not isinstance(self.log_every, int) or isinstance(self.log_every, bool) or self.log_every < 1:
            raise ValueError(f"log_every must be a positive integer, got {self.log_every!r}")
        if not isinstance(self.config, dict):
            raise TypeError(f"config must be a dict, got {type(self.config).__name__}")

    def at(self, phase: int, offset: int) -> "FitCheckpoints":
        """The same run's fit number ``phase``, whose first step is global step ``offset + 1``."""
        return replace(self, phase=int(phase), offset=int(offset))

    @property
    def path(self) -> Path:
        return Path(self.out_dir)

    def resume_point(self) -> ResumePoint | None:
        """The checkpoint a resumed run continues from (None: a fresh run, or nothing to resume).

        Raises ``ValueError`` when the checkpoint's settings differ from ``config`` (naming the keys) or it
        holds no fit state (a checkpoint of another kind of run)."""
        if not self.resume or not (self.path / LATEST).exists():
            return None
        meta = read_config(self.path)
        stored, now = meta["training"], json.loads(json.dumps(self.config))
        diff = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
        if diff:
            raise ValueError(f"cannot resume {self.path}: settings differ at {diff}: stored "
                             f"{ {k: stored.get(k) for k in diff} } vs now { {k: now.get(k) for k in diff} }")
        ckpt = resolve_checkpoint(self.path)
        try:
            fit = json.loads((ckpt / "state.json").read_text())["extra"]["fit"]
            return ResumePoint(int(meta["step"]), int(fit["phase"]), int(fit["phase_step"]), int(fit["phase_steps"]))
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"cannot resume {self.path}: its checkpoint {ckpt.name} holds no fit state (it was "
                             "not written during a fit, or by an older steerflow)") from None

    def finished_before(self) -> bool:
        """True when the run resumes from a later fit: this one is done and is skipped (see :meth:`past_fit`)."""
        point = self.resume_point()
        return point is not None and point.phase > self.phase

    def past_fit(self, steps: int) -> FitResult:
        """The :class:`FitResult` of this fit, done before the checkpoint resumed from (its losses, 0 seconds)."""
        losses = self._trace()[self.offset:self.offset + steps]
        return FitResult(losses=tuple(float(v) for v in losses), steps=steps, seconds=0.0)

    def stored_pairs(self) -> tuple[Tensor, Tensor] | None:
        """The pairs ``(x_0, x_1)`` of this fit saved with the checkpoint a resumed run continues from (None
        when that checkpoint lies in another fit, or the run is fresh): a resumed fit trains on them instead of
        drawing new ones."""
        point = self.resume_point()
        if point is None or point.phase != self.phase:
            return None
        extra = load_extra(self.path, names=("pairs.x_0", "pairs.x_1"))
        return extra["pairs.x_0"], extra["pairs.x_1"]

    def _trace(self) -> Tensor:
        """The loss trace of the latest checkpoint (read alone: the pairs stored beside it stay on disk)."""
        return load_extra(self.path, names=("losses",))["losses"]


class _PairLoss:
    """``loss_fn(model, x_0, x_1, generator)`` as a training loss on a :class:`Batch` of pairs, with a CPU
    generator of its own (the loss may draw CPU tensors from it, e.g. data batches) and the loss's ``memory``."""

    def __init__(self, loss_fn: LossFn, seed: int) -> None:
        self.loss_fn = loss_fn
        self.generator = torch.Generator().manual_seed((seed * 1_000_003 + 0x1055) % 2**63)
        self.memory = getattr(loss_fn, "memory", None)

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        return self.loss_fn(model, batch.x_0, batch.x_1, self.generator)


class _FitStore(AbstractRunStore):
    """Fit number ``ck.phase`` of a :class:`FitCheckpoints` run as :func:`~steerflow.training.train`'s store:
    steps numbered from ``ck.offset``, checkpoints holding the fit's place, pairs, the loss's generator and
    memory and the caller's ``generator`` beside the training state."""

    def __init__(self, ck: FitCheckpoints, steps: int, x_0: Tensor, x_1: Tensor, loss: _PairLoss,
                 generator: torch.Generator, seed: int) -> None:
        self.ck, self.steps, self.x_0, self.x_1, self.loss, self.generator = ck, steps, x_0, x_1, loss, generator
        self.seed = seed
        self.log_file = ck.path / LOG
        self.writes = True

    def number(self, done: int) -> int:
        return self.ck.offset + done

    def is_log(self, done: int) -> bool:
        return self.number(done) % self.ck.log_every == 0

    def is_checkpoint(self, done: int) -> bool:
        return done == self.steps or bool(self.ck.every and self.number(done) % self.ck.every == 0)

    def begin(self, run: Any) -> tuple[int, Tensor]:
        ck, steps = self.ck, self.steps
        point = ck.resume_point()
        if point is not None and point.phase > ck.phase:
            raise ValueError(f"the checkpoint in {ck.path} lies in a later fit ({point.phase}) than this one "
                             f"({ck.phase}); skip it (FitCheckpoints.finished_before, past_fit)")
        found = earlier_run(ck.path) if ck.phase == 0 and not ck.resume else None
        if found is not None:
            raise FileExistsError(f"{ck.path} already holds the {found} of an earlier run; resume it, or use a new "
                                  "directory")
        remove_stale(ck.path)
        start = 0
        if point is not None and point.phase == ck.phase:
            if point.phase_steps != steps:
                raise ValueError(f"cannot resume {ck.path}: its fit {ck.phase} has {point.phase_steps} steps, "
                                 f"this one {steps}")
            done = point.phase_step >= steps
            _, extra = load_state(ck.path, run.net, optimizer=None if done else run.optimizer)
            self.generator.set_state(extra["rng"])
            if not done:
                run.gens.set_states([extra[f"rng.train.{i}"] for i in range(int(extra["rng_train_len"]))])
                self.loss.generator.set_state(extra["rng.loss"])
                if self.loss.memory is not None:
                    self.loss.memory[:] = [extra[f"memory.{i}"] for i in range(int(extra["memory_len"]))]
            trace = extra["losses"]
            start = point.phase_step
            cut_log(ck.path / LOG, point.step)
        elif ck.offset > 0:  # a fresh fit after earlier ones: their losses are in the last checkpoint
            trace = ck._trace()
        else:
            trace = torch.zeros(0)
            if ck.resume:
                cut_log(ck.path / LOG, 0)
        if trace.shape[0] < ck.offset + start:
            raise ValueError(f"the checkpoint in {ck.path} holds {trace.shape[0]} losses, expected "
                             f"{ck.offset + start}")
        ck.path.mkdir(parents=True, exist_ok=True)
        return start, trace[:ck.offset + start].float()

    def save(self, run: Any, done: int, losses: Tensor) -> None:
        states = run.gens.states(run.stream.resume_states())
        memory = self.loss.memory
        extra: dict[str, Any] = {
            "fit": {"phase": self.ck.phase, "phase_step": done, "phase_steps": self.steps, "seed": self.seed},
            "losses": losses, "rng": self.generator.get_state(), "rng.loss": self.loss.generator.get_state(),
            "rng_train_len": len(states), "pairs.x_0": self.x_0, "pairs.x_1": self.x_1,
            "memory_len": 0 if memory is None else len(memory)}
        extra.update({f"rng.train.{i}": st for i, st in enumerate(states)})
        extra.update({f"memory.{i}": m for i, m in enumerate(memory or [])})
        save_checkpoint(self.ck.path, run.net, optimizer=run.optimizer, config=self.ck.config,
                        step=self.number(done), extra=extra, keep=self.ck.keep)


def _stored_seed(ck: FitCheckpoints) -> int | None:
    """The training seed of the fit a resumed run continues inside (None: a fresh fit)."""
    point = ck.resume_point()
    if point is None or point.phase != ck.phase:
        return None
    fit = json.loads((resolve_checkpoint(ck.path) / "state.json").read_text())["extra"]["fit"]
    return int(fit["seed"])


def fit_pairs(model: nn.Module, x_0: Tensor, x_1: Tensor, loss_fn: LossFn, *, steps: int, batch_size: int,
              lr: float, generator: torch.Generator, cosine: bool = True, grad_clip: float | None = 1.0,
              progress: bool = False, what: str = "fit", checkpoints: FitCheckpoints | None = None) -> FitResult:
    """Minimise ``loss_fn`` over minibatches of ``min(batch_size, n)`` of the fixed pairs ``x_0, x_1`` (n, *d)
    with :func:`~steerflow.training.train` (Adam, no weight decay, gradient norm clipped to ``grad_clip``).

    ``cosine`` anneals the learning rate to 0 (a fixed pair set is a finite regression problem; the
    annealing removes the minibatch noise floor at the end). A non-finite loss stops with the step number.
    The fit's seed is one draw from ``generator``; ``loss_fn`` gets a CPU generator of the fit's own.

    ``checkpoints`` (a :class:`FitCheckpoints`) writes a log and checkpoints and resumes from them: resumed
    inside this fit, the weights, optimiser, the generators and the loss's memory are restored (the caller
    passes the pairs of :meth:`FitCheckpoints.stored_pairs`); resumed at its end, the weights and the
    ``generator`` are restored and no step is taken. A loss that keeps state between steps exposes it as a list
    of tensors ``loss_fn.memory``, changed in place; it is checkpointed with the rest.
    """
    check_fit_args(steps, batch_size, lr)
    if x_0.shape != x_1.shape:
        raise ValueError(f"x_0 and x_1 must have the same shape, got {tuple(x_0.shape)} and {tuple(x_1.shape)}")
    seed = _stored_seed(checkpoints) if checkpoints is not None else None
    seed = seed_from(generator) if seed is None else seed
    loss = _PairLoss(loss_fn, seed)
    store = None if checkpoints is None else _FitStore(checkpoints, steps, x_0, x_1, loss, generator, seed)
    res = train(model, (x_0, x_1), loss=loss, steps=steps, batch_size=min(batch_size, x_0.shape[0]), lr=lr,
                lr_schedule="cosine" if cosine else "constant", grad_clip=grad_clip, seed=seed,
                device=next(model.parameters()).device, distributed=False, progress=what if progress else False,
                checkpoints=store)
    model.eval()
    offset = checkpoints.offset if checkpoints is not None else 0
    return FitResult(losses=tuple(float(v) for v in res.losses[offset:]), steps=steps, seconds=res.seconds)
