"""The small regression loop shared by reflow (flow matching on fixed pairs) and distillation.

Both straightening steps train on a *fixed* finite set of pairs ``(x_0, x_1)``, so they need neither a
data loader nor a coupling: a minibatch is a random index set into the pair tensors. The loss is
supplied as ``loss_fn(model, x_0, x_1, generator) -> scalar``.

With :class:`FitCheckpoints` a fit writes ``log.jsonl`` and checkpoints into a training directory (the layout
of :mod:`steerflow.training.checkpoint`) and resumes from them bit for bit: a checkpoint holds the weights, the
Adam and learning-rate-schedule state, the generator, the loss trace, the fit's pairs and the memory of a loss
that keeps state between steps.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..training.checkpoint import (LATEST, LOG, cut_log, earlier_run, load_extra, load_state, read_config,
                                   remove_stale, resolve_checkpoint, save_checkpoint)


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


def _as_json(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in state.items()}


def fit_pairs(model: nn.Module, x_0: Tensor, x_1: Tensor, loss_fn: LossFn, *, steps: int, batch_size: int,
              lr: float, generator: torch.Generator, cosine: bool = True, grad_clip: float | None = 1.0,
              progress: bool = False, what: str = "fit", checkpoints: FitCheckpoints | None = None) -> FitResult:
    """Minimise ``loss_fn`` over minibatches of the fixed pairs ``x_0, x_1`` (n, *d) with Adam.

    ``cosine`` anneals the learning rate to 0 (a fixed pair set is a finite regression problem; the
    annealing removes the minibatch noise floor at the end). A non-finite loss stops with the step number.

    ``checkpoints`` (a :class:`FitCheckpoints`) writes a log and checkpoints and resumes from them: resumed
    inside this fit, the weights, optimiser, schedule, ``generator`` and the loss's memory are restored (the
    caller passes the pairs of :meth:`FitCheckpoints.stored_pairs`); resumed at its end, the weights and the
    ``generator`` are restored and no step is taken. A loss that keeps state between steps exposes it as a list
    of tensors ``loss_fn.memory``, changed in place; it is checkpointed with the rest.
    """
    check_fit_args(steps, batch_size, lr)
    if x_0.shape != x_1.shape:
        raise ValueError(f"x_0 and x_1 must have the same shape, got {tuple(x_0.shape)} and {tuple(x_1.shape)}")
    n = x_0.shape[0]
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if cosine else None
    memory = getattr(loss_fn, "memory", None)
    ck = checkpoints
    start, earlier, losses = 0, torch.zeros(0, dtype=torch.float64), []
    log_file = None
    if ck is not None:
        point = ck.resume_point()
        if point is not None and point.phase > ck.phase:
            raise ValueError(f"the checkpoint in {ck.path} lies in a later fit ({point.phase}) than this one "
                             f"({ck.phase}); skip it (FitCheckpoints.finished_before, past_fit)")
        found = earlier_run(ck.path) if ck.phase == 0 and not ck.resume else None
        if found is not None:
            raise FileExistsError(f"{ck.path} already holds the {found} of an earlier run; resume it, or use a new "
                                  "directory")
        remove_stale(ck.path)
        if point is not None and point.phase == ck.phase:
            if point.phase_steps != steps:
                raise ValueError(f"cannot resume {ck.path}: its fit {ck.phase} has {point.phase_steps} steps, "
                                 f"this one {steps}")
            done = point.phase_step >= steps
            _, extra = load_state(ck.path, model, optimizer=None if done else opt)
            generator.set_state(extra["rng"])
            if not done:
                if sched is not None:
                    sched.load_state_dict(extra["scheduler"])
                if memory is not None:
                    memory[:] = [extra[f"memory.{i}"] for i in range(int(extra["memory_len"]))]
            trace = extra["losses"]
            start = point.phase_step
            cut_log(ck.path / LOG, point.step)
        elif ck.offset > 0:  # a fresh fit after earlier ones: their losses are in the last checkpoint
            trace = ck._trace()
        else:
            trace = torch.zeros(0, dtype=torch.float64)
            if ck.resume:
                cut_log(ck.path / LOG, 0)
        if trace.shape[0] < ck.offset + start:
            raise ValueError(f"the checkpoint in {ck.path} holds {trace.shape[0]} losses, expected "
                             f"{ck.offset + start}")
        earlier = trace[:ck.offset].to(torch.float64)
        losses = [float(v) for v in trace[ck.offset:ck.offset + start]]
        ck.path.mkdir(parents=True, exist_ok=True)
        log_file = open(ck.path / LOG, "a")

    def checkpoint(done: int) -> None:
        extra: dict[str, Any] = {
            "fit": {"phase": ck.phase, "phase_step": done, "phase_steps": steps},
            "scheduler": None if sched is None else _as_json(sched.state_dict()),
            "losses": torch.cat([earlier, torch.tensor(losses, dtype=torch.float64)]),
            "rng": generator.get_state(), "pairs.x_0": x_0, "pairs.x_1": x_1,
            "memory_len": 0 if memory is None else len(memory)}
        extra.update({f"memory.{i}": m for i, m in enumerate(memory or [])})
        save_checkpoint(ck.path, model, optimizer=opt, config=ck.config, step=ck.offset + done, extra=extra,
                        keep=ck.keep)

    model.train()
    it = range(start, steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=what, unit="step", leave=False, total=steps, initial=start)
    t0 = t_log = time.perf_counter()
    logged = len(losses)  # losses[logged:] are the steps since the last log line
    try:
        for step in it:
            idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
            loss = loss_fn(model, x_0[idx].to(device), x_1[idx].to(device), generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{what}: non-finite loss at step {step + 1}/{steps}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            lr_t = opt.param_groups[0]["lr"]
            if sched is not None:
                sched.step()
            losses.append(float(loss.detach()))
            if ck is None:
                continue
            done, g = step + 1, ck.offset + step + 1
            is_ckpt = done == steps or bool(ck.every and g % ck.every == 0)
            if is_ckpt or g % ck.log_every == 0:
                now, window = time.perf_counter(), losses[logged:]
                log_file.write(json.dumps({"step": g, "loss": sum(window) / len(window), "lr": lr_t,
                                           "it_s": len(window) / max(now - t_log, 1e-9), "time": now - t0}) + "\n")
                log_file.flush()
                logged, t_log = len(losses), now
            if is_ckpt:
                checkpoint(done)
    finally:
        if log_file is not None:
            log_file.close()
    model.eval()
    return FitResult(losses=tuple(losses), steps=steps, seconds=time.perf_counter() - t0)
