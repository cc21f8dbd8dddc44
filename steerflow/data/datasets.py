"""Datasets: a finite set of arrays (``ArrayDataset``) and a toy density that samples afresh (``ToyDataset``).

Both answer ``sample(n, generator)`` (a minibatch), ``shape``, ``len()`` and ``split(fractions, generator)``,
so training code does not care whether data come from a file or from a formula.
"""
from __future__ import annotations

import abc
import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .toys import TOYS, sample_toy


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")


def _split_sizes(fractions: Sequence[float], total: int) -> list[int]:
    """Integer sizes summing to ``total``, proportional to ``fractions`` (largest-remainder rounding)."""
    fr = [float(f) for f in fractions]
    if not fr or any(not (f >= 0 and math.isfinite(f)) for f in fr):
        raise ValueError(f"fractions must be non-negative finite numbers, got {list(fractions)}")
    if abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {list(fractions)} (sum {sum(fr)})")
    exact = [f * total for f in fr]
    sizes = [math.floor(e) for e in exact]
    order = sorted(range(len(fr)), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in order[: total - sum(sizes)]:
        sizes[i] += 1
    return sizes


class AbstractDataset(abc.ABC):
    """What a dataset provides: minibatches ``sample(n, generator)``, ``shape`` (N, *d), ``len()``, ``split``."""

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None):
        """A minibatch of ``n`` items: a tensor (n, *d), or ``(x, labels)`` for labelled data."""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """``(N, *d)``: number of items and the shape of one item."""

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The shape ``d`` of one item."""
        return tuple(self.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    @abc.abstractmethod
    def split(self, fractions: Sequence[float] = (0.8, 0.1, 0.1),
              generator: torch.Generator | None = None) -> tuple["AbstractDataset", ...]:
        """Disjoint parts with sizes proportional to ``fractions`` (which sum to 1)."""


class ArrayDataset(AbstractDataset):
    """A finite dataset held in memory: ``x`` (N, *d) floating point, optional integer ``labels`` (N,).

    Args:
        x: tensor or numpy array (N, *d), N ≥ 1, finite. Integer arrays are cast to float32.
        labels: optional (N,) integer class labels.
        classes: optional names of the label values (``classes[label]``), e.g. image sub-folder names.
    """

    def __init__(self, x, labels=None, *, classes: Sequence[str] | None = None) -> None:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor or numpy array, got {type(x).__name__}")
        if x.ndim < 2 or x.shape[0] < 1:
            raise ValueError(f"x must have shape (N, *d) with N >= 1 (use x[:, None] for scalars), "
                             f"got {tuple(x.shape)}")
        if not x.is_floating_point():
            if x.dtype == torch.bool or x.is_complex():
                raise TypeError(f"x must be real numeric, got {x.dtype}")
            x = x.to(torch.float32)
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).sum())
            raise ValueError(f"x holds NaN or inf in {bad} of {x.shape[0]} items")
        if labels is not None:
            if isinstance(labels, np.ndarray):
                labels = torch.from_numpy(np.ascontiguousarray(labels))
            labels = torch.as_tensor(labels)
            if labels.shape != (x.shape[0],):
                raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
            if labels.is_floating_point():
                if not torch.equal(labels, labels.round()):
                    raise ValueError("labels must be integers")
            labels = labels.to(torch.long)
        self.x = x
        self.labels = labels
        self.classes = tuple(classes) if classes is not None else None

    def __repr__(self) -> str:
        lab = "" if self.labels is None else f", labels={int(self.labels.max()) + 1} classes"
        return f"ArrayDataset(shape={tuple(self.x.shape)}, dtype={self.x.dtype}{lab})"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape)

    def __getitem__(self, i):
        return self.x[i] if self.labels is None else (self.x[i], self.labels[i])

    def sample(self, n: int, generator: torch.Generator | None = None, *, replace: bool = True):
        """``n`` items drawn uniformly, with replacement by default (without: ``n ≤ N`` distinct items).

        Returns ``x`` (n, *d), or ``(x, labels)`` when the dataset is labelled.
        """
        _check_n(n)
        N = self.x.shape[0]
        if replace:
            idx = torch.randint(0, N, (n,), generator=generator)
        else:
            if n > N:
                raise ValueError(f"cannot draw {n} distinct items from a dataset of {N}")
            idx = torch.randperm(N, generator=generator)[:n]
        idx = idx.to(self.x.device)
        return self[idx]

    def split(self, fractions: Sequence[float] = (0.8, 0.1, 0.1),
              generator: torch.Generator | None = None) -> tuple["ArrayDataset", ...]:
        """Random disjoint parts (e.g. train/val/test) with sizes ``≈ fraction · N`` summing to ``N``."""
        sizes = _split_sizes(fractions, self.x.shape[0])
        if min(sizes) < 1:
            raise ValueError(f"fractions {list(fractions)} of {self.x.shape[0]} items leave an empty part "
                             f"(sizes {sizes})")
        perm = torch.randperm(self.x.shape[0], generator=generator).to(self.x.device)
        parts, start = [], 0
        for s in sizes:
            idx = perm[start:start + s]
            parts.append(ArrayDataset(self.x[idx], None if self.labels is None else self.labels[idx],
                                      classes=self.classes))
            start += s
        return tuple(parts)


class ToyDataset(AbstractDataset):
    """A 2-D toy density (:data:`~steerflow.data.toys.TOYS`) that draws fresh samples on every call.

    ``size`` is only the nominal ``len()`` (an epoch length); any number of samples can be drawn. Parts
    returned by :meth:`split` are independent because every call samples afresh.
    """

    def __init__(self, name: str, size: int = 10_000) -> None:
        if name not in TOYS:
            raise ValueError(f"unknown toy {name!r}; expected one of {sorted(TOYS)}")
        _check_n(size)
        self.name, self.size = name, size

    def __repr__(self) -> str:
        return f"ToyDataset({self.name!r}, size={self.size})"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.size, 2)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` fresh samples (n, 2) float32."""
        return sample_toy(self.name, n, generator)

    def split(self, fractions: Sequence[float] = (0.8, 0.1, 0.1),
              generator: torch.Generator | None = None) -> tuple["ToyDataset", ...]:
        """Toy datasets of nominal sizes ``≈ fraction · size`` (fresh samples make them independent)."""
        sizes = _split_sizes(fractions, self.size)
        if min(sizes) < 1:
            raise ValueError(f"fractions {list(fractions)} of size {self.size} leave an empty part (sizes {sizes})")
        return tuple(ToyDataset(self.name, s) for s in sizes)

    def to_array(self, n: int | None = None, generator: torch.Generator | None = None) -> ArrayDataset:
        """A fixed :class:`ArrayDataset` of ``n`` (default ``size``) samples."""
        return ArrayDataset(self.sample(self.size if n is None else n, generator))
