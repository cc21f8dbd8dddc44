"""Checkpoints without pickled modules: safetensors for tensors, JSON for structure and scalars.

Layout of a training directory ``out_dir``::

    out_dir/latest.json             {"step": k, "checkpoint": "step-0000000k"}   (written last)
    out_dir/step-0000000k/config.json          model class + config, training config, step
    out_dir/step-0000000k/model.safetensors    model weights
    out_dir/step-0000000k/ema.safetensors      EMA weights (when an EMA is kept)
    out_dir/step-0000000k/state.safetensors    optimiser tensors, RNG states, loss trace, extra tensors
    out_dir/step-0000000k/state.json           optimiser structure/scalars, extra JSON values
    out_dir/base.json, out_dir/base.safetensors  the fitted source of the run, if any (``train --base vmf``)
    out_dir/best.json               {"step": j, "checkpoint": "step-0000000j", "metric": ..., "scores": {...}}
                                    (only where a run selects a checkpoint, e.g. by validation NLL)

``latest.json`` names the last checkpoint: a resumed run continues from it (:func:`load_state`, :func:`read_config`).
``best.json``, where a run keeps one (:func:`select_checkpoint`), names the checkpoint the run selected among the
scored ones (the lowest score); :func:`load_checkpoint` of the training directory loads that one (``latest=True``:
the last one). Its folder is kept when later checkpoints replace the others.

A checkpoint directory is written under a temporary name and renamed into place, then ``latest.json``
is replaced atomically (temp file + ``os.replace``): a crash at any moment leaves the previous
checkpoint intact and ``latest.json`` pointing at a complete one. What a killed write leaves behind
(``.tmp-step-*`` folders, ``.latest.json.*.tmp`` files, a ``.old-step-*`` folder moved aside) is removed
by :func:`remove_stale`, which a run calls before it writes into ``out_dir``.

``config.json["model"]`` is ``{"name": <class>, "config": {...}}``, the spec of
:mod:`steerflow.models.pretrained` (child models nested as ``{"class", "config"}``), so
:func:`steerflow.models.from_pretrained` and :func:`load_checkpoint` rebuild any registered model from a checkpoint,
wrappers such as ``TangentVelocity`` included; weights are stored as the model's ``pretrained_state_dict``
(a wrapped external network's keys unprefixed).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..manifolds import velocity as _tangent  # noqa: F401  (registers TangentVelocity for the readers below)
from ..models import unwrap_model
from ..models.pretrained import (build_from_spec, load_checked, load_saved_state, read_model_config,
                                 spec_or_none, state_for_saving, stored_dtype, write_json, write_weights)

FORMAT = "steerflow.checkpoint"
VERSION = 1
LATEST = "latest.json"
BEST = "best.json"
"""The pointer to the checkpoint a run selected (:func:`select_checkpoint`), beside ``latest.json``."""
LOG = "log.jsonl"
"""The training log beside the checkpoints: a JSON line every few steps (``train``, the straightening fits)."""
BASE_NAME = "base"
"""``base.json`` / ``base.safetensors``: the fitted source a run was trained from, beside its checkpoints."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: rebuilt ``model`` (and ``ema_model`` or None), the stored ``config`` dict
    (``{"model": {"name", "config"}, "training": {...}, "step": k, ...}``), the ``step``, the directory
    it came from, the ``extra`` values saved with it (tensors and JSON values), and the ``base``: the fitted
    source the model was trained from (a :class:`~steerflow.manifolds.VonMisesFisherMixture` saved as
    ``base.json`` in the training directory, e.g. by ``steerflow train --base vmf``), or None."""

    model: nn.Module
    ema_model: nn.Module | None
    config: dict[str, Any]
    step: int
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)
    base: Any = None


# --- writing ---------------------------------------------------------------------------------------
def _check_json(obj: Any, what: str) -> None:
    try:
        json.dumps(obj)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from e


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optimizer.state.{pid}.{key}"] = val
            else:
                scalars.setdefault(str(pid), {})[key] = val
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"class": type(optimizer).__name__, "param_groups": groups, "state_scalars": scalars}
    _check_json(meta, "optimizer state")
    return tensors, meta


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(out_dir: str | os.PathLike, model: nn.Module, *, ema: Any = None,
                    optimizer: torch.optim.Optimizer | None = None, config: dict[str, Any], step: int,
                    extra: dict[str, Any] | None = None, keep: int = 1, update_latest: bool = True) -> Path:
    """Write a checkpoint for ``step`` under ``out_dir`` atomically and point ``latest.json`` at it.

    Args:
        out_dir: training directory (created if needed).
        model: the network (DDP / compiled wrappers are unwrapped). Its class and config (see
            :func:`steerflow.models.model_spec`) are stored so :func:`load_checkpoint` can rebuild it; a model
            that cannot be stored so gets ``{"name": null, "config": null}`` (load it with :func:`load_state`).
        ema: an :class:`~steerflow.training.EMA` or an ``nn.Module`` holding averaged weights.
        optimizer: its tensors go to ``state.safetensors``, its structure and scalars to ``state.json``.
        config: the training configuration (JSON-serialisable dict).
        step: number of completed optimiser steps.
        extra: additional values: tensors go to ``state.safetensors`` (key ``extra.<name>``), anything
            else must be JSON-serialisable and goes to ``state.json``.
        keep: number of most recent checkpoint directories to keep (older ones are deleted; the folders
            ``latest.json`` and ``best.json`` name are kept too).
        update_latest: point ``latest.json`` at the new folder (False: write the folder only, e.g. an earlier
            state a run selects with :func:`select_checkpoint`; a resumed run still continues from the latest).

    Returns:
        The checkpoint directory ``out_dir/step-<step>``.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    _check_json(config, "config")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = unwrap_model(model)
    spec = spec_or_none(net)
    name, model_config = (spec["class"], spec["config"]) if spec is not None else (None, None)
    extra = dict(extra or {})
    extra_tensors = {f"extra.{k}": v for k, v in extra.items() if torch.is_tensor(v)}
    extra_json = {k: v for k, v in extra.items() if not torch.is_tensor(v)}
    _check_json(extra_json, "extra (non-tensor values)")

    files: dict[str, str] = {"model": "model.safetensors"}
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tmp-step-"))
    try:
        write_weights(state_for_saving(net), tmp / "model.safetensors", fmt=FORMAT)
        if ema is not None:
            ema_module = ema.module if hasattr(ema, "module") and isinstance(ema.module, nn.Module) else ema
            write_weights(state_for_saving(ema_module), tmp / "ema.safetensors", fmt=FORMAT)
            files["ema"] = "ema.safetensors"
        state_tensors = dict(extra_tensors)
        state_json: dict[str, Any] = {"extra": extra_json}
        if optimizer is not None:
            opt_tensors, opt_meta = _flatten_optimizer(optimizer)
            state_tensors.update(opt_tensors)
            state_json["optimizer"] = opt_meta
        write_weights(state_tensors, tmp / "state.safetensors", fmt=FORMAT)
        with open(tmp / "state.json", "w") as f:
            json.dump(state_json, f, indent=1, sort_keys=True)
        files.update(state="state.safetensors", state_json="state.json")
        meta = {"format": FORMAT, "version": VERSION, "step": step, "files": files,
                "model": {"name": name, "config": model_config}, "training": config}
        with open(tmp / "config.json", "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        final = out / checkpoint_dir_name(step)
        trash = None
        if final.exists():
            trash = out / f".old-{final.name}-{os.getpid()}"
            os.rename(final, trash)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if update_latest:
        write_json({"step": step, "checkpoint": final.name}, out / LATEST)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    _prune(out, final.name, keep)
    return final


def _pointed(pointer: Path) -> str | None:
    """The folder name a pointer file (``latest.json``, ``best.json``) names, or None (absent or unreadable)."""
    try:
        name = json.loads(pointer.read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _prune(out: Path, newest: str, keep: int) -> None:
    """Delete the ``step-*`` folders of ``out`` but ``newest``, the ``keep - 1`` most recent others and the ones
    ``latest.json`` and ``best.json`` name."""
    spared = {newest, _pointed(out / LATEST), _pointed(out / BEST)}
    olds = sorted(p for p in out.glob("step-*") if p.is_dir() and p.name not in spared)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def select_checkpoint(out_dir: str | os.PathLike, scores: dict[int, float], *, metric: str,
                      keep: int = 1) -> int:
    """Point ``out_dir/best.json`` at the checkpoint with the lowest of ``scores`` (``{step: score}``, the earliest
    step among equal scores; NaN counts as +inf) and return its step; ``best.json`` records ``metric`` and every
    score (null where it is not finite). The folder ``step-k`` of the chosen step must exist. Folders neither pointer names are pruned as by
    :func:`save_checkpoint` with ``keep``. :func:`load_checkpoint` of ``out_dir`` then loads the chosen checkpoint,
    while a resumed run continues from ``latest.json``'s."""
    if not scores:
        raise ValueError("select_checkpoint needs at least one score")
    for k in scores:
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"scores must be keyed by non-negative int steps, got {k!r}")
    out = Path(out_dir)
    best = best_step(scores)
    folder = out / checkpoint_dir_name(best)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"cannot select step {best}: {folder} holds no checkpoint")
    write_json({"step": best, "checkpoint": folder.name, "metric": metric,
                "scores": {str(k): _finite_or_none(scores[k]) for k in sorted(scores)}}, out / BEST)
    _prune(out, folder.name, keep)
    return best


def best_step(scores: dict[int, float]) -> int:
    """The step of the lowest score (the earliest among equal scores; NaN counts as +inf)."""
    def key(k: int) -> tuple[float, int]:
        v = float(scores[k])
        return (v if v == v else math.inf, k)

    return min(scores, key=key)


def _finite_or_none(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def read_selection(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``out_dir/best.json`` as ``{"step", "checkpoint", "metric", "scores": {step (int): score}}``, or None when
    the run selects none (a null score reads as +inf); ``ValueError`` naming the file when it is corrupt."""
    path = Path(out_dir) / BEST
    if not path.exists():
        return None
    d = _read_json(path)
    try:
        scores = {int(k): math.inf if v is None else float(v) for k, v in d["scores"].items()}
        return {"step": int(d["step"]), "checkpoint": str(d["checkpoint"]), "metric": d.get("metric"),
                "scores": scores}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"corrupt checkpoint pointer {path}: {type(e).__name__}: {e}") from None


def remove_stale(out_dir: str | os.PathLike) -> list[Path]:
    """Remove what killed checkpoint writes left in ``out_dir``; return the paths removed.

    ``.tmp-step-*`` (a checkpoint folder not yet renamed into place) and ``.latest.json.*.tmp`` /
    ``.best.json.*.tmp`` (a pointer not yet renamed) are deleted. A ``.old-step-k-<pid>`` folder (a checkpoint of
    the same step moved aside while it was being replaced) is deleted when ``step-k`` exists, else moved back to
    ``step-k`` (the write was killed between the two renames, and ``latest.json`` may still point at it). Call it
    only when no other process writes into ``out_dir``.
    """
    out = Path(out_dir)
    if not out.is_dir():
        return []
    removed = []
    for p in (sorted(out.glob(".tmp-step-*")) + sorted(out.glob(f".{LATEST}.*.tmp"))
              + sorted(out.glob(f".{BEST}.*.tmp"))):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    for p in sorted(out.glob(".old-step-*")):
        name = p.name[len(".old-"):].rsplit("-", 1)[0]
        if p.is_dir() and name.startswith("step-") and not (out / name).exists():
            os.rename(p, out / name)
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def earlier_run(out_dir: str | os.PathLike, *, log: bool = True) -> str | None:
    """The file by which ``out_dir`` holds an earlier run (``latest.json``, else ``log.jsonl`` when ``log``),
    or None. A fresh run refuses such a directory: it would overwrite the checkpoint or share the log (a run
    stopped before its first checkpoint leaves the log only). ``log=False`` on the DDP ranks that do not
    write the log, which rank 0 may already have opened."""
    out = Path(out_dir)
    for name in (LATEST, LOG) if log else (LATEST,):
        if (out / name).exists():
            return name
    return None


def cut_log(path: str | os.PathLike, step: int) -> None:
    """Keep the lines of a ``log.jsonl`` up to ``step``: those a run resumed from the checkpoint at ``step``
    does not write again. A line that does not parse (the last one, cut by a kill mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if logged <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


# --- reading ---------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | os.PathLike, *, selected: bool = False) -> Path:
    """A checkpoint directory from either itself or a training directory: the one its ``latest.json`` names, or
    with ``selected`` the one its ``best.json`` names where the run selected one (:func:`select_checkpoint`)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint: {p} does not exist")
    if p.is_file():
        if p.name == "config.json":
            return p.parent
        raise ValueError(f"expected a checkpoint directory or a training directory, got the file {p}")
    if (p / "config.json").exists():
        return p
    latest = p / BEST if selected and (p / BEST).exists() else p / LATEST
    if not latest.exists():
        raise FileNotFoundError(f"no checkpoint in {p}: neither {p / 'config.json'} nor {latest} exists")
    pointer = _read_json(latest)
    if not isinstance(pointer, dict) or not isinstance(pointer.get("checkpoint"), str):
        raise ValueError(f"corrupt checkpoint pointer {latest}: expected {{'checkpoint': <dir>}}, got {pointer!r}")
    ckpt = p / pointer["checkpoint"]
    if not (ckpt / "config.json").exists():
        raise FileNotFoundError(f"{latest} points at {ckpt}, which holds no config.json")
    return ckpt


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"missing checkpoint file {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt checkpoint file {path}: {e}") from e


def _read_tensors(path: Path, device: str | torch.device = "cpu", names: Any = None) -> dict[str, Tensor]:
    """The tensors of a safetensors file; with ``names``, only those present among them are read."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"missing checkpoint file {path}")
    try:
        if names is None:
            return load_file(str(path), device=str(device))
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            stored = set(f.keys())
            return {k: f.get_tensor(k) for k in names if k in stored}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"corrupt checkpoint file {path}: {e}") from e


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of the checkpoint at ``path`` (checkpoint or training directory)."""
    ckpt = resolve_checkpoint(path)
    meta = _read_json(ckpt / "config.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"corrupt checkpoint {ckpt / 'config.json'}: not a {FORMAT} file")
    missing = [k for k in ("step", "files", "model", "training") if k not in meta]
    if missing or not isinstance(meta["files"], dict) or "model" not in meta["files"]:
        raise ValueError(f"corrupt checkpoint {ckpt / 'config.json'}: missing entries {missing or ['files.model']}")
    if meta.get("version", VERSION) > VERSION:
        raise ValueError(f"checkpoint {ckpt} has format version {meta['version']}; this steerflow reads <= {VERSION}")
    return meta


def load_weights(module: nn.Module, tensors: dict[str, Tensor], what: str) -> None:
    """``module.load_state_dict(tensors)`` after checking names and shapes, with errors that name them."""
    load_checked(module, tensors, what)


def _config_diff(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return sorted(k for k in expected if k not in stored or norm(stored[k]) != norm(expected[k]))


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu", model_name: str | None = None,
                    expect_config: dict[str, Any] | None = None, latest: bool = False) -> Checkpoint:
    """Rebuild the model (and EMA model) stored at ``path`` and load their weights, in eval mode.

    The model is rebuilt from the spec in ``config.json`` (wrappers such as ``TangentVelocity`` included; for a
    ``steerflow train --manifold`` checkpoint from before the spec was stored there, from its ``run.json``) and
    takes the dtype its weights were saved in. :func:`steerflow.models.from_pretrained` reads the same folders.
    The run's fitted source, when it saved one, is loaded as ``base`` (:func:`load_base`).

    Args:
        path: a checkpoint directory ``.../step-k`` or a training directory: the checkpoint its ``best.json``
            names where the run selected one (e.g. ``steerflow train --select val``), else its ``latest.json``'s.
        device: where the tensors are loaded.
        model_name: if given, the stored model class must equal it (``ValueError`` otherwise).
        expect_config: if given, every key must equal the stored model config; the differing keys are
            named in the ``ValueError``.
        latest: load ``latest.json``'s checkpoint even where ``best.json`` selects another.

    Raises:
        FileNotFoundError: the directory or one of its files is missing (named).
        ValueError: a corrupt file (``"corrupt checkpoint file ..."``), a config mismatch, or weights
            whose names/shapes do not fit the rebuilt model (the keys are named).
    """
    ckpt = resolve_checkpoint(path, selected=not latest)
    meta = read_config(ckpt)
    _, spec, _ = read_model_config(ckpt)  # the stored spec (or, for older manifold runs, the one in run.json)
    name, mconfig = (spec["class"], spec["config"]) if spec is not None else (None, None)
    if model_name is not None and name is not None and model_name != name:
        raise ValueError(f"checkpoint {ckpt} holds model {name!r}, expected {model_name!r}")
    if name is None or mconfig is None:
        raise ValueError(f"checkpoint {ckpt} stores no registered model name/config; load its weights with "
                         "steerflow.training.load_state(path) into a model you construct")
    if expect_config is not None:
        diff = _config_diff(mconfig, expect_config)
        if diff:
            raise ValueError(f"checkpoint {ckpt} model config differs at keys {diff}: stored "
                             f"{ {k: mconfig.get(k) for k in diff} } vs expected { {k: expect_config[k] for k in diff} }")

    def rebuild(file: str, what: str) -> nn.Module:
        net = build_from_spec({"class": name, "config": mconfig}, str(ckpt / "config.json"))
        tensors = _read_tensors(ckpt / file)
        dtype = stored_dtype(tensors)
        if dtype is not None:  # the model takes the dtype it was saved in
            net.to(dtype)
        load_saved_state(net, tensors, f"{what} {ckpt / file}")
        return net.to(device).eval()

    model = rebuild(meta["files"]["model"], "weights")
    ema_model = rebuild(meta["files"]["ema"], "EMA weights") if "ema" in meta["files"] else None
    extra = load_extra(ckpt)
    return Checkpoint(model=model, ema_model=ema_model, config=meta, step=int(meta["step"]), path=ckpt, extra=extra,
                      base=load_base(ckpt))


def load_base(path: str | os.PathLike) -> Any:
    """The fitted source saved with the checkpoint at ``path`` (``base.json`` in the checkpoint directory, else in
    the training directory holding it), or None when there is none. ``FileNotFoundError`` / ``ValueError`` name a
    missing or corrupt file of it."""
    from ..manifolds.vmf import VonMisesFisherMixture

    ckpt = resolve_checkpoint(path)
    for folder in (ckpt, ckpt.parent):
        if (folder / f"{BASE_NAME}.json").exists():
            return VonMisesFisherMixture.load(folder, BASE_NAME)
    return None


def load_extra(path: str | os.PathLike, device: str | torch.device = "cpu", *,
               names: Any = None) -> dict[str, Any]:
    """The ``extra`` values saved with a checkpoint: tensors and JSON values, by name. ``names`` (an iterable
    of names) reads only those (the others' tensors, e.g. a fit's pairs, stay on disk)."""
    ckpt = resolve_checkpoint(path)
    state = _read_json(ckpt / "state.json")
    wanted = None if names is None else list(names)
    tensors = _read_tensors(ckpt / "state.safetensors", device,
                            None if wanted is None else [f"extra.{k}" for k in wanted])
    out = {k: v for k, v in state.get("extra", {}).items() if wanted is None or k in wanted}
    out.update({k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
    return out


def load_state(path: str | os.PathLike, model: nn.Module, *, ema: Any = None,
               optimizer: torch.optim.Optimizer | None = None) -> tuple[int, dict[str, Any]]:
    """Load weights (and EMA weights, optimiser state) from ``path`` into existing objects, in place.

    Returns ``(step, extra)``. Used by :func:`~steerflow.training.train` to resume; tensors are moved to
    the device of the live parameters.
    """
    ckpt = resolve_checkpoint(path)
    meta = read_config(ckpt)
    net = unwrap_model(model)
    device = next(iter(net.parameters()), torch.empty(0)).device
    load_saved_state(net, _read_tensors(ckpt / meta["files"]["model"], device),
                     f"weights {ckpt / meta['files']['model']}")
    if ema is not None:
        if "ema" not in meta["files"]:
            raise ValueError(f"checkpoint {ckpt} holds no EMA weights, but an EMA was given")
        ema_module = ema.module if hasattr(ema, "module") and isinstance(ema.module, nn.Module) else ema
        load_saved_state(ema_module, _read_tensors(ckpt / meta["files"]["ema"], device),
                         f"EMA weights {ckpt / meta['files']['ema']}")
    state = _read_json(ckpt / "state.json")
    tensors = _read_tensors(ckpt / "state.safetensors", "cpu")
    if optimizer is not None:
        opt_meta = state.get("optimizer")
        if opt_meta is None:
            raise ValueError(f"checkpoint {ckpt} holds no optimizer state")
        if opt_meta["class"] != type(optimizer).__name__:
            raise ValueError(f"checkpoint optimizer is {opt_meta['class']}, got {type(optimizer).__name__}")
        opt_state: dict[int, dict[str, Any]] = {}
        for key, val in tensors.items():
            if key.startswith("optimizer.state."):
                pid, name = key[len("optimizer.state."):].split(".", 1)
                opt_state.setdefault(int(pid), {})[name] = val
        for pid, scal in opt_meta["state_scalars"].items():
            opt_state.setdefault(int(pid), {}).update(scal)
        groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in opt_meta["param_groups"]]
        try:
            optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"optimizer state in {ckpt} does not fit the optimizer: {e}") from e
    extra = dict(state.get("extra", {}))
    extra.update({k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
    return int(meta["step"]), extra
