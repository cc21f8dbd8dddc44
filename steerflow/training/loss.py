"""The conditional flow-matching loss and training-time samplers.

Conditional flow matching (Lipman et al. 2023, eq. 9; Liu et al. 2022; Tong et al. 2024):

    L(θ) = E_{t, (x_0, x_1)} [ w(t) · ||v_θ(x_t, t, y) − u_t(x_t | x_0, x_1)||² / D ],

with ``(x_t, u_t)`` from a probability path (:mod:`steerflow.paths`), ``D`` the number of entries of one
state (so that the unweighted Euclidean case is exactly the element-wise mean squared error), and
``||·||`` the Riemannian norm at ``x_t`` when the path provides ``sq_norm`` (Chen & Lipman 2024).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..paths import get_path


def flow_matching_loss(model: Callable[..., Tensor] | nn.Module, x_0: Tensor, x_1: Tensor, t: Tensor, *,
                       path: Any, cond: Tensor | None = None,
                       weighting: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Scalar CFM loss ``mean_b [ w(t_b) · ||v_θ(x_t, t) − u_t||²_b / D ]``.

    Args:
        model: ``v_θ(x, t[, cond])``.
        x_0, x_1: paired source and data samples (b, *d).
        t: times (b,).
        path: a path name (``"linear"``, ``"cosine"``, ...) or an object with
            ``sample(x_0, x_1, t) -> PathSample(x_t, u_t, ...)``; if it also has
            ``sq_norm(x_t, w) -> (b,)`` (manifold paths) that norm replaces the flat squared norm.
        cond: conditioning passed to the model (e.g. class labels (b,)); omitted from the call if None.
        weighting: per-sample weight ``w(t)`` (b,) -> (b,); ``O(b)``, evaluated on the sampled times.

    Returns:
        0-dim tensor. Without ``weighting`` and ``sq_norm`` it equals ``mean((v_θ − u_t)²)``.
    """
    if isinstance(path, str):
        path = get_path(path)
    ps = path.sample(x_0, x_1, t)
    x_t, u_t = ps.x_t, ps.u_t
    v = model(x_t, t) if cond is None else model(x_t, t, cond)
    if v.shape != u_t.shape:
        raise ValueError(f"the model returned shape {tuple(v.shape)}; expected the target's {tuple(u_t.shape)}")
    diff = v - u_t
    sq_norm = getattr(path, "sq_norm", None)
    if sq_norm is None and weighting is None:
        return diff.square().mean()
    per_entry = diff[0].numel()
    if sq_norm is not None:
        err = sq_norm(x_t, diff) / per_entry
        if err.shape != t.shape:
            raise ValueError(f"path.sq_norm must return shape {tuple(t.shape)}, got {tuple(err.shape)}")
    else:
        err = diff.square().reshape(diff.shape[0], -1).mean(1)
    if weighting is None:
        return err.mean()
    w = weighting(t)
    if w.shape != t.shape:
        raise ValueError(f"weighting(t) must return one weight per sample, shape {tuple(t.shape)}; "
                         f"got {tuple(w.shape)}")
    return (w.to(err.dtype) * err).mean()


@dataclass(frozen=True)
class UniformTime:
    """``t ~ U[0, 1]`` (Lipman et al. 2023)."""

    def __call__(self, n: int, *, generator: torch.Generator | None = None, device: Any = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.rand(n, generator=generator, device=device, dtype=dtype)


@dataclass(frozen=True)
class LogitNormalTime:
    """``t = sigmoid(m + s·ε)``, ``ε ~ N(0, 1)``: logit-normal sampling (Esser et al. 2024, SD3, §3.1).

    Concentrates training on intermediate times, where the velocity is hardest to predict.
    """

    loc: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"LogitNormalTime needs scale > 0, got {self.scale}")

    def __call__(self, n: int, *, generator: torch.Generator | None = None, device: Any = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
        eps = torch.randn(n, generator=generator, device=device, dtype=dtype)
        return torch.sigmoid(self.loc + self.scale * eps)


TIME_SAMPLERS = {"uniform": UniformTime, "logit_normal": LogitNormalTime, "logit-normal": LogitNormalTime}


def get_time_sampler(name: str | Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Look up a time sampler by name (``uniform``, ``logit_normal``) or pass a callable through.

    A sampler is called as ``sampler(n, generator=g, device=dev, dtype=dt) -> (n,)``.
    """
    if callable(name) and not isinstance(name, str):
        return name
    if name not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {name!r}; expected one of {sorted(TIME_SAMPLERS)}")
    return TIME_SAMPLERS[name]()


def lr_factor(step: int, *, steps: int, warmup: int, schedule: str, floor: float = 0.0) -> float:
    """Learning-rate multiplier for the update with 0-based index ``step``.

    Linear warm-up ``(step + 1) / warmup`` for ``step < warmup``, then ``constant`` (1) or ``cosine``
    ``f + (1 − f) · ½ (1 + cos(π p))`` with ``p = (step − warmup) / (steps − warmup)`` and the floor
    ``f = floor`` (Loshchilov & Hutter 2017; ``f = 0`` decays to 0 at ``steps``).
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    p = (step - warmup) / max(1, steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))
    return cosine if floor == 0.0 else floor + (1.0 - floor) * cosine


LR_SCHEDULES = ("cosine", "constant")


class AbstractTrainingLoss:
    """What :func:`~steerflow.training.train` minimises: ``loss(model, batch, generator) -> 0-dim tensor``.

    ``batch`` is what the data stream drew for the step: a :class:`~steerflow.training.pairs.Batch`
    ``(x_0, x_1, cond)`` on the training device, or the object a batch callable returned. ``generator`` is
    the loop's own generator on the training device (for ``t`` and any other per-step randomness); it is
    checkpointed with the run. Any callable of that signature serves as well; a subclass names the idea.
    """

    def __call__(self, model: Callable[..., Tensor], batch: Any, generator: torch.Generator) -> Tensor:
        raise NotImplementedError


REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class FlowMatchingLoss(AbstractTrainingLoss):
    """The conditional flow-matching loss on a batch ``(x_0, x_1, cond)`` with ``t ~ time_sampler``.

    ``reduction="mean"`` is :func:`flow_matching_loss` (the squared error averaged over the ``D`` entries
    of a state); ``"sum"`` sums over them, ``E_b ||v_θ − u_t||²`` = ``D`` times the mean (the normalisation
    of Meta Flow Matching's population loss).
    """

    path: Any = "linear"
    time_sampler: Any = "uniform"
    weighting: Callable[[Tensor], Tensor] | None = None
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {self.reduction!r}; expected one of {list(REDUCTIONS)}")
        path = get_path(self.path) if isinstance(self.path, str) else self.path
        if not callable(getattr(path, "sample", None)):
            raise TypeError(f"path must be a name or an object with .sample(x_0, x_1, t), got "
                            f"{type(self.path).__name__}")
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_sample_t", get_time_sampler(self.time_sampler))

    def __call__(self, model: Callable[..., Tensor], batch: Any, generator: torch.Generator) -> Tensor:
        x_0, x_1, cond = batch.x_0, batch.x_1, batch.cond
        t = self._sample_t(x_1.shape[0], generator=generator, device=x_1.device, dtype=x_1.dtype)
        loss = flow_matching_loss(model, x_0, x_1, t, path=self._path, cond=cond, weighting=self.weighting)
        return loss if self.reduction == "mean" else loss * x_1[0].numel()
