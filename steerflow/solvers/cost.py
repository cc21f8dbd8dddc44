"""Cost accounting of a solve: the sampler counts network evaluations into it, steering methods their VJPs and
operator calls. It lives with the sampler (every layer above can count into it); ``steerflow.metrics.Cost`` and
``steerflow.Cost`` are the same class."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Cost:
    """What a solve spent: network evaluations, vector-Jacobian products, operator calls, time, memory.

    Counts are per batch call (one NFE is one call of the network on the whole batch).
    """

    nfe: int = 0
    vjp: int = 0
    operator_calls: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    _t0: float = field(default=0.0, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("_t0")
        return d

    def __enter__(self) -> "Cost":
        self._t0 = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._t0
        if torch.cuda.is_available():
            self.peak_memory_bytes = max(self.peak_memory_bytes, torch.cuda.max_memory_allocated())
