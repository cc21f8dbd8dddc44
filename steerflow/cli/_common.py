"""Helpers shared by the command modules: argument types, checkpoint and data loading with one-line errors.

Everything here turns library errors at the user boundary into :class:`CLIError` with a message naming
what was expected and what arrived. The run's provenance (data, source, what kind of model, how to
sample it by default) is kept in ``run.json`` next to the checkpoint written by :mod:`steerflow.training`;
the record (:class:`~steerflow.training.RunInfo`) and the loading of a run's model
(:func:`~steerflow.training.load_run`) live in the library, and are only wrapped here.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..manifolds.velocity import EMBEDS as NETWORK_EMBEDS  # noqa: F401  (kept importable from here)
from ..manifolds.velocity import build_manifold_model, network_embed  # noqa: F401
from ..training.run import RUN_FILE, LoadedRun, write_json  # noqa: F401
from ..training.run import RunInfo as _RunInfo
from .main import CLIError


# --- argument types --------------------------------------------------------------------------------
def number_type(cast, ok, what: str):
    """An argparse ``type=``: parse with ``cast`` and accept when ``ok(value)``, else say ``what`` was expected."""

    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    parse.__name__ = what.replace(" ", "_")
    return parse


positive_int = number_type(int, lambda v: v >= 1, "a positive integer")
nonneg_int = number_type(int, lambda v: v >= 0, "a non-negative integer")
positive_float = number_type(float, lambda v: v > 0 and np.isfinite(v), "a positive number")
nonneg_float = number_type(float, lambda v: v >= 0 and np.isfinite(v), "a non-negative number")
unit_float = number_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
closed_unit_float = number_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def nfe_spec(s: str) -> str:
    """An NFE setting: a positive integer (Euler with that many steps) or an adaptive solver name."""
    if s in ("dopri5",):
        return s
    positive_int(s)
    return str(int(s))


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_seed(p: argparse.ArgumentParser, default: int = 0) -> None:
    p.add_argument("--seed", type=nonneg_int, default=default, help="random seed (same seed, same result)")


CKPT_EVERY = 1000
"""Default of ``--ckpt-every``: a killed run loses at most 1000 steps (seconds for the small MLPs, minutes for a
U-Net on a CPU), for one checkpoint write per 1000 steps (each replaces the previous one)."""


def _ckpt_every(s: str) -> int | None:
    """``--ckpt-every N`` as the libraries take it: N, or None for 0 (a checkpoint at the end only)."""
    return nonneg_int(s) or None


def add_checkpointing(p: argparse.ArgumentParser) -> None:
    """``--ckpt-every`` (``args.ckpt_every``: an int, or None for 0, as ``train``'s ``ckpt_every`` and
    ``FitCheckpoints``' ``every`` take it) and ``--resume`` of the commands that train (``train``, ``reflow``,
    ``distill``)."""
    p.add_argument("--ckpt-every", type=_ckpt_every, default=CKPT_EVERY, metavar="N",
                   help="write a checkpoint into --out every N steps and at the end (each replaces the previous "
                        "one), so a killed run can be continued with --resume; 0: only at the end")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (same settings; the result is the "
                        "one an uninterrupted run gives), or start it over when it stopped before one")


def check_out(out: Path, resume: bool) -> None:
    """``--resume`` needs a run in ``out``; a fresh run must not write into one (its checkpoint or
    ``log.jsonl``): two runs would share one log. Under ``torchrun`` the log is checked on rank 0, which
    writes it."""
    if resume and not out.exists():
        raise CLIError(f"--resume: no run to resume in {str(out)!r}")
    if resume:
        return
    from ..training.checkpoint import earlier_run

    found = earlier_run(out, log=is_main_process())
    if found is not None:
        raise CLIError(f"--out {str(out)!r} already holds a run ({found}); pass --resume to continue it, or "
                       "choose another --out")


def begin_run(out: Path, info: "RunInfo", resume: bool) -> None:
    """``run.json`` of a fresh run, written before it trains so that an interrupted run's checkpoint loads with
    its provenance; a resumed run's is kept until its settings are checked (:func:`end_run` writes it)."""
    if is_main_process() and not resume:
        info.save(out)


def end_run(out: Path, info: "RunInfo", summary: str) -> None:
    """``run.json`` beside the final checkpoint and the one-line ``summary`` on stderr (rank 0 only)."""
    if is_main_process():
        info.save(out)
        print(summary, file=sys.stderr)


def is_main_process() -> bool:
    """False on the ranks other than 0 of a ``torchrun`` launch (they train, but print and write nothing)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def seeded(seed: int):
    """Torch's global RNG seeded with ``seed`` inside, the caller's state restored after: networks built
    inside get the same initial weights for the same ``--seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


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


# --- run metadata (the library's RunInfo, with errors turned into CLIError) --------------------------
class RunInfo(_RunInfo):
    """:class:`steerflow.training.RunInfo` whose :meth:`load` ends a command with a one-line :class:`CLIError`."""

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "RunInfo":
        try:
            return super().load(directory)
        except ValueError as e:
            raise CLIError(str(e)) from None


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
def coupling_workers(requested: int | None, coupling) -> int:
    """``--coupling-workers``, or by default one worker for a coupling (exact OT, Sinkhorn) when the
    machine has a second core: the coupling of the next batch then runs beside the training step."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if coupling is not None and cores >= 2 else 0


def load_data(name: str, image_size: int | None = None):
    """``steerflow.data.load_dataset(name)`` with a one-line error for unknown names and bad files; image
    folders are resized on load to ``image_size`` (``--image-size``)."""
    from ..data import load_dataset

    what = f"--data {name!r}" if image_size is None else f"--image-size {image_size} with --data {name!r}"
    try:
        return load_dataset(name) if image_size is None else load_dataset(name, image_size=image_size)
    except FileNotFoundError as e:
        raise CLIError(f"{what}: {e}") from None
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CLIError(f"{what}: {_msg(e)}") from None


def load_run_data(name: str, info: RunInfo | None) -> Any:
    """``--data`` for a command reading a checkpoint: the run's own dataset is read as it was trained on
    (resized to the ``image_size`` its ``run.json`` records); another dataset (or no run) as it is."""
    own = info is not None and name == info.data and isinstance(info.extra, dict)
    size = info.extra.get("image_size") if own else None
    return load_data(name, image_size=size)


def data_sampler(dataset):
    """``(n, generator) -> (n, *d)`` float32 for a dataset from :func:`load_data` (labels dropped)."""
    from ..training.pairs import as_sampler

    draw = as_sampler(dataset)
    return lambda n, generator=None: draw(n, generator).float()


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


Loaded = LoadedRun
"""A model restored from a checkpoint directory with its :class:`RunInfo` (:class:`steerflow.training.LoadedRun`)."""


def load_flow(directory: str | os.PathLike, *, ema: bool = True, device: torch.device | str = "cpu",
              allow_manifold: bool = False) -> Loaded:
    """Restore the velocity model in ``directory`` (EMA weights when present and ``ema``), in eval mode
    (:func:`steerflow.training.load_run`, with one-line errors).

    A checkpoint of a flow on a manifold is refused unless ``allow_manifold`` (commands that know how to
    sample it with ``geometry=`` pass it).
    """
    from ..training.run import load_run

    d = Path(directory)
    if not d.exists():
        raise CLIError(f"--ckpt: no checkpoint at {str(d)!r}")
    if not d.is_dir():
        raise CLIError(f"--ckpt: expected a checkpoint directory, got the file {str(d)!r}")
    info = RunInfo.load(d)
    if info.manifold is not None and not allow_manifold:
        raise CLIError(f"--ckpt {str(d)!r} holds a flow on the manifold {info.manifold}; this command "
                       "works on flat flows only (sample, eval and plot take manifold checkpoints)")
    try:
        return load_run(d, ema=ema, device=device, info=info)
    except FileNotFoundError as e:
        raise CLIError(f"--ckpt {str(d)!r}: incomplete checkpoint ({_msg(e)})") from None
    except Exception as e:  # corrupt JSON, truncated safetensors, state-dict mismatch: all user-facing here
        raise CLIError(f"--ckpt {str(d)!r}: cannot load checkpoint ({_msg(e)})") from None


# --- flows on manifolds ------------------------------------------------------------------------------
MANIFOLD_EXAMPLES = ("sphere2", "torus2", "so3", "hyperbolic2", "euclidean3", "sphere2xtorus1")
"""Specs shown in error messages (any ``<name><n>`` of :data:`steerflow.manifolds.MANIFOLDS` and products)."""


def manifold_of(spec: str):
    """``get_manifold(spec)`` with a one-line error listing the options."""
    from ..manifolds import get_manifold

    try:
        return get_manifold(spec)
    except (ValueError, TypeError) as e:  # the library's message names the factors; products are added here
        raise CLIError(f"--manifold {spec!r}: {_msg(e)}; factors join into a product with 'x' (specs such as "
                       f"{', '.join(MANIFOLD_EXAMPLES)})") from None


def load_manifold_data(name: str, manifold) -> torch.Tensor:
    """Points on ``manifold`` (n, *M.shape) float32 from ``name``.

    On ``sphere2``: an earth catalogue (``volcano``, ``earthquake``, ``flood``; see
    :func:`steerflow.data.earth.load_earth`), any CSV of latitude/longitude pairs in degrees
    (:func:`~steerflow.data.earth.load_latlon_csv`) or a ``.npy`` of unit vectors (n, 3). On any manifold:
    a ``.npy`` of points in ambient coordinates, checked with ``manifold.check_point``.
    """
    from ..data.earth import EARTH_DATASETS, load_earth, load_latlon_csv

    p = Path(name)
    is_sphere2 = manifold.name == "sphere2"
    try:
        if name in EARTH_DATASETS or p.suffix.lower() == ".csv":
            if not is_sphere2:
                raise CLIError(f"--data {name!r}: earth catalogues and latitude/longitude CSV files are points on "
                               f"sphere2, not on {manifold.name}; give a .npy of points on {manifold.name}")
            x = load_earth(name) if name in EARTH_DATASETS else load_latlon_csv(p)
        elif p.suffix.lower() == ".npy":
            if not p.is_file():
                raise CLIError(f"--data {name!r}: no such file")
            arr = np.load(p, allow_pickle=False)
            if not np.issubdtype(arr.dtype, np.number):
                raise CLIError(f"--data {name!r}: expected a numeric array, got dtype {arr.dtype}")
            x = torch.as_tensor(arr).float()
        else:
            what = "'volcano', 'earthquake', 'flood', a latitude/longitude .csv or " if is_sphere2 else ""
            raise CLIError(f"--data {name!r}: on {manifold.name} expected {what}a .npy of points of shape "
                           f"(n, {', '.join(map(str, manifold.shape))})")
    except FileNotFoundError as e:
        raise CLIError(f"--data {name!r}: {_msg(e)}") from None
    except (ValueError, OSError) as e:
        raise CLIError(f"--data {name!r}: {_msg(e)}") from None
    if x.ndim < 1 or x.shape[0] < 1:
        raise CLIError(f"--data {name!r}: no points")
    x = _wrap_torus_angles(name, manifold, x)
    try:
        manifold.check_point(x)
    except ValueError as e:
        raise CLIError(f"--data {name!r}: {_msg(e)}") from None
    return x


def _wrap_torus_angles(name: str, manifold, x: torch.Tensor) -> torch.Tensor:
    """Angles in the ``[-π, π)`` convention onto a torus (factor)'s ``[0, 2π)`` (:meth:`FlatTorus.wrap`), with a
    note; values that are not radians in ``[-π, 2π]`` are left for ``check_point`` to refuse with the range."""
    from ..manifolds import FlatTorus, Product

    def wrap(m, part):
        if isinstance(m, FlatTorus):
            try:
                return m.wrap(part)
            except ValueError:
                return part
        if isinstance(m, Product) and part.ndim == 2 and part.shape[1] == m.shape[0]:
            return m.join([wrap(f, p) for f, p in zip(m.factors, m.split(part))])
        return part

    y = wrap(manifold, x)
    if y is not x and not torch.equal(y, x):
        print(f"note: --data {name!r}: angles in [-π, π) wrapped onto {manifold.name}'s [0, 2π)", file=sys.stderr)
    return y


SPLITS = ("all", "train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def points_digest(x: torch.Tensor) -> str:
    """SHA-256 of the points as float32 bytes in row order: which data a split was drawn from."""
    import hashlib

    return hashlib.sha256(x.detach().to(torch.float32).cpu().contiguous().numpy().tobytes()).hexdigest()


def split_points(x: torch.Tensor, split: str | None, seed: int) -> torch.Tensor:
    """The ``split`` part of the random 80/10/10 train/validation/test split drawn with ``seed``
    (:func:`steerflow.data.earth.random_split` with ``torch.Generator().manual_seed(seed)``: the protocol
    of ``benchmarks/bench_earth.py``); ``None``/``"all"``: every point."""
    from ..data.earth import random_split

    if split in (None, "all"):
        return x
    if split not in SPLITS:
        raise CLIError(f"--split: expected one of {', '.join(SPLITS)}, got {split!r}")
    parts = random_split(x, SPLIT_FRACTIONS, generator=generator(seed))
    out = parts[SPLITS.index(split) - 1]
    if out.shape[0] < 1:
        raise CLIError(f"--split {split}: the data has {x.shape[0]} points, too few for an 80/10/10 split")
    return out
