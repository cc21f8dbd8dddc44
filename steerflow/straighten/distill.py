"""Distillation of a (rectified) flow into a one-step generator (Liu et al. 2022, §2.3; InstaFlow, Liu et al. 2024).

On the deterministic pairs ``(x_0, x_1 = ODE_v(x_0))`` of a flow, fit a one-step map
``T_θ(x_0) = x_0 + v_θ(x_0, 0)`` by regression:

    min_θ  E_{x_0 ~ π_0} || x_0 + v_θ(x_0, 0) - x_1 ||²                      (L2; InstaFlow uses LPIPS)

so that one Euler step of ``v_θ`` from ``t = 0`` reproduces the ODE's end point. The student keeps the
velocity network's signature ``v_θ(x, t)``, so it is saved and loaded like any flow and sampled with
``sample(v_θ, x_0, steps=1, method="euler")``. Distilling the straight 2-RF rather than 1-RF is what makes
this work: the 2-RF map is nearly affine along each path, and its pairs are what the student can fit.

Regression alone is capped by the teacher: the student can at best reproduce ``ODE_v``, whose push-forward
misses the data by the teacher's own error. With ``match=`` the loss gains a distribution-matching term
against real data (the idea of Distribution Matching Distillation, Yin et al. 2024, and of critic-free
MMD-GANs; the discrepancy ``D²`` is Székely's energy distance, ``match="energy"``, or OT-GAN's minibatch
energy distance with the exact W₂² cost, ``match="ot-energy"`` (halves of both batches) or ``"ot-energy-full"``
(two generated batches against one whole data batch: ``batch_size = 2 · match_batch_size``), or that plus a
nearest-neighbour energy that pulls points stranded between modes onto the data, ``"ot-energy-nn"``; see
:mod:`.matching`):

    min_θ  w_reg · E || T_θ(x_0) - x_1 ||²  +  λ · D²( {T_θ(x_0^(i))}_i , {y^(j)}_j ),   y^(j) ~ π_1 (data)

on each minibatch of pairs (the same forward pass ``T_θ(x_0)`` serves both terms). ``sliced_weight=μ`` adds
``μ · S(T_θ(x_0), Y_s)``, the sliced ``W₂²`` against the union ``Y_s`` of the last ``sliced_memory`` data
batches (sorts along random directions: cheap against many points, and sensitive to how densely each part of a
thin structure is covered, which plans between a few hundred points are not). ``w_reg = 0`` trains on
the matching term alone (the student still starts from the teacher's weights, or from ``model=``, e.g. a
student already distilled by regression). When the teacher itself misses the data (a small network after a
short training), its pairs pull the student towards the teacher's errors, and ``w_reg = 0`` does best.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..models.onestep import OneStep, one_step  # (defined with the models, so they save and load as one)
from ..training.pairs import as_sampler
from ._fit import FitCheckpoints, FitResult, check_fit_args, fit_pairs
from .matching import GENERATED_PER_DATA, get_matching_loss, sliced_w2_loss
from .reflow import Pairs, _model_device_dtype, as_source, generate_pairs

__all__ = ["DistillResult", "OneStep", "one_step", "one_step_loss", "matched_one_step_loss", "as_data_sampler",
           "distill"]


@dataclass(frozen=True)
class DistillResult:
    """The student ``model`` (a velocity network: ``x_1 = x_0 + model(x_0, 0)``), its ``pairs`` and ``fit``."""

    model: nn.Module
    pairs: Pairs
    fit: FitResult

    @property
    def generator(self) -> "OneStep":
        return OneStep(self.model)


def one_step_loss(model: nn.Module, x_0: Tensor, x_1: Tensor, generator: torch.Generator) -> Tensor:
    """``|| x_0 + v_θ(x_0, 0) - x_1 ||²`` averaged over batch and dimensions."""
    return ((one_step(model, x_0) - x_1) ** 2).mean()


DataSampler = Callable[[int, torch.Generator], Tensor]


def as_data_sampler(data: Any) -> DataSampler:
    """``data`` as a sampler ``(n, generator) -> y`` (n, *d) of i.i.d. data points
    (:func:`steerflow.training.as_sampler`, the library's one adapter).

    Accepts a tensor (N, *d) with N >= 2 (rows drawn uniformly with replacement), a callable
    ``data(n, generator)``, or an object with ``.sample(n, generator)`` (e.g.
    :func:`steerflow.data.load_dataset`'s datasets; labels, if returned, are dropped).
    """
    if torch.is_tensor(data) and (data.ndim < 1 or data.shape[0] < 2):
        raise ValueError(f"data must be a tensor (N, *d) with N >= 2, got shape {tuple(data.shape)}")
    if not (torch.is_tensor(data) or callable(getattr(data, "sample", None)) or callable(data)):
        raise TypeError(f"data must be a tensor (N, *d), a callable (n, generator) -> tensor or an object with "
                        f".sample(n, generator); got {type(data).__name__}")
    return as_sampler(data)


def matched_one_step_loss(match: str, data: Any, *, match_weight: float = 1.0, regression_weight: float = 1.0,
                          match_batch_size: int | None = None, batch_size: int | None = None,
                          match_memory: int = 1, sliced_weight: float = 0.0, sliced_memory: int = 16,
                          sliced_projections: int = 64) -> Callable[..., Tensor]:
    """The loss ``w_reg · || T_θ(x_0) - x_1 ||² + λ · D²(T_θ(x_0), y)`` as ``loss(model, x_0, x_1, generator)``.

    ``T_θ(x_0) = x_0 + v_θ(x_0, 0)`` (b, *d) on the minibatch of pairs; ``y`` (b', *d) is a fresh batch of
    data drawn with ``generator`` (``b' = match_batch_size``, default ``b``); ``D²`` is the matching loss
    ``match`` of :mod:`.matching` (``"energy"``: the unbiased squared energy distance, Székely & Rizzo 2013;
    ``"ot-energy"``: OT-GAN's minibatch energy distance with the exact ``W₂²`` cost, Salimans et al. 2018;
    ``"ot-energy-full"``: the same on whole data batches, which needs ``b >= 2 b'`` generated points;
    ``"ot-energy-nn"``: that plus the nearest-neighbour energy, same batch sizes).
    ``batch_size`` (``b``, optional) is only used to check that requirement up front.

    ``match_memory = k > 1`` compares with the union of the last ``k`` data batches instead (``k b'`` points,
    of which ``b'`` are fresh each step; the first step draws all ``k`` fresh): the plans grow ``k``-fold
    while the data use per step stays ``b'``. Minibatch OT is biased towards the batch size's own optimum
    (a generated point is pulled to the average of the partners random batches give it, which shrinks thin
    structure and shifts mode weights); larger plans shrink that bias. Needs ``match_batch_size`` and
    ``b >= k b'`` generated points (``2 k b'`` for ``"ot-energy-full"`` and ``"ot-energy-nn"``).

    ``sliced_weight = μ > 0`` adds ``μ · S(T_θ(x_0), Y_s)``, the sliced ``W₂²`` of
    :func:`~steerflow.straighten.matching.sliced_w2_loss` (``sliced_projections`` random directions per step,
    drawn with ``generator``) against ``Y_s``, the union of the last ``sliced_memory`` data batches — the batches
    the matching term draws anyway, so no extra data is used; during the first steps ``Y_s`` holds the batches
    drawn so far. One-dimensional sorts are cheap, so this term compares with ``sliced_memory · b'`` data
    points, and it sees the low-frequency density errors (how densely each part of a thin structure is covered)
    that plans between batches of a few hundred points leave inside their noise.
    """
    loss_fn = get_matching_loss(match)
    _check_weight(match_weight, "match_weight")
    _check_weight(regression_weight, "regression_weight")
    if match_batch_size is not None and (not isinstance(match_batch_size, int) or isinstance(match_batch_size, bool)
                                         or match_batch_size < 2):
        raise ValueError(f"match_batch_size must be an integer >= 2 or None, got {match_batch_size!r}")
    _check_weight(sliced_weight, "sliced_weight")
    if match_weight == 0 and regression_weight == 0 and sliced_weight == 0:
        raise ValueError("match_weight, regression_weight and sliced_weight are all 0: nothing to minimise")
    if not isinstance(match_memory, int) or isinstance(match_memory, bool) or match_memory < 1:
        raise ValueError(f"match_memory must be an integer >= 1, got {match_memory!r}")
    if match_memory > 1 and match_batch_size is None:
        raise ValueError(f"match_memory={match_memory} needs match_batch_size (the fresh data per step), got None")
    per = GENERATED_PER_DATA[match] * match_memory  # generated points the loss needs per fresh data point
    if per > 1 and match_batch_size is None:
        raise ValueError(f"match={match!r} needs match_batch_size (the data batch; batch_size >= "
                         f"{per} * match_batch_size generated points), got None")
    if per > 1 and batch_size is not None and batch_size < per * match_batch_size:
        raise ValueError(f"match={match!r} with match_memory={match_memory} needs batch_size >= {per} * "
                         f"match_batch_size generated points per data batch, got batch_size={batch_size} and "
                         f"match_batch_size={match_batch_size}")
    for key, val in (("sliced_memory", sliced_memory), ("sliced_projections", sliced_projections)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {val!r}")
    if data is None:
        raise ValueError(f"data must be given with match={match!r} (a tensor (N, *d), a sampler (n, generator) "
                         "or a dataset with .sample); got None")
    draw = as_data_sampler(data)
    keep = max(match_memory, sliced_memory if sliced_weight > 0 else 1)
    recent: list[Tensor] = []  # the last `keep` data batches, newest last

    def loss(model: nn.Module, x_0: Tensor, x_1: Tensor, generator: torch.Generator) -> Tensor:
        x_hat = one_step(model, x_0)
        n = match_batch_size or x_0.shape[0]
        recent.extend(draw(n, generator) for _ in range(match_memory if not recent else 1))
        del recent[:-keep]
        y = recent[-1] if match_memory == 1 else torch.cat(recent[-match_memory:])
        total = match_weight * loss_fn(x_hat, y.to(device=x_hat.device, dtype=x_hat.dtype))
        if sliced_weight > 0:
            y_s = torch.cat(recent[-sliced_memory:]).to(device=x_hat.device, dtype=x_hat.dtype)
            total = total + sliced_weight * sliced_w2_loss(x_hat, y_s, n_projections=sliced_projections,
                                                           generator=generator)
        if regression_weight > 0:
            total = total + regression_weight * ((x_hat - x_1) ** 2).mean()
        return total

    loss.memory = recent  # the data batches kept between steps: checkpointed by fit_pairs
    return loss


def _check_weight(w: Any, name: str) -> None:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")


def distill(v_or_model: Callable[..., Tensor] | None = None, *, pairs: Pairs | None = None, source: Any = None,
            n_pairs: int = 20000, steps: int | None = None, method: str = "dopri5", train_steps: int = 5000,
            batch_size: int = 256, lr: float = 1e-3, model: nn.Module | None = None,
            shape: tuple[int, ...] | None = None, generator: torch.Generator | None = None,
            seed: int | None = None, cosine: bool = True, progress: bool = False, match: str | None = None,
            data: Any = None, match_weight: float = 1.0, regression_weight: float = 1.0,
            match_batch_size: int | None = None, match_memory: int = 1, sliced_weight: float = 0.0,
            sliced_memory: int = 16, sliced_projections: int = 64,
            checkpoints: FitCheckpoints | None = None) -> DistillResult:
    """Distil a flow into a one-step generator by L2 regression on its ODE pairs (plus, optionally, matching).

    Loss per minibatch of pairs: ``w_reg · || T_θ(x_0) - x_1 ||²`` (Liu et al. 2022, §2.3), plus, with
    ``match``, ``λ · D²(T_θ(x_0), y)`` against a fresh batch ``y`` of real data (see the module docstring).

    Args:
        v_or_model: the teacher flow (ideally a 2-RF); used to generate ``pairs`` when those are not given,
            and copied as the student's initialisation when ``model`` is not given.
        pairs: precomputed :class:`Pairs` (e.g. ``reflow(...).pairs``, the pairs the 2-RF was trained on);
            otherwise ``n_pairs`` pairs are generated from ``v_or_model`` and ``source`` with
            ``steps``/``method``.
        train_steps, batch_size, lr: Adam on the pairs (cosine-annealed when ``cosine``).
        model: the student network ``v_θ(x, t)`` (default: a copy of the teacher).
        generator / seed: all randomness.
        match: None (regression only) or a key of :data:`steerflow.straighten.matching.MATCHING_LOSSES`
            (``"energy"``, ``"ot-energy"``, ``"ot-energy-full"`` or ``"ot-energy-nn"``; the last two compare two
            generated batches with one data batch and need ``match_batch_size`` with ``batch_size >= 2 ·
            match_batch_size``: generated points cost no data, and the plans between whole batches blur less;
            ``"ot-energy-nn"`` adds a nearest-neighbour term, see :mod:`.matching`).
        data: the data for the matching term (required with ``match``): a tensor (N, *d), a sampler
            ``(n, generator) -> (n, *d)`` or a dataset with ``.sample(n, generator)``. Each step draws one
            batch of ``match_batch_size`` (default ``batch_size``) points.
        match_memory: compare with the union of the last ``match_memory`` data batches (larger plans, the same
            fresh data per step; see :func:`matched_one_step_loss`).
        sliced_weight, sliced_memory, sliced_projections: with ``match``, add ``sliced_weight ·`` the sliced
            ``W₂²`` against the union of the last ``sliced_memory`` data batches (see
            :func:`matched_one_step_loss`; 0, the default, leaves it out).
        match_weight: ``λ >= 0``; regression_weight: ``w_reg >= 0`` (0 with ``match``: matching alone,
            e.g. to fine-tune a student already distilled by regression, passed as ``model``; without
            ``pairs`` only ``x_0`` is drawn from ``source`` — no teacher ODE is solved — and the returned
            ``pairs.x_1`` is a copy of ``x_0``).
        checkpoints: a :class:`~steerflow.straighten._fit.FitCheckpoints`: a log and checkpoints in its
            directory; with ``resume`` the fit continues on the pairs stored with the checkpoint, bit for bit.

    Returns:
        :class:`DistillResult`; sample with ``one_step(result.model, x_0)``.
    """
    check_fit_args(train_steps, batch_size, lr)
    if match is None:
        if data is not None:
            raise ValueError("data= is only used with match=; pass match='energy' or drop data")
        if match_memory != 1:
            raise ValueError("match_memory is only used with match=; pass match='ot-energy-full' or drop it")
        if sliced_weight != 0:
            raise ValueError("sliced_weight is only used with match=; pass match='ot-energy-nn' or drop it")
        _check_weight(regression_weight, "regression_weight")
        if regression_weight == 0:
            raise ValueError("regression_weight=0 without match= leaves nothing to minimise")
        loss_fn = one_step_loss if regression_weight == 1 else (
            lambda m, x_0, x_1, g: regression_weight * one_step_loss(m, x_0, x_1, g))
    else:
        loss_fn = matched_one_step_loss(match, data, match_weight=match_weight, regression_weight=regression_weight,
                                        match_batch_size=match_batch_size, batch_size=batch_size,
                                        match_memory=match_memory, sliced_weight=sliced_weight,
                                        sliced_memory=sliced_memory, sliced_projections=sliced_projections)
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    stored = checkpoints.stored_pairs() if checkpoints is not None else None
    if stored is not None:  # resumed inside this fit: its pairs, not new ones
        pairs = Pairs(*stored)
    if pairs is None:
        if v_or_model is None or source is None:
            raise ValueError("distill needs pairs=, or a teacher flow and source= to generate them")
        if match is not None and regression_weight == 0:
            # matching alone reads only x_0: no teacher ODE to solve (x_1 is a placeholder the loss ignores)
            _, dtype = _model_device_dtype(v_or_model)
            x_0 = as_source(source, shape)(n_pairs, generator).detach().cpu()
            x_0 = x_0.to(dtype) if dtype is not None else x_0
            pairs = Pairs(x_0, x_0)
        else:
            pairs = generate_pairs(v_or_model, source, n_pairs, steps=steps, method=method, generator=generator,
                                   shape=shape, progress=progress)
    elif not isinstance(pairs, Pairs):
        raise TypeError(f"pairs must be a Pairs, got {type(pairs).__name__}")
    per = GENERATED_PER_DATA[match] * match_memory if match is not None else 1
    need = per * match_batch_size if per > 1 else 0
    if pairs.x_0.shape[0] < need:  # (match_batch_size is set there: checked by matched_one_step_loss)
        raise ValueError(f"match={match!r} with match_memory={match_memory} draws {per} * match_batch_size = {need} "
                         f"pairs per step, but there are only {pairs.x_0.shape[0]} pairs")
    if model is None:
        if not isinstance(v_or_model, nn.Module):
            raise TypeError("distill needs model= (the student network) when the teacher is not an nn.Module")
        model = copy.deepcopy(v_or_model)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    fit = fit_pairs(model, pairs.x_0, pairs.x_1, loss_fn, steps=train_steps, batch_size=batch_size, lr=lr,
                    generator=generator, cosine=cosine, progress=progress, what="distill", checkpoints=checkpoints)
    return DistillResult(model=model.eval(), pairs=pairs, fit=fit)
