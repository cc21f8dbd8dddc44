"""Reflow: k-rectified flow (Liu, Gong & Liu 2022, "Flow Straight and Fast", §2.2, Algorithm 1).

Given a flow ``v`` that transports ``π_0`` to ``π_1``, draw ``x_0 ~ π_0`` and solve the ODE to get
``x_1 = ODE_v(x_0)``. The coupling ``(x_0, x_1)`` is deterministic, so a new flow trained on it with the
linear path

    min_θ  E_{t ~ U[0,1], (x_0, x_1)} || v_θ(t x_1 + (1 - t) x_0, t) - (x_1 - x_0) ||²

has straighter trajectories than ``v`` (Theorem 3.7: the transport cost does not increase, and the
straightness ``S(Z) = ∫ E||(x_1 - x_0) - v(x_t, t)||² dt`` of the k-rectified flow decays as ``O(1/k)``).
Iterating ``k`` times gives the k-rectified flow; ``k = 1`` applied to a 1-RF gives 2-RF.

The pairs are generated once (batched, without gradients, seeded) and kept fixed during training.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..paths import AffinePath, get_path
from ..solvers import sample
from ..training.loss import flow_matching_loss
from ..training.pairs import as_sampler
from ._fit import FitCheckpoints, FitResult, check_fit_args, fit_pairs

__all__ = ["Pairs", "ReflowResult", "as_source", "generate_pairs", "pairs_flow_loss", "fit_flow", "reflow"]

Source = Callable[[int, torch.Generator], Tensor]


@dataclass(frozen=True)
class Pairs:
    """A fixed coupling: ``x_0`` (n, *d) source points and ``x_1`` (n, *d) = ``ODE_v(x_0)``."""

    x_0: Tensor
    x_1: Tensor

    def __post_init__(self) -> None:
        if self.x_0.shape != self.x_1.shape:
            raise ValueError(f"pairs must have equal shapes, got {tuple(self.x_0.shape)} and {tuple(self.x_1.shape)}")

    def __len__(self) -> int:
        return self.x_0.shape[0]

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``x_0``/``x_1`` to a safetensors file atomically (temp file + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"x_0": self.x_0.detach().cpu().contiguous(), "x_1": self.x_1.detach().cpu().contiguous()}, str(tmp))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Pairs":
        """Read pairs written by :meth:`save`."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no pairs file at {str(path)!r}")
        try:
            d = load_file(str(path))
        except Exception as e:
            raise ValueError(f"{str(path)!r} is not a readable pairs file ({type(e).__name__}: {e})") from None
        if set(d) != {"x_0", "x_1"}:
            raise ValueError(f"{str(path)!r} must hold tensors 'x_0' and 'x_1', found {sorted(d)}")
        return cls(d["x_0"], d["x_1"])


@dataclass(frozen=True)
class ReflowResult:
    """The k-rectified flow ``model``, the last pair set ``pairs``, and one :class:`FitResult` per round."""

    model: nn.Module
    pairs: Pairs
    fits: tuple[FitResult, ...]

    @property
    def losses(self) -> tuple[float, ...]:
        return tuple(v for f in self.fits for v in f.losses)


def as_source(source: Any, shape: tuple[int, ...] | None = None) -> Source:
    """Turn ``source`` into a sampler ``(n, generator) -> (n, *d)``
    (:func:`steerflow.training.as_sampler`, the library's one adapter).

    Accepts a callable ``(n, generator)``, an object with ``.sample(n, generator)`` (a
    :class:`~steerflow.data.GaussianMixture`, a dataset), a tensor (rows drawn with replacement),
    ``"normal"``/``"gaussian"`` (needs ``shape``), or the name of a toy density from :mod:`steerflow.data`
    (e.g. ``"8gaussians"``).
    """
    return as_sampler(source, shape, labels=True)


def _model_device_dtype(v: Any) -> tuple[torch.device, torch.dtype | None]:
    """A module's parameter device and dtype; CPU and "keep the input dtype" for other fields."""
    if isinstance(v, nn.Module):
        p = next(v.parameters(), None)
        if p is not None:
            return p.device, p.dtype
    return torch.device("cpu"), None


@torch.no_grad()
def generate_pairs(v: Callable[..., Tensor], source: Any, n_pairs: int, *, steps: int | None = None,
                   method: str = "dopri5", ts: Tensor | None = None, batch_size: int = 4096,
                   generator: torch.Generator | None = None, shape: tuple[int, ...] | None = None,
                   x_0: Tensor | None = None, cond: Any = None, progress: bool = False) -> Pairs:
    """Draw ``x_0 ~ π_0`` and solve ``dx/dt = v(x, t)`` from ``t = 0`` to ``1``: the pairs ``(x_0, ODE_v(x_0))``.

    Args:
        v: velocity field ``v(x, t)`` (a model in eval mode, or an exact field such as
            ``GaussianMixture.velocity``).
        source: the source ``π_0`` (see :func:`as_source`); ignored when ``x_0`` is given.
        n_pairs: number of pairs ``n``.
        steps, method, ts: the ODE solve (default adaptive ``dopri5``, as Liu et al. use RK45).
        batch_size: solve this many points at a time (bounds memory).
        generator: randomness of ``x_0``; a seed gives the same pairs every time.
        x_0: explicit source points (n, *d) instead of sampling.
        progress: show a progress bar over the batches solved.

    Returns:
        :class:`Pairs` with ``x_0``, ``x_1`` of shape (n, *d) on the CPU.
    """
    if not isinstance(n_pairs, int) or isinstance(n_pairs, bool) or n_pairs < 1:
        raise ValueError(f"n_pairs must be a positive integer, got {n_pairs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device, dtype = _model_device_dtype(v)
    if x_0 is None:
        x_0 = as_source(source, shape)(n_pairs, generator)
    elif x_0.shape[0] != n_pairs:
        raise ValueError(f"x_0 holds {x_0.shape[0]} points but n_pairs={n_pairs}")
    if dtype is not None:
        x_0 = x_0.to(dtype=dtype)
    was_training = isinstance(v, nn.Module) and v.training
    if isinstance(v, nn.Module):
        v.eval()
    try:
        out = []
        starts = range(0, n_pairs, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="pairs", unit="batch", leave=False)
        for i in starts:
            xb = x_0[i:i + batch_size].to(device)
            out.append(sample(v, xb, steps=steps, ts=ts, method=method, generator=generator, cond=cond).cpu())
    finally:
        if was_training:
            v.train()
    return Pairs(x_0=x_0.cpu(), x_1=torch.cat(out).to(x_0.dtype))


def pairs_flow_loss(path: AffinePath) -> Callable[[nn.Module, Tensor, Tensor, torch.Generator], Tensor]:
    """The conditional flow-matching loss of :func:`steerflow.training.flow_matching_loss` on given pairs,
    with ``t ~ U[0, 1]`` drawn from the fit's generator (Liu et al. 2022, eq. 1)."""

    def loss(model: nn.Module, x_0: Tensor, x_1: Tensor, generator: torch.Generator) -> Tensor:
        t = torch.rand(x_0.shape[0], generator=generator).to(device=x_0.device, dtype=x_0.dtype)
        return flow_matching_loss(model, x_0, x_1, t, path=path)

    return loss


def fit_flow(model: nn.Module, pairs: Pairs, *, steps: int, batch_size: int = 256, lr: float = 1e-3,
             path: str | AffinePath = "linear", generator: torch.Generator | None = None, cosine: bool = True,
             progress: bool = False, checkpoints: FitCheckpoints | None = None) -> FitResult:
    """Train ``model`` in place by flow matching on the fixed ``pairs`` (see :func:`pairs_flow_loss`;
    ``checkpoints``: see :func:`~steerflow.straighten._fit.fit_pairs`)."""
    path = path if isinstance(path, AffinePath) else get_path(path)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return fit_pairs(model, pairs.x_0, pairs.x_1, pairs_flow_loss(path), steps=steps, batch_size=batch_size,
                     lr=lr, generator=generator, cosine=cosine, progress=progress, what="reflow",
                     checkpoints=checkpoints)


def reflow(v_or_model: Callable[..., Tensor], *, source: Any, n_pairs: int = 20000, steps: int | None = None,
           method: str = "dopri5", train_steps: int = 5000, batch_size: int = 256, lr: float = 1e-3,
           iterations: int = 1, model: nn.Module | None = None, path: str | AffinePath = "linear",
           shape: tuple[int, ...] | None = None, generator: torch.Generator | None = None, seed: int | None = None,
           cosine: bool = True, progress: bool = False, checkpoints: FitCheckpoints | None = None) -> ReflowResult:
    """Rectify a flow ``iterations`` times: ``(k+1)``-RF = flow matching on the pairs of ``k``-RF.

    Each round draws ``n_pairs`` fresh ``x_0 ~ source``, solves the current flow to get ``x_1``
    (:func:`generate_pairs`) and trains the next flow on the fixed pairs for ``train_steps`` steps
    (:func:`fit_flow`). Liu et al. (2022, §4) initialise the (k+1)-RF with the k-RF's weights; so does
    this function when ``v_or_model`` is an ``nn.Module`` and ``model`` is not given (the input is not
    modified: a copy is trained).

    Args:
        v_or_model: the k-rectified flow (a model, or any velocity field ``v(x, t)``).
        source: ``π_0`` (see :func:`as_source`).
        n_pairs: pairs per round.
        steps, method: the ODE solve used to make pairs (default adaptive ``dopri5``).
        train_steps, batch_size, lr: Adam on the pair set (cosine-annealed when ``cosine``).
        iterations: number of rounds ``k``.
        model: the network to train (required when ``v_or_model`` is not an ``nn.Module``).
        path: the probability path used for training (Liu et al.: ``linear``).
        generator / seed: all randomness (pairs, minibatches, times).
        checkpoints: a :class:`~steerflow.straighten._fit.FitCheckpoints`: a log and checkpoints in its
            directory, round ``r`` covering the steps ``r * train_steps + 1 .. (r + 1) * train_steps``; with
            ``resume`` the rounds done are skipped and the one in progress continues on its stored pairs, bit
            for bit.

    Returns:
        :class:`ReflowResult` ``(model, pairs, fits)``.
    """
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    check_fit_args(train_steps, batch_size, lr)
    if model is None:
        if not isinstance(v_or_model, nn.Module):
            raise TypeError("reflow of a plain velocity field needs model= (the network to train)")
        model = copy.deepcopy(v_or_model)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    teacher: Callable[..., Tensor] = v_or_model
    fits = []
    pairs = None
    for r in range(iterations):
        ck = checkpoints.at(r, r * train_steps) if checkpoints is not None else None
        if ck is not None and ck.finished_before():  # resumed in a later round
            fits.append(ck.past_fit(train_steps))
            continue
        stored = ck.stored_pairs() if ck is not None else None
        pairs = (Pairs(*stored) if stored is not None else
                 generate_pairs(teacher, source, n_pairs, steps=steps, method=method, generator=generator, shape=shape,
                                progress=progress))
        fits.append(fit_flow(model, pairs, steps=train_steps, batch_size=batch_size, lr=lr, path=path,
                             generator=generator, cosine=cosine, progress=progress, checkpoints=ck))
        teacher = copy.deepcopy(model).eval()
    return ReflowResult(model=model.eval(), pairs=pairs, fits=tuple(fits))
