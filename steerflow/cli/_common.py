"""Helpers shared by the command modules: argument types, checkpoint and data loading with one-line errors.

Everything here turns library errors at the user boundary into :class:`CLIError` with a message naming
what was expected and what arrived. The run's provenance (data, source, what kind of model, how to
sample it by default) is kept in ``run.json`` next to the checkpoint written by :mod:`steerflow.training`.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .main import CLIError

RUN_FILE = "run.json"


# --- argument types --------------------------------------------------------------------------------
def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and np.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def unit_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {s!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {s!r}")
    return v


def nfe_spec(s: str) -> str:
    """An NFE setting: a positive integer (Euler with that many steps) or an adaptive solver name."""
    if s in ("dopri5",):
        return s
    positive_int(s)
    return str(int(s))


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")


def add_seed(p: argparse.ArgumentParser, default: int = 0) -> None:
    p.add_argument("--seed", type=nonneg_int, default=default, help="random seed (same seed, same result)")


def device_of(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device: unknown device {name!r}; expected e.g. cpu, cuda, cuda:0, mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CLIError(f"--device {name}: MPS is not available on this machine")
    return dev


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# --- run metadata ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    """Provenance of a checkpoint directory, stored as ``run.json`` beside it.

    ``kind`` is ``flow`` (trained by flow matching with ``coupling``), ``reflow`` (a ``k``-rectified flow)
    or ``distilled`` (one-step: sample with one Euler step). ``default_steps``/``default_method`` are what
    ``steerflow sample`` uses when not told.
    """

    data: str | None = None
    source: str = "normal"
    kind: str = "flow"
    coupling: str | None = None
    path: str = "linear"
    k: int = 1
    parent: str | None = None
    default_steps: int = 100
    default_method: str = "euler"
    extra: dict = field(default_factory=dict)

    def save(self, directory: str | os.PathLike) -> None:
        write_json(Path(directory) / RUN_FILE, asdict(self))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "RunInfo":
        p = Path(directory) / RUN_FILE
        if not p.is_file():
            return cls()
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CLIError(f"{str(p)!r} is corrupt ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict):
            raise CLIError(f"{str(p)!r} is corrupt: expected a JSON object")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as e:
            raise CLIError(f"{str(p)!r} is corrupt ({e})") from None


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _json_default(o: Any):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if torch.is_tensor(o):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_npy(path: str | os.PathLike, x: np.ndarray) -> Path:
    """``np.save`` through a temporary file and a rename."""
    path = Path(path)
    if path.suffix != ".npy":
        raise CLIError(f"--out must end in .npy, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npy", dir=path.parent)
    os.close(fd)
    np.save(tmp, x)
    os.replace(tmp, path)
    return path


def load_npy(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"no samples file at {str(path)!r}")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:
        raise CLIError(f"{str(path)!r} is not a readable .npy array ({type(e).__name__}: {e})") from None
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 2:
        raise CLIError(f"{str(path)!r} must hold a numeric array of shape (n, *d), got {x.dtype} {x.shape}")
    return x


# --- data, sources, checkpoints ---------------------------------------------------------------------
def load_data(name: str):
    """``steerflow.data.load_dataset(name)`` with a one-line error for unknown names and bad files."""
    from ..data import load_dataset

    try:
        return load_dataset(name)
    except FileNotFoundError as e:
        raise CLIError(f"--data {name!r}: {e}") from None
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CLIError(f"--data {name!r}: {_msg(e)}") from None


def data_sampler(dataset):
    """``(n, generator) -> (n, *d)`` float32 for a dataset from :func:`load_data`."""
    def draw(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        x = dataset.sample(n, generator=generator)
        if isinstance(x, tuple):  # labelled data: (x, labels)
            x = x[0]
        return torch.as_tensor(x).float()
    return draw


def source_sampler(name: str, event_shape: tuple[int, ...]):
    """``(n, generator) -> (n, *event_shape)`` for the source ``name`` (``normal`` or a toy density)."""
    from ..straighten import as_source

    try:
        draw = as_source(name, event_shape)
        probe = draw(2, torch.Generator().manual_seed(0))
    except (ValueError, KeyError, TypeError) as e:
        raise CLIError(f"--source {name!r}: {_msg(e)}") from None
    if tuple(probe.shape[1:]) != tuple(event_shape):
        raise CLIError(f"--source {name!r} draws samples of shape {tuple(probe.shape[1:])}, but the model "
                       f"expects {tuple(event_shape)}")
    return lambda n, generator=None: draw(n, generator).float()


def _msg(e: BaseException) -> str:
    s = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError) and s.startswith("'") and s.endswith("'"):
        s = s[1:-1]
    return " ".join(s.split())


@dataclass
class Loaded:
    """A model restored from a checkpoint directory with its :class:`RunInfo`."""

    model: torch.nn.Module
    info: RunInfo
    directory: Path


def load_flow(directory: str | os.PathLike, *, ema: bool = True, device: torch.device | str = "cpu") -> Loaded:
    """Restore the velocity model in ``directory`` (EMA weights when present and ``ema``), in eval mode."""
    from ..training import load_checkpoint

    d = Path(directory)
    if not d.exists():
        raise CLIError(f"--ckpt: no checkpoint at {str(d)!r}")
    if not d.is_dir():
        raise CLIError(f"--ckpt: expected a checkpoint directory, got the file {str(d)!r}")
    info = RunInfo.load(d)
    try:
        ckpt = load_checkpoint(d, device=device)
    except FileNotFoundError as e:
        raise CLIError(f"--ckpt {str(d)!r}: incomplete checkpoint ({_msg(e)})") from None
    except Exception as e:  # corrupt JSON, truncated safetensors, state-dict mismatch: all user-facing here
        raise CLIError(f"--ckpt {str(d)!r}: cannot load checkpoint ({_msg(e)})") from None
    model = ckpt.ema_model if (ema and ckpt.ema_model is not None) else ckpt.model
    model.to(device).eval()
    return Loaded(model=model, info=info, directory=d)


def save_flow(model: torch.nn.Module, directory: str | os.PathLike, info: RunInfo, *, step: int,
              config: dict[str, Any]) -> Path:
    """Write ``model`` as a checkpoint (config JSON + safetensors) in ``directory`` and ``run.json`` beside it."""
    from ..training import save_checkpoint

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_checkpoint(d, model, config=config, step=step)
    info.save(d)
    return d
