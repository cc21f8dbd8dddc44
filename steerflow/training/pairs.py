"""The stream of coupled training pairs ``(x_0, x_1, labels)``, optionally coupled ahead in threads.

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
from typing import Any, Callable

import torch
from torch import Tensor

_SEED_HIGH = 2**62


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
    """Yields coupled batches ``(x_0, x_1, labels)`` in step order.

    Args:
        draw_x1: ``draw_x1(n) -> (x_1, labels)`` on the training device (uses the pair generators).
        draw_x0: ``draw_x0(x_1) -> x_0`` (uses the pair generators).
        coupling: the coupling or None.
        batch_size: samples per batch.
        gen_host, gen_dev: the pair generators (the same object on CPU).
        workers: batches coupled ahead in background threads (0: inline; an int ``>= 0``, checked by ``train``).
        total: how many batches the run will take (nothing is drawn past it).
    """

    def __init__(self, draw_x1: Callable[[int], tuple[Tensor, Tensor | None]], draw_x0: Callable[[Tensor], Tensor],
                 coupling: Any, batch_size: int, gen_host: torch.Generator, gen_dev: torch.Generator,
                 workers: int = 0, total: int | None = None) -> None:
        self.draw_x1, self.draw_x0, self.coupling = draw_x1, draw_x0, coupling
        self.batch_size, self.gen_host, self.gen_dev = batch_size, gen_host, gen_dev
        self.workers = workers if coupling is not None else 0
        self.pool = (ThreadPoolExecutor(self.workers, thread_name_prefix="steerflow-coupling")
                     if self.workers else None)
        self.ahead: deque[tuple[list[Tensor], Future, Tensor | None]] = deque()
        self.undrawn = total

    def _pair_states(self) -> list[Tensor]:
        states = [self.gen_host.get_state()]
        if self.gen_dev is not self.gen_host:
            states.append(self.gen_dev.get_state())
        return states

    def _draw(self) -> tuple[Tensor, Tensor, Tensor | None, torch.Generator | None]:
        if self.undrawn is not None:
            self.undrawn -= 1
        x_1, labels = self.draw_x1(self.batch_size)
        x_0 = self.draw_x0(x_1)
        gen = None
        if self.coupling is not None:
            seed = int(torch.randint(_SEED_HIGH, (1,), generator=self.gen_host))
            gen = torch.Generator(x_0.device).manual_seed(seed)
        return x_0, x_1, labels, gen

    def next(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The next step's ``(x_0, x_1, labels)``, coupled."""
        if self.pool is None:
            x_0, x_1, labels, gen = self._draw()
            if self.coupling is not None:
                x_0, x_1 = couple(self.coupling, x_0, x_1, labels, gen)
            return x_0, x_1, labels
        # keep `workers` batches coupling while this step trains
        while len(self.ahead) < self.workers + 1 and (self.undrawn is None or self.undrawn > 0):
            states = self._pair_states()
            x_0, x_1, labels, gen = self._draw()
            self.ahead.append((states, self.pool.submit(couple, self.coupling, x_0, x_1, labels, gen), labels))
        _, future, labels = self.ahead.popleft()
        x_0, x_1 = future.result()
        return x_0, x_1, labels

    def resume_states(self) -> list[Tensor]:
        """The pair generators' state (host[, device]) to store in a checkpoint: before the oldest batch drawn
        ahead, or the current state when none is in flight."""
        return [s.clone() for s in self.ahead[0][0]] if self.ahead else self._pair_states()

    def close(self) -> None:
        """Drop the batches drawn ahead and stop the threads."""
        for _, future, _ in self.ahead:
            future.cancel()
        self.ahead.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
