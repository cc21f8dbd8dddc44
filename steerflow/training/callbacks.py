"""Callbacks of :func:`~steerflow.training.train`: called on rank 0 with each log record and at the end.

A log record is the dict also written to ``log.jsonl``: ``step``, the mean ``loss`` since the last record,
``lr``, the throughput ``it_s`` and the wall-clock ``time``. A callback is a callable ``cb(record)`` or a
:class:`Callback` (``on_log(record)``, ``on_end(result)``).
"""
from __future__ import annotations

import os
from typing import Any


class Callback:
    """Base of the callbacks that want more than the log records: override either method."""

    def on_log(self, record: dict[str, Any]) -> None:
        """Called at every log step with the log record."""

    def on_end(self, result: Any) -> None:
        """Called once with the :class:`~steerflow.training.TrainResult` when the run ends normally."""


class TensorBoardLogger(Callback):
    """Writes each log record's ``loss``, ``lr`` and ``it_s`` as TensorBoard scalars (``train/loss``, ...) at
    its ``step`` into ``log_dir``, beside ``log.jsonl``; closes the writer at the end.

    ``torch.utils.tensorboard`` is imported here, when the logger is made: without the ``tensorboard``
    package this raises ``ImportError`` naming ``pip install tensorboard``. ``writer`` (any object with
    ``add_scalar(tag, value, step)``, ``flush()`` and ``close()``) replaces the ``SummaryWriter``.
    """

    TAGS = ("loss", "lr", "it_s")

    def __init__(self, log_dir: str | os.PathLike, *, writer: Any = None) -> None:
        self.log_dir = str(log_dir)
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # torch's module imports the tensorboard package
                raise ImportError("TensorBoardLogger needs the tensorboard package: pip install tensorboard "
                                  f"({e})") from None
            writer = SummaryWriter(log_dir=self.log_dir)
        self.writer = writer

    def on_log(self, record: dict[str, Any]) -> None:
        for tag in self.TAGS:
            if tag in record:
                self.writer.add_scalar(f"train/{tag}", float(record[tag]), int(record["step"]))
        self.writer.flush()

    def on_end(self, result: Any) -> None:
        self.writer.close()


class Callbacks:
    """A list of callbacks called in order (``None``: none; one callback or a list of them)."""

    def __init__(self, callbacks: Any) -> None:
        if callbacks is None:
            items = []
        elif isinstance(callbacks, (list, tuple)):
            items = list(callbacks)
        else:
            items = [callbacks]
        for cb in items:
            if not (callable(cb) or callable(getattr(cb, "on_log", None)) or callable(getattr(cb, "on_end", None))):
                raise TypeError(f"a callback must be a callable (record) or have on_log(record) / on_end(result); "
                                f"got {type(cb).__name__}")
        self.items = items

    def on_log(self, record: dict[str, Any]) -> None:
        for cb in self.items:
            hook = getattr(cb, "on_log", None)
            if callable(hook):
                hook(dict(record))
            elif callable(cb):
                cb(dict(record))

    def on_end(self, result: Any) -> None:
        for cb in self.items:
            hook = getattr(cb, "on_end", None)
            if callable(hook):
                hook(result)
