"""Training batches: the one ``anything -> sampler(n, generator)`` adapter (:func:`as_sampler`), the
:class:`Batch` a loss sees, the draws of :func:`~steerflow.training.train`'s data (:func:`make_draw`: data
with a source, fixed pairs, batch callables) and the stream of coupled pairs, optionally coupled ahead in
threads.

Per step the loop needs ``x_1 ~ data``, ``x_0 ~ source`` and, with a coupling, the re-paired batch
``(x_0, x_1) ← coupling(x_0, x_1)``. Exact minibatch OT is a large part of a small model's step (≈ 2 ms
for the compiled solver, ≈ 4 ms for POT's network simplex, against ≈ 1 ms of forward/backward at batch 256 on
one CPU core), and both solvers release the GIL, so ``workers > 0`` couples the next ``workers`` batches in
background threads while the current step trains.

Reproducibility does not depend on ``workers``: batches are drawn in step order from the pair
generators, each coupling gets its own generator seeded from them, and the loop draws ``t`` from a
separate generator — so ``workers = 0, 1, 2, …`` give bit-identical loss traces. For exact resume the
stream remembers the pair generators' state before each batch still in flight; a checkpoint stores
that state, so the batches drawn ahead are drawn again after a resume.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

_SEED_HIGH = 2**62

Sampler = Callable[[int, torch.Generator], Any]


@dataclass(frozen=True)
class Batch:
    """One step's training batch: source ``x_0`` and target ``x_1`` (b, *d), and the model's ``cond`` (labels
    (b,), or anything the model takes as its third argument) or None."""

    x_0: Tensor
    x_1: Tensor
    cond: Any = None


_NORMAL_NAMES = ("normal", "gaussian", "standard_normal", "noise")


def as_sampler(obj: Any, shape: tuple[int, ...] | None = None, *, labels: bool = False) -> Sampler:
    """Turn ``obj`` into a sampler ``(n, generator) -> x`` (n, *d): the one adapter every trainer uses.

    Accepts
      * a name: ``"normal"`` (``N(0, I)``, needs ``shape``) or a toy density of :mod:`steerflow.data`;
      * a tensor (N, *d): rows drawn uniformly with replacement from ``generator``;
      * an object with ``.sample(n, generator)`` (a :class:`~steerflow.data.GaussianMixture`, a dataset);
      * a callable ``(n, generator)``.

    A draw that returns ``(x, labels)`` gives ``x`` alone unless ``labels=True``; then it is passed on as it
    is (a callable is then returned unchanged).
    """
    if isinstance(obj, str):
        if obj.lower() in _NORMAL_NAMES:
            if shape is None:
                raise ValueError(f"source {obj!r} needs the sample shape (shape=(d,) or (c, h, w))")
            shape_ = tuple(int(s) for s in shape)
            return lambda n, generator=None: torch.randn(n, *shape_, generator=generator)
        from ..data import sample_toy  # the toy registry validates the name

        return lambda n, generator=None: sample_toy(obj, n, generator=generator)
    if torch.is_tensor(obj):
        if obj.ndim < 1 or obj.shape[0] < 1:
            raise ValueError(f"a data tensor must have shape (N, *d) with N >= 1, got {tuple(obj.shape)}")
        table = obj.detach()

        def draw_rows(n: int, generator: torch.Generator | None = None) -> Tensor:
            return table[torch.randint(0, table.shape[0], (n,), generator=generator).to(table.device)]

        return draw_rows
    if hasattr(obj, "sample") and callable(obj.sample):
        draw = obj.sample
    elif callable(obj):
        if labels:
            return obj
        draw = obj
    else:
        raise TypeError(f"expected a name, a tensor (N, *d), a callable (n, generator) or an object with "
                        f".sample(n, generator); got {type(obj).__name__}")

    def draw_x(n: int, generator: torch.Generator | None = None) -> Any:
        out = draw(n, generator)
        if labels:
            return out
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not torch.is_tensor(out):
            raise TypeError(f"the sampler (n, generator) must return a tensor (n, *d) or (x, labels), got "
                            f"{type(out).__name__}")
        return out

    return draw_x


def seed_from(generator: torch.Generator | None) -> int:
    """A training seed drawn from ``generator`` (torch's global RNG when None): one draw, so a caller's
    generator keeps giving reproducible runs and advances as after any other random call."""
    return int(torch.randint(_SEED_HIGH, (1,), generator=generator))


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


def _checked_table(x: Tensor, what: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A whole data tensor (N, *d), checked once (real, finite) and moved to the training device and dtype."""
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"{what} must have shape (N, *d) with N >= 1, got {tuple(x.shape)}")
    _check_data_dtype(x.dtype, f"the {what}")
    i = _first_non_finite(x)
    if i is not None:
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"the {what} holds {n_bad} non-finite value{'s' * (n_bad != 1)} (NaN/inf), "
                         f"the first in sample {i} of {x.shape[0]}; flow matching needs finite data")
    return x.to(device=device, dtype=dtype)


def _is_pairs(data: Any) -> bool:
    """Fixed pairs: an object with tensors ``x_0``/``x_1`` (e.g. reflow's ``Pairs``), or a tuple
    ``(x_0, x_1[, cond])`` of equal-shape tensors (a ``(x, labels)`` pair has labels of shape (N,) instead)."""
    if not hasattr(data, "sample") and torch.is_tensor(getattr(data, "x_0", None)) \
            and torch.is_tensor(getattr(data, "x_1", None)):
        return True
    return (isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(torch.is_tensor(a) for a in data)
            and data[0].ndim >= 2 and data[0].shape == data[1].shape)


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
            self.x = _checked_table(x, "data tensor", device, dtype)
            self.labels = None if labels is None else labels.to(device)
        elif hasattr(data, "sample") and callable(data.sample):
            self.obj = data
        else:
            raise TypeError("data must be a tensor (N, *d), a (tensor, labels) pair, fixed pairs (x_0, x_1), an "
                            "object with .sample(n, generator) or a batch callable (n, generator) -> (x_0, x_1); "
                            f"got {type(data).__name__}")
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


def _pairs_draw(data: Any, dev: torch.device, dtype: torch.dtype, gen_dev: torch.Generator) -> Callable[[int], Batch]:
    """Minibatches of fixed pairs: one index set ``i`` (drawn on the device) picks ``(x_0[i], x_1[i], cond[i])``."""
    if isinstance(data, (tuple, list)):
        x_0, x_1, cond = (*data, None) if len(data) == 2 else data
    else:
        x_0, x_1, cond = data.x_0, data.x_1, getattr(data, "cond", None)
    if x_0.shape != x_1.shape:
        raise ValueError(f"fixed pairs x_0 and x_1 must have the same shape, got {tuple(x_0.shape)} and "
                         f"{tuple(x_1.shape)}")
    if cond is not None and (not torch.is_tensor(cond) or cond.shape[:1] != x_0.shape[:1]):
        raise ValueError(f"the pairs' cond must be a tensor with {x_0.shape[0]} rows, got "
                         f"{tuple(getattr(cond, 'shape', ()))}")
    x_0 = _checked_table(x_0, "pairs' x_0", dev, dtype)
    x_1 = _checked_table(x_1, "pairs' x_1", dev, dtype)
    cond = None if cond is None else cond.to(dev)

    def draw(n: int) -> Batch:
        idx = torch.randint(x_0.shape[0], (n,), generator=gen_dev, device=dev)
        return Batch(x_0[idx], x_1[idx], None if cond is None else cond[idx])

    return draw


def _callable_draw(data: Callable[..., Any], dev: torch.device, dtype: torch.dtype, gen_host: torch.Generator,
                   coupling: Any) -> Callable[[int], Any]:
    """Batches from ``data(n, generator)`` (CPU generator): a tuple ``(x_0, x_1[, cond])`` or a :class:`Batch`
    becomes a :class:`Batch` on the training device (floating tensors in the model's dtype); any other object
    goes to the loss as it is."""
    step = 0

    def draw(n: int) -> Any:
        nonlocal step
        step += 1
        out = data(n, gen_host)
        if isinstance(out, (tuple, list)) and len(out) in (2, 3) and torch.is_tensor(out[0]) and torch.is_tensor(out[1]):
            out = Batch(*out)
        if not isinstance(out, Batch):
            if coupling is not None:
                raise TypeError(f"a coupling re-pairs (x_0, x_1) batches; the batch callable returned a "
                                f"{type(out).__name__}")
            return out
        for name, x in (("x_0", out.x_0), ("x_1", out.x_1)):
            _check_data_dtype(x.dtype, f"the batch callable's {name}")
            if x.device.type == "cpu" and _first_non_finite(x) is not None:
                raise ValueError(f"the batch callable returned non-finite values (NaN/inf) in {name} of the batch "
                                 f"for step {step}; training needs finite data")
        cond = out.cond.to(dev, non_blocking=True) if torch.is_tensor(out.cond) else out.cond
        return Batch(out.x_0.to(dev, dtype=dtype, non_blocking=True), out.x_1.to(dev, dtype=dtype, non_blocking=True),
                     cond)

    return draw


def make_draw(data: Any, source: Any, coupling: Any, batch_size: int, dev: torch.device, dtype: torch.dtype,
               gen_host: torch.Generator, gen_dev: torch.Generator) -> tuple[Callable[[int], Any], Any]:
    """``draw(n) -> batch`` for any accepted ``data``, and the object whose ``step`` counts the batches drawn
    (None when nothing needs it)."""
    pairs = _is_pairs(data)
    if (pairs or (callable(data) and not hasattr(data, "sample") and not torch.is_tensor(data))) and source is not None:
        raise ValueError("source= draws x_0 for data that gives x_1 only; fixed pairs and batch callables give "
                         "x_0 themselves")
    if pairs:
        return _pairs_draw(data, dev, dtype, gen_dev), None
    if callable(data) and not hasattr(data, "sample") and not torch.is_tensor(data) and not isinstance(data, nn.Module):
        return _callable_draw(data, dev, dtype, gen_host, coupling), None
    batches = _Batches(data, dev, dtype, gen_host, gen_dev)

    def draw(n: int) -> Batch:
        x_1, labels = batches(n)
        if source is None:
            x_0 = torch.randn(x_1.shape, generator=gen_dev, device=dev, dtype=x_1.dtype)
        else:
            x_0 = source(batch_size, gen_host).to(dev, dtype=x_1.dtype, non_blocking=True)
        return Batch(x_0, x_1, labels)

    return draw, batches


def couple(coupling: Any, x_0: Tensor, x_1: Tensor, labels: Tensor | None,
           generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Apply ``coupling(x_0, x_1, labels=, generator=)`` and check it kept the batch shapes."""
    out = coupling(x_0, x_1, labels=labels, generator=generator)
    if isinstance(out, (tuple, list)):
        new_0, new_1 = out[0], out[1]
    else:
        new_0, new_1 = out.x_0, out.x_1
    if new_0.shape != x_0.shape or new_1.shape != x_1.shape:
        raise ValueError(f"coupling changed the batch shapes: {tuple(x_0.shape)}, {tuple(x_1.shape)} -> "
                         f"{tuple(new_0.shape)}, {tuple(new_1.shape)}")
    return new_0, new_1


class PairStream:
    """Yields a step's batch in step order: a :class:`Batch`, coupled, or what a batch callable returned.

    Args:
        draw: ``draw(n) -> Batch | object`` on the training device (uses the pair generators).
        coupling: the coupling (applied to a :class:`Batch`'s ``x_0, x_1``) or None.
        batch_size: samples per batch.
        gen_host, gen_dev: the pair generators (the same object on CPU).
        workers: batches coupled ahead in background threads (0: inline; an int ``>= 0``, checked by ``train``).
        total: how many batches the run will take (nothing is drawn past it).
    """

    def __init__(self, draw: Callable[[int], Any], coupling: Any, batch_size: int, gen_host: torch.Generator,
                 gen_dev: torch.Generator, workers: int = 0, total: int | None = None) -> None:
        self.draw, self.coupling = draw, coupling
        self.batch_size, self.gen_host, self.gen_dev = batch_size, gen_host, gen_dev
        self.workers = workers if coupling is not None else 0
        self.pool = (ThreadPoolExecutor(self.workers, thread_name_prefix="steerflow-coupling")
                     if self.workers else None)
        self.ahead: deque[tuple[list[Tensor], Future]] = deque()
        self.undrawn = total

    def _pair_states(self) -> list[Tensor]:
        states = [self.gen_host.get_state()]
        if self.gen_dev is not self.gen_host:
            states.append(self.gen_dev.get_state())
        return states

    def _draw(self) -> tuple[Any, torch.Generator | None]:
        if self.undrawn is not None:
            self.undrawn -= 1
        batch = self.draw(self.batch_size)
        gen = None
        if self.coupling is not None:
            seed = int(torch.randint(_SEED_HIGH, (1,), generator=self.gen_host))
            gen = torch.Generator(batch.x_0.device).manual_seed(seed)
        return batch, gen

    def _couple(self, batch: Batch, gen: torch.Generator | None) -> Batch:
        x_0, x_1 = couple(self.coupling, batch.x_0, batch.x_1, batch.cond, gen)
        return Batch(x_0, x_1, batch.cond)

    def next(self) -> Any:
        """The next step's batch, coupled."""
        if self.pool is None:
            batch, gen = self._draw()
            return batch if self.coupling is None else self._couple(batch, gen)
        # keep `workers` batches coupling while this step trains
        while len(self.ahead) < self.workers + 1 and (self.undrawn is None or self.undrawn > 0):
            states = self._pair_states()
            batch, gen = self._draw()
            self.ahead.append((states, self.pool.submit(self._couple, batch, gen)))
        _, future = self.ahead.popleft()
        return future.result()

    def resume_states(self) -> list[Tensor]:
        """The pair generators' state (host[, device]) to store in a checkpoint: before the oldest batch drawn
        ahead, or the current state when none is in flight."""
        return [s.clone() for s in self.ahead[0][0]] if self.ahead else self._pair_states()

    def close(self) -> None:
        """Drop the batches drawn ahead and stop the threads."""
        for _, future in self.ahead:
            future.cancel()
        self.ahead.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
