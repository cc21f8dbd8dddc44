"""A synthetic family of populations for population-conditioned flows (Meta Flow Matching,
Atanackovic et al. 2024, §5.1 "letters" experiment, rebuilt here from scratch), and the training loop.

A population is a glyph-like 2-D point cloud (strokes of a letter-like shape sampled uniformly by arc length),
rotated by ``θ``, placed at a centre ``c`` and perturbed by Gaussian noise: ``P_0 = {c + R(θ) s + σ ε}``. Its
future is a deterministic transformation of it, ``P_1 = (T_c)_# P_0`` with ``T_c(x) = c + λ R(φ) (x - c) + b``
(the population turns by ``φ`` and shrinks about its own centre, then drifts by ``b``) — observed as an
*independent* draw, so
the point-level pairing is unknown (as for cell populations). Flow matching learns ``P_0 → P_1`` per
population with the independent coupling inside each population; without the population as input, the field
can only transport the mixture of all populations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..training import train
from ..training.loss import FlowMatchingLoss
from ..training.pairs import Batch, seed_from

# Strokes in [-1, 1]²: each glyph is a list of polylines.
GLYPHS: dict[str, list[list[tuple[float, float]]]] = {
    "L": [[(-0.5, 1.0), (-0.5, -1.0), (0.7, -1.0)]],
    "T": [[(-0.9, 1.0), (0.9, 1.0)], [(0.0, 1.0), (0.0, -1.0)]],
    "V": [[(-0.8, 1.0), (0.0, -1.0), (0.8, 1.0)]],
    "Z": [[(-0.8, 1.0), (0.8, 1.0), (-0.8, -1.0), (0.8, -1.0)]],
    "X": [[(-0.8, 1.0), (0.8, -1.0)], [(-0.8, -1.0), (0.8, 1.0)]],
    "H": [[(-0.7, 1.0), (-0.7, -1.0)], [(0.7, 1.0), (0.7, -1.0)], [(-0.7, 0.0), (0.7, 0.0)]],
    "N": [[(-0.7, -1.0), (-0.7, 1.0), (0.7, -1.0), (0.7, 1.0)]],
    "E": [[(0.7, 1.0), (-0.6, 1.0), (-0.6, -1.0), (0.7, -1.0)], [(-0.6, 0.0), (0.4, 0.0)]],
    "F": [[(0.7, 1.0), (-0.6, 1.0), (-0.6, -1.0)], [(-0.6, 0.1), (0.4, 0.1)]],
    "O": [[(0.9 * math.cos(a), 0.9 * math.sin(a)) for a in torch.linspace(0, 2 * math.pi, 33).tolist()]],
    "C": [[(0.9 * math.cos(a), 0.9 * math.sin(a)) for a in torch.linspace(0.25 * math.pi, 1.75 * math.pi, 25).tolist()]],
    "Y": [[(-0.8, 1.0), (0.0, 0.0), (0.8, 1.0)], [(0.0, 0.0), (0.0, -1.0)]],
}


def glyph_points(name: str, n: int, generator: torch.Generator | None = None, *,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` points (n, 2) uniform by arc length on the strokes of glyph ``name``."""
    if name not in GLYPHS:
        raise ValueError(f"unknown glyph {name!r}; expected one of {sorted(GLYPHS)}")
    segs = torch.tensor([[*p, *q] for line in GLYPHS[name] for p, q in zip(line[:-1], line[1:])], dtype=torch.float64)
    lengths = (segs[:, 2:] - segs[:, :2]).norm(dim=-1)
    idx = torch.multinomial(lengths / lengths.sum(), n, replacement=True, generator=generator)
    u = torch.rand(n, 1, generator=generator, dtype=torch.float64)
    pts = segs[idx, :2] + u * (segs[idx, 2:] - segs[idx, :2])
    return pts.to(dtype)


def rotation(theta: Tensor) -> Tensor:
    """Rotation matrices (..., 2, 2) for angles ``theta`` (...)."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


@dataclass(frozen=True)
class PopulationFamily:
    """Populations ``P_0`` (P, n, 2) and futures ``P_1`` (P, n, 2) with their glyph names, angles ``theta``
    (P,), centres (P, 2) and labels (P, n_train_glyphs + 4): one-hot of the glyph among the training glyphs
    (all zeros for a held-out glyph), ``(cos θ, sin θ)`` and ``c`` (the metadata a condition-label model gets)."""

    sources: Tensor
    targets: Tensor
    glyphs: tuple[str, ...]
    theta: Tensor
    centres: Tensor
    labels: Tensor

    def subset(self, idx: Tensor | list[int] | slice) -> "PopulationFamily":
        """The populations ``idx``."""
        names = self.glyphs[idx] if isinstance(idx, slice) else tuple(self.glyphs[int(i)] for i in idx)
        return PopulationFamily(self.sources[idx], self.targets[idx], names, self.theta[idx], self.centres[idx],
                                self.labels[idx])


def make_populations(glyphs: list[str] | tuple[str, ...], per_glyph: int, n: int, generator: torch.Generator | None = None,
                     *, train_glyphs: list[str] | tuple[str, ...] | None = None, noise: float = 0.04,
                     scale: float = 0.6, turn: float = 0.5 * math.pi, shift: tuple[float, float] = (0.8, 0.0),
                     centre_range: float = 1.5, dtype: torch.dtype = torch.float32) -> PopulationFamily:
    """``per_glyph`` random poses of each glyph, ``n`` points each: ``θ ~ U[0, 2π)``, ``c ~ U[-r, r]²``
    (``r = centre_range``); ``P_1 = (T_c)_# P_0`` observed as an independent draw,
    ``T_c(x) = c + scale · R(turn) (x - c) + shift``."""
    train_glyphs = tuple(train_glyphs) if train_glyphs is not None else tuple(glyphs)
    if not isinstance(per_glyph, int) or per_glyph < 1 or not isinstance(n, int) or n < 1:
        raise ValueError(f"per_glyph and n must be positive integers, got {per_glyph!r}, {n!r}")
    T = scale * rotation(torch.tensor(turn, dtype=torch.float64)).to(dtype)
    b = torch.tensor(shift, dtype=dtype)
    srcs, tgts, names, thetas, centres, labels = [], [], [], [], [], []
    for name in glyphs:
        for _ in range(per_glyph):
            theta = 2 * math.pi * torch.rand((), generator=generator, dtype=torch.float64)
            c = centre_range * (2 * torch.rand(2, generator=generator, dtype=dtype) - 1)
            R = rotation(theta).to(dtype)
            p0 = glyph_points(name, n, generator, dtype=dtype) @ R.T + noise * torch.randn(n, 2, generator=generator, dtype=dtype)
            p1 = glyph_points(name, n, generator, dtype=dtype) @ R.T + noise * torch.randn(n, 2, generator=generator, dtype=dtype)
            srcs.append(c + p0)
            tgts.append(c + p1 @ T.T + b)
            names.append(name)
            thetas.append(theta)
            centres.append(c)
            onehot = torch.zeros(len(train_glyphs), dtype=dtype)
            if name in train_glyphs:
                onehot[train_glyphs.index(name)] = 1
            labels.append(torch.cat([onehot, torch.stack([torch.cos(theta), torch.sin(theta)]).to(dtype), c]))
    return PopulationFamily(torch.stack(srcs), torch.stack(tgts), tuple(names), torch.stack(thetas), torch.stack(centres),
                            torch.stack(labels))


def population_batches(sources: Tensor, targets: Tensor, conditions: Tensor | None = None, *,
                       populations_per_batch: int = 8, points_per_population: int = 64,
                       coupling: str = "independent") -> Callable[[int, torch.Generator], Batch]:
    """A batch callable for :func:`~steerflow.training.train` drawing pairs inside populations.

    Each call picks ``k = min(populations_per_batch, P)`` populations ``i`` without replacement, draws
    ``m = points_per_population`` points ``x_0 ∈ P_0^i`` and ``x_1 ∈ P_1^i`` independently and pairs them
    (``coupling``: ``independent`` as drawn, or ``ot``: the exact minibatch OT assignment within the
    population, Tong et al. 2024). The batch holds ``k·m`` pairs, population by population, with
    ``cond = conditions[pops]`` (k, ...) or None; the requested size ``n`` is not used.
    """
    if sources.ndim != 3 or targets.shape[:1] != sources.shape[:1] or targets.shape[-1] != sources.shape[-1]:
        raise ValueError(f"sources and targets must be (P, n, d) with the same P and d, got "
                         f"{tuple(sources.shape)} and {tuple(targets.shape)}")
    if conditions is not None and conditions.shape[0] != sources.shape[0]:
        raise ValueError(f"conditions must have {sources.shape[0]} rows, got {conditions.shape[0]}")
    if coupling not in ("independent", "ot"):
        raise ValueError(f"unknown coupling {coupling!r}; expected 'independent' or 'ot'")
    for name, val in (("populations_per_batch", populations_per_batch), ("points_per_population", points_per_population)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    P, n, d = sources.shape
    m, k = points_per_population, min(populations_per_batch, P)

    def draw(_: int, generator: torch.Generator) -> Batch:
        pops = torch.randperm(P, generator=generator)[:k]
        i0 = torch.randint(0, n, (k, m), generator=generator)
        i1 = torch.randint(0, targets.shape[1], (k, m), generator=generator)
        if coupling == "ot":
            i1 = _ot_pairing(sources[pops], targets[pops], i0, i1)
        x_0 = torch.gather(sources[pops], 1, i0[..., None].expand(-1, -1, d)).reshape(k * m, d)
        x_1 = torch.gather(targets[pops], 1, i1[..., None].expand(-1, -1, d)).reshape(k * m, d)
        return Batch(x_0, x_1, None if conditions is None else conditions[pops])

    return draw


def train_population_flow(model: nn.Module, sources: Tensor, targets: Tensor, conditions: Tensor | None = None, *,
                          steps: int = 2000, populations_per_batch: int = 8, points_per_population: int = 64,
                          lr: float = 1e-3, coupling: str = "independent", generator: torch.Generator | None = None,
                          log: list | None = None) -> nn.Module:
    """Flow matching inside each population (Meta Flow Matching, Atanackovic et al. 2024, Alg. 1).

    Each step draws pairs inside ``populations_per_batch`` populations (:func:`population_batches`), forms
    ``x_t = t x_1 + (1 - t) x_0`` and regresses ``model(x_t, t, c_i)`` on ``x_1 - x_0`` with the squared error
    summed over the state's entries (:class:`~steerflow.training.FlowMatchingLoss` with ``reduction="sum"``),
    by :func:`~steerflow.training.train` at the constant learning rate ``lr``.
    ``conditions`` (P, ...) gives ``c_i``: the source populations themselves (Meta FM), labels (condition-label
    FM) or ``None`` (plain FM, ``model(x_t, t)``). ``generator`` seeds the run (one draw; torch's global RNG
    when None); ``log`` (a list), when given, receives the loss of every step.
    """
    draw = population_batches(sources, targets, conditions, populations_per_batch=populations_per_batch,
                              points_per_population=points_per_population, coupling=coupling)
    k = min(populations_per_batch, sources.shape[0])
    p = next(model.parameters(), None)
    res = train(model, draw, loss=FlowMatchingLoss("linear", reduction="sum"), steps=steps,
                batch_size=k * points_per_population, lr=lr, lr_schedule="constant", seed=seed_from(generator),
                device=p.device if p is not None else "cpu", progress=False, distributed=False)
    if log is not None:
        log.extend(res.losses.tolist())
    model.eval()
    return model


def _ot_pairing(src: Tensor, tgt: Tensor, i0: Tensor, i1: Tensor) -> Tensor:
    """Reorder the target indices ``i1`` (k, m) so that each population's pairs are its exact W2 assignment."""
    from scipy.optimize import linear_sum_assignment

    out = i1.clone()
    for j in range(i0.shape[0]):
        C = torch.cdist(src[j, i0[j]].double(), tgt[j, i1[j]].double()).pow(2)
        _, col = linear_sum_assignment(C.numpy())
        out[j] = i1[j, torch.as_tensor(col)]
    return out


def assignment_wasserstein(a: Tensor, b: Tensor, p: float = 2.0) -> Tensor:
    """Exact ``W_p`` between two equal-size uniform point clouds a, b (n, d) by optimal assignment
    (Hungarian algorithm; for uniform weights the OT plan is a permutation, Birkhoff–von Neumann)."""
    from scipy.optimize import linear_sum_assignment

    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"a and b must be point clouds of the same shape (n, d), got {tuple(a.shape)}, {tuple(b.shape)}")
    C = torch.cdist(a.double(), b.double()).pow(p)
    r, c = linear_sum_assignment(C.numpy())
    return C[r, c].mean().pow(1 / p)


__all__ = ["GLYPHS", "glyph_points", "rotation", "PopulationFamily", "make_populations", "population_batches",
           "train_population_flow", "assignment_wasserstein"]
