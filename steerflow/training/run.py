"""A training run's provenance (``run.json``) and the model it trained, reloaded from its directory alone.

``steerflow train`` / ``reflow`` / ``distill`` write ``run.json`` beside the checkpoints of
:mod:`steerflow.training.checkpoint`: what data and source the model was trained on, what kind of model it is
and how to sample it by default. :func:`load_run` returns the model (rebuilt by
:func:`~steerflow.training.load_checkpoint`, flows on manifolds included) with that record; it is what the
command line loads, and it needs nothing from :mod:`steerflow.cli`.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import BASE_NAME

RUN_FILE = "run.json"
BASE_FILE = f"{BASE_NAME}.json"
"""The fitted source of a run (a :class:`~steerflow.manifolds.VonMisesFisherMixture`), beside ``run.json`` with
its tensors in ``base.safetensors``."""
SITES_NAME = "sites"
"""``sites.json`` / ``sites.safetensors``: the repeated sites of a run trained with ``steerflow train --repeats``."""


@dataclass(frozen=True)
class RunInfo:
    """Provenance of a checkpoint directory, stored as ``run.json`` beside it.

    ``kind`` is ``flow`` (trained by flow matching with ``coupling``), ``reflow`` (a ``k``-rectified flow)
    or ``distilled`` (one-step: sample with one Euler step). ``default_steps``/``default_method`` are what
    ``steerflow sample`` uses when not told.

    A flow on a manifold (``steerflow train --manifold sphere2``) also records ``manifold`` (the spec for
    :func:`steerflow.manifolds.get_manifold`) and ``network`` (``{"name", "config"[, "embed"]}`` of the registered
    network wrapped in :class:`~steerflow.manifolds.TangentVelocity`; the checkpoint itself stores the whole
    ``TangentVelocity`` spec, and checkpoints written before it did are rebuilt from these two fields);
    ``split`` / ``split_seed`` say which part of the data it was trained on (``"all"`` or ``None``, as runs before
    the split was recorded: all of it; ``"train"``: the 80 % part of the 80/10/10 split drawn with
    ``split_seed``), and ``data_points`` / ``data_sha256`` which data that was, so the split is drawn again from
    the checkpoint alone and ``eval`` can tell held-out points from trained ones.

    ``base`` is None when the flow was trained from the manifold's own base distribution (``M.random_base``; every
    run before fitted bases existed), else the record of the fitted source saved beside the checkpoints as
    ``base.json`` + ``base.safetensors`` (:data:`BASE_FILE`): ``{"name": "vmf", "file": "base.json", ...}`` with
    how it was chosen (``steerflow train --base vmf``). :func:`load_run` then loads it as ``LoadedRun.base``.
    With ``--repeats`` the record holds ``"repeats": true`` and ``"sites": {"name": "sites", "sites": U, "kappa": κ,
    "weight": λ, "discount": d, ...}`` for ``sites.json`` + ``sites.safetensors``, loaded as ``LoadedRun.sites``.

    ``selection`` is None when the run's model is its last checkpoint, else how the run chose among its checkpoints
    (``steerflow train --select val``): ``{"metric": "val_nll", "weights": "ema" | "model", "ode": {...},
    "selected_step": k, "val_nll": {"<step>": nll, ...}}``, the validation NLL of the scored weights at step 0 and
    at every checkpoint (null where it is not finite), ``selected_step`` the lowest (``selected_step`` and the curve
    are filled in when the run ends; ``best.json`` beside the checkpoints holds them as it goes, see
    :func:`~steerflow.training.checkpoint.select_checkpoint`).
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
    manifold: str | None = None
    network: dict | None = None
    split: str | None = None
    split_seed: int | None = None
    data_points: int | None = None
    data_sha256: str | None = None
    base: dict | None = None
    selection: dict | None = None

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/run.json`` atomically."""
        return write_json(Path(directory) / RUN_FILE, asdict(self))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "RunInfo":
        """``directory/run.json`` (defaults where there is none); ``ValueError`` naming the file when corrupt."""
        p = Path(directory) / RUN_FILE
        if not p.is_file():
            return cls()
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(p)!r} is corrupt ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{str(p)!r} is corrupt: expected a JSON object")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as e:
            raise ValueError(f"{str(p)!r} is corrupt ({e})") from None


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file + rename); numpy scalars, tensors and paths become
    plain JSON values."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _json_default(o: Any):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if torch.is_tensor(o):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass
class LoadedRun:
    """A model restored from a training directory with its :class:`RunInfo`.

    ``manifold`` is the :class:`~steerflow.manifolds.AbstractManifold` of a flow trained on one (the model is
    then a ``TangentVelocity``; sample with ``geometry=manifold``), else None. ``base`` is the fitted source the
    flow was trained from (a :class:`~steerflow.manifolds.VonMisesFisherMixture`: sample ``x_0`` with
    ``base.sample`` and score with ``base_log_prob=base.log_prob``), or None: the source is
    ``manifold.random_base`` (``manifold.base_log_prob``), or ``info.source`` for a flat flow. ``sites`` is the
    :class:`~steerflow.manifolds.RepeatedSites` of a run trained with ``--repeats`` (``sites.json``): the model's
    density is then ``sites.log_prob(x, log p_1(x))`` and its samples ``sites.sample(n, flow_sampler)``; else None.
    """

    model: nn.Module
    info: RunInfo
    directory: Path
    manifold: Any = None
    base: Any = None
    sites: Any = None


def load_run(directory: str | os.PathLike, *, ema: bool = True, device: torch.device | str = "cpu",
             info: RunInfo | None = None, latest: bool = False) -> LoadedRun:
    """The model of the run in ``directory`` (EMA weights when the checkpoint kept them and ``ema``), in eval
    mode, with its ``run.json`` (``info``, read from ``directory`` when not given). The checkpoint is the one the
    run selected (``best.json``, see :class:`RunInfo`'s ``selection``) where it selected one, else its last;
    ``latest=True``: its last one always.

    The fitted source saved with the run (``base.json``, see :class:`RunInfo`) is loaded as ``base`` unless a
    ``run.json`` records none; a ``run.json`` that records one whose files are missing raises
    ``FileNotFoundError``.

    Raises what :func:`~steerflow.training.load_checkpoint` raises (``FileNotFoundError`` for missing files,
    ``ValueError`` for corrupt ones or weights that do not fit) and ``ValueError`` for a corrupt ``run.json``.
    """
    from ..manifolds import get_manifold
    from ..manifolds.velocity import TangentVelocity
    from .checkpoint import load_checkpoint

    d = Path(directory)
    info = RunInfo.load(d) if info is None else info
    ckpt = load_checkpoint(d, device=device, latest=latest)
    model = ckpt.ema_model if (ema and ckpt.ema_model is not None) else ckpt.model
    model.to(device).eval()
    manifold = None
    if isinstance(model, TangentVelocity):
        manifold = model.manifold
    elif info.manifold is not None:
        manifold = get_manifold(info.manifold)
    base = ckpt.base
    if info.base is not None and base is None:
        raise FileNotFoundError(f"{d / RUN_FILE} records a fitted base ({info.base.get('name')!r}), but "
                                f"{d / BASE_FILE} is missing")
    if info.base is None and (d / RUN_FILE).is_file():
        base = None  # its run.json says the run used the manifold's own base distribution
    sites = None
    if isinstance((info.base or {}).get("sites"), dict):
        from ..manifolds.vmf import RepeatedSites

        sites = RepeatedSites.load(d, info.base["sites"].get("name", SITES_NAME))
    return LoadedRun(model=model, info=info, directory=d, manifold=manifold, base=base, sites=sites)


__all__ = ["RUN_FILE", "BASE_FILE", "RunInfo", "LoadedRun", "load_run", "write_json"]
