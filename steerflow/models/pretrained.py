"""``save_pretrained`` / ``from_pretrained``: any steerflow model as a folder of JSON and safetensors.

A saved model is a directory holding

    config.json          {"format": "steerflow.model", "format_version": 1, "class": <name>, "config": {...}}
    model.safetensors    the weights (``state_dict``; a wrapped external module's own keys, unprefixed)

``class`` is the model's key in :data:`REGISTRY` and ``config`` its constructor arguments as JSON. A model that
wraps other models (``TangentVelocity``, ``OneStep``, ``PotentialVelocity``, ``PopulationVelocity``) stores each
child as a nested ``{"class", "config"}`` spec, and a manifold by its spec name (``"sphere2"``), so one
``config.json`` rebuilds the whole tree. No module is ever pickled. A class registers itself by subclassing
:class:`PretrainedMixin` with a ``name`` (your own classes too); one defined above :mod:`steerflow.models`
registers when its package is imported (``tangent`` with :mod:`steerflow.manifolds`, which
:mod:`steerflow.training` imports).

A training checkpoint (:func:`steerflow.training.save_checkpoint`, ``steerflow train``) stores the same spec
under ``config.json["model"]`` (``{"name", "config"}``) beside ``model.safetensors`` and ``ema.safetensors``,
so :func:`from_pretrained` reads a checkpoint directory or a training directory (its ``best.json`` where the run
selected a checkpoint, else its ``latest.json``) too: one
format for the API and the CLI. Checkpoints of ``steerflow train --manifold`` written before the model spec was
stored there (``"model": {"name": null}``) are rebuilt from the ``network`` and ``manifold`` of the ``run.json``
beside them.

Files are written atomically (a temporary file renamed into place); loading names the file and what is wrong
with it (missing, corrupt JSON, unknown class, weights that do not fit).
"""
from __future__ import annotations

import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

FORMAT = "steerflow.model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FORMAT = "steerflow.checkpoint"  # (training checkpoints: steerflow.training.checkpoint)
LATEST = "latest.json"
BEST = "best.json"
RUN_FILE = "run.json"

REGISTRY: dict[str, type[nn.Module]] = {}
"""Every model class that can be saved, by its ``name``; classes register themselves by subclassing
:class:`PretrainedMixin` with a ``name`` of their own."""

DEFINED_ELSEWHERE = {"tangent": "steerflow.manifolds", "conditional_means": "steerflow.transport"}
"""Library classes defined above :mod:`steerflow.models` (they register when their package is imported; the
training checkpoint readers import it)."""


class PretrainedMixin:
    """``model.save_pretrained(dir)`` / ``Class.from_pretrained(dir)`` for an ``nn.Module`` subclass.

    A concrete class sets ``name`` (its registry key; defining it registers the class) and records its
    constructor arguments with ``self._set_config(...)`` in ``__init__``; JSON values only, child models as
    :func:`model_spec` dicts. A class whose children need rebuilding overrides :meth:`from_config`; a class whose
    weights should be stored under other keys overrides :meth:`pretrained_state_dict` and
    :meth:`load_pretrained_state_dict`.
    """

    name: ClassVar[str] = "abstract"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if isinstance(name, str) and not inspect.isabstract(cls):
            old = REGISTRY.get(name)
            if old is not None and old.__qualname__ != cls.__qualname__:
                raise TypeError(f"model name {name!r} is taken by {old.__module__}.{old.__qualname__}")
            REGISTRY[name] = cls

    def _set_config(self, **config: Any) -> None:
        self._config = dict(config)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-able dict: ``type(self).from_config(self.config)`` rebuilds it."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict[str, Any], **children: Any) -> nn.Module:
        """A freshly initialised model from its ``config``. A class with child models overrides this to rebuild
        them from their specs, passing ``children`` (objects JSON cannot hold, e.g. ``network=``) on to them."""
        if children:
            raise TypeError(f"{cls.__name__} takes no {sorted(children)}")
        return cls(**config)

    def pretrained_state_dict(self) -> dict[str, Tensor]:
        """The tensors ``model.safetensors`` holds (default: ``state_dict()``)."""
        return self.state_dict()

    def load_pretrained_state_dict(self, tensors: dict[str, Tensor], what: str = "weights") -> None:
        """Load what :meth:`pretrained_state_dict` wrote, checking names and shapes (``what`` names the file)."""
        load_checked(self, tensors, what)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``; see :func:`save_pretrained`."""
        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, ema: bool = True, device: str | torch.device = "cpu",
                        **children: Any) -> nn.Module:
        """The model saved in ``directory``; it must be an instance of ``cls``. See :func:`from_pretrained`."""
        model = from_pretrained(directory, ema=ema, device=device, **children)
        if not isinstance(model, cls):
            raise ValueError(f"{Path(directory)} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in getattr(self, "_config", {}).items()
                         if not isinstance(v, dict))


# --- specs ---------------------------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under ``DistributedDataParallel(.module)`` / ``torch.compile`` (``._orig_mod``) wrappers (a
    steerflow model is never unwrapped, whatever its attributes are called)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and not isinstance(model, PretrainedMixin):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def registered_name(model: Any) -> str | None:
    """The registry key of ``model``'s class, or None for a class that is not registered."""
    name = getattr(type(model), "name", None)
    if isinstance(name, str) and REGISTRY.get(name) is type(model):
        return name
    return None


def model_spec(model: Any) -> dict[str, Any]:
    """``{"class": name, "config": {...}}`` of a registered model; ``TypeError`` naming what cannot be stored
    (an unregistered class, or a config that is not JSON)."""
    model = unwrap_model(model) if isinstance(model, nn.Module) else model
    name = registered_name(model)
    if name is None:
        raise TypeError(f"{type(model).__module__}.{type(model).__qualname__} is not a registered steerflow model, "
                        "so it cannot be saved by class and config; wrap your own network in "
                        "steerflow.models.ExternalVelocity (its weights then save unprefixed)")
    config = model.config
    try:
        json.dumps(config)
    except (TypeError, ValueError) as e:
        raise TypeError(f"the config of {type(model).__name__} is not JSON: {e}") from None
    return {"class": name, "config": config}


def spec_or_none(model: Any) -> dict[str, Any] | None:
    """:func:`model_spec`, or None where the model cannot be stored by class and config."""
    try:
        return model_spec(model)
    except TypeError:
        return None


def lookup_class(name: Any, where: str = "config") -> type[nn.Module]:
    """The registered class called ``name``; ``ValueError`` naming ``where`` for an unknown one."""
    if not isinstance(name, str):
        raise ValueError(f"{where}: the model class must be a string, got {name!r}")
    if name not in REGISTRY:
        if name in DEFINED_ELSEWHERE:
            raise ValueError(f"{where}: the model class {name!r} is defined in {DEFINED_ELSEWHERE[name]}: import it "
                             "first, or load with steerflow.training.load_checkpoint / load_run")
        raise ValueError(f"{where}: unknown model class {name!r}; expected one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def build_from_spec(spec: Any, where: str = "config", **children: Any) -> nn.Module:
    """A freshly initialised model from ``{"class", "config"}`` (or a checkpoint's ``{"name", "config"}``).

    ``children`` are passed to the class's ``from_config`` (``network=`` for :class:`ExternalVelocity`).
    """
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: a model spec must be an object {{'class', 'config'}}, got {spec!r}")
    name = spec.get("class", spec.get("name"))
    cls = lookup_class(name, where)
    config = spec.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{where}: the config of model {name!r} must be an object, got {config!r}")
    try:
        return cls.from_config(dict(config), **children)
    except TypeError as e:
        raise ValueError(f"{where}: bad config for model {name!r}: {e}") from None


# --- weights -------------------------------------------------------------------------------------------
def state_for_saving(model: nn.Module) -> dict[str, Tensor]:
    """The tensors to store for ``model``: :meth:`PretrainedMixin.pretrained_state_dict` or ``state_dict()``."""
    model = unwrap_model(model)
    return model.pretrained_state_dict() if isinstance(model, PretrainedMixin) else model.state_dict()


def load_saved_state(model: nn.Module, tensors: dict[str, Tensor], what: str = "weights") -> None:
    """Load tensors written by :func:`state_for_saving` into ``model`` (names and shapes checked)."""
    model = unwrap_model(model)
    if isinstance(model, PretrainedMixin):
        model.load_pretrained_state_dict(tensors, what)
    else:
        load_checked(model, tensors, what)


def load_checked(module: nn.Module, tensors: dict[str, Tensor], what: str) -> None:
    """``module.load_state_dict(tensors)`` after checking names and shapes, with one line naming them."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = sorted(k for k in set(own) & set(tensors) if tuple(own[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch at " + ", ".join(
                f"{k}: stored {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}" for k in shapes[:8]))
        if missing:
            parts.append(f"missing keys {missing[:8]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}")
        raise ValueError(f"{what} does not match the model: " + "; ".join(parts))
    module.load_state_dict(tensors)


def stored_dtype(tensors: dict[str, Tensor]) -> torch.dtype | None:
    """The one floating-point dtype of ``tensors`` (a loaded model takes it), or None when they mix dtypes."""
    dtypes = {v.dtype for v in tensors.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def read_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of a safetensors file, with one-line errors naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"missing weights file {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"corrupt weights file {path}: {' '.join(str(e).split())}") from None


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_weights(tensors: dict[str, Tensor], path: Path, *, fmt: str = FORMAT) -> None:
    """``tensors`` as a safetensors file tagged ``{"format": fmt}``, written atomically (CPU, contiguous,
    unshared copies: safetensors refuses shared or non-contiguous storage)."""
    from safetensors.torch import save_file

    plain = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    _write_atomic(path, lambda tmp: save_file(plain, tmp, metadata={"format": fmt}))


def write_json(obj: Any, path: Path) -> None:
    """``obj`` as indented JSON, written atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    _write_atomic(path, write)


def read_json(path: Path) -> Any:
    """Parsed JSON of ``path``; ``FileNotFoundError`` / ``ValueError`` naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt JSON in {path}: {e}") from None


# --- save / load ---------------------------------------------------------------------------------------
def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` (class and config) and ``model.safetensors`` (weights) of ``model`` into ``directory``.

    An old ``config.json`` is removed first, then the weights and the config are written, each atomically, so a
    directory with a ``config.json`` holds the weights it describes. DDP / compiled wrappers are unwrapped.
    ``TypeError`` for a model that cannot be stored by class and config (see :func:`model_spec`).
    """
    net = unwrap_model(model)
    spec = model_spec(net)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)  # overwriting: never an old config beside new weights
    write_weights(state_for_saving(net), out / WEIGHTS_FILE)
    write_json({"format": FORMAT, "format_version": FORMAT_VERSION, **spec}, out / CONFIG_FILE)
    return out


def _resolve(directory: str | os.PathLike) -> Path:
    p = Path(directory)
    if not p.exists():
        raise FileNotFoundError(f"no saved model: {p} does not exist")
    if p.is_file():
        if p.name == CONFIG_FILE:
            return p.parent
        raise ValueError(f"expected a model directory, got the file {p}")
    if (p / CONFIG_FILE).exists():
        return p
    latest = p / BEST if (p / BEST).exists() else p / LATEST  # a run that selected a checkpoint names it in best.json
    if latest.exists():
        pointer = read_json(latest)
        if not isinstance(pointer, dict) or not isinstance(pointer.get("checkpoint"), str):
            raise ValueError(f"corrupt checkpoint pointer {latest}: expected {{'checkpoint': <dir>}}, got {pointer!r}")
        ckpt = p / pointer["checkpoint"]
        if not (ckpt / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{latest} points at {ckpt}, which holds no {CONFIG_FILE}")
        return ckpt
    raise FileNotFoundError(f"no saved model in {p}: {p / CONFIG_FILE} is missing")


def spec_from_run_file(path: Path) -> dict[str, Any] | None:
    """The model spec of a ``steerflow train --manifold`` run from its ``run.json`` (``network`` and ``manifold``):
    the ``TangentVelocity`` it trained. None when the file is absent or records no manifold run."""
    if not path.is_file():
        return None
    info = read_json(path)
    if not isinstance(info, dict) or info.get("manifold") is None:
        return None
    net = info.get("network")
    if not (isinstance(net, dict) and isinstance(net.get("name"), str) and isinstance(net.get("config"), dict)):
        raise ValueError(f"corrupt {path}: a manifold run needs 'network': {{'name', 'config'}}, got {net!r}")
    return {"class": "tangent", "config": {"model": {"class": net["name"], "config": net["config"]},
                                           "manifold": info["manifold"], "embed": net.get("embed")}}


def read_model_config(directory: str | os.PathLike) -> tuple[Path, dict[str, Any] | None, dict[str, Any]]:
    """``(folder, spec, files)`` of a saved model or a training checkpoint at ``directory``.

    ``spec`` is the model's ``{"class", "config"}`` (None: a checkpoint of a model that is not registered),
    ``files`` maps ``"model"`` (and ``"ema"`` where an EMA was kept) to the weight files' names.
    """
    folder = _resolve(directory)
    path = folder / CONFIG_FILE
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise ValueError(f"corrupt {path}: expected a JSON object, got {type(meta).__name__}")
    fmt = meta.get("format")
    if fmt == FORMAT:
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"{path} has format_version {version!r}; this steerflow reads <= {FORMAT_VERSION}")
        if "class" not in meta or "config" not in meta:
            raise ValueError(f"corrupt {path}: missing {'class' if 'class' not in meta else 'config'}")
        return folder, {"class": meta["class"], "config": meta["config"]}, {"model": WEIGHTS_FILE}
    if fmt == CHECKPOINT_FORMAT:
        files = meta.get("files")
        if not isinstance(files, dict) or not isinstance(files.get("model"), str):
            raise ValueError(f"corrupt checkpoint {path}: missing entries ['files.model']")
        stored = meta.get("model") or {}
        spec = None
        if isinstance(stored, dict) and stored.get("name") is not None and stored.get("config") is not None:
            spec = {"class": stored["name"], "config": stored["config"]}
        else:  # older manifold runs: the spec is in run.json beside the checkpoints
            spec = spec_from_run_file(folder.parent / RUN_FILE) or spec_from_run_file(folder / RUN_FILE)
        return folder, spec, files
    raise ValueError(f"{path} is not a steerflow model: its format is {fmt!r}, expected {FORMAT!r} or "
                     f"{CHECKPOINT_FORMAT!r}")


def from_pretrained(directory: str | os.PathLike, *, ema: bool = True, device: str | torch.device = "cpu",
                    **children: Any) -> nn.Module:
    """The model saved in ``directory``, rebuilt from its ``config.json`` with its weights, in eval mode.

    ``directory`` is a :func:`save_pretrained` folder, a training checkpoint ``.../step-k`` or a training
    directory (its ``latest.json``). From a checkpoint the EMA weights are loaded when it kept an EMA and
    ``ema`` is true, the raw weights otherwise. ``children`` go to the class's ``from_config`` (``network=`` for an
    :class:`ExternalVelocity`, whose user network cannot be rebuilt from JSON). The model takes the dtype of
    the stored floating-point weights.

    Raises:
        FileNotFoundError: the directory or a file in it is missing (named).
        ValueError: corrupt JSON or weights, an unknown class, a config the class refuses, or weights whose
            names or shapes do not fit (the file and the keys are named).
    """
    folder, spec, files = read_model_config(directory)
    if spec is None:
        raise ValueError(f"{folder / CONFIG_FILE} stores no registered model class; load its weights with "
                         "steerflow.training.load_state(path, model) into a model you construct")
    model = build_from_spec(spec, str(folder / CONFIG_FILE), **children)
    weights = folder / files["ema" if ema and "ema" in files else "model"]
    tensors = read_weights(weights)
    dtype = stored_dtype(tensors)
    if dtype is not None:
        model.to(dtype)
    load_saved_state(model, tensors, f"weights {weights}")
    return model.to(device).eval()


__all__ = ["PretrainedMixin", "REGISTRY", "unwrap_model", "save_pretrained", "from_pretrained", "model_spec",
           "spec_or_none", "build_from_spec", "registered_name", "read_model_config", "state_for_saving",
           "load_saved_state", "load_checked", "FORMAT", "FORMAT_VERSION", "CONFIG_FILE", "WEIGHTS_FILE"]
