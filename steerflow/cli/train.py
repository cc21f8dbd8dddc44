"""``steerflow train``: flow matching on a named or file dataset, with a chosen coupling and path.

With ``--manifold M`` the same :func:`steerflow.training.train` runs Riemannian Flow Matching (Chen &
Lipman 2024): network ``TangentVelocity(MLP, M)`` (``v_θ(x, t) = P_x f_θ(x, t)``), path
``GeodesicPath(M)`` (``x_t = exp_{x_0}(t log_{x_0} x_1)``, loss ``|v_θ(x_t, t) - ẋ_t|²_{x_t}``), source
``M.random_base`` (uniform on compact manifolds), independent coupling.

On ``sphere2``, ``--base vmf`` trains from a von Mises–Fisher mixture fitted by EM to the training points
(:meth:`steerflow.manifolds.VonMisesFisherMixture.fit_em_select`): its number of components (``--base-components``)
and concentration cap (``--base-kappa-max``) are chosen by the mean NLL of held-out points — the validation part
of the 80/10/10 split with ``--split train``, else a random 10 % of the training points drawn with ``--seed``
(the chosen pair is then fitted again on all of them); a single candidate pair is fitted without a choice. The
mixture is saved as ``base.json`` + ``base.safetensors`` beside the checkpoints and recorded in ``run.json``;
``sample``, ``eval`` and ``plot`` use it. The output layer of the network (weights and bias of its last linear layer)
starts at zero, so the untrained velocity is 0 everywhere: the flow at step 0 is the identity and its density is
the base's.

``--select val`` (the default with ``--base vmf --split train``) keeps the checkpoint with the lowest validation
NLL: the weights that ``eval`` uses by default (EMA weights where kept) are scored on the validation part of the
split, ``-mean log p_1(x)`` by :func:`steerflow.manifolds.manifold_log_likelihood` (RK4, 32 steps, the run's base
density as ``log p_base``), at step 0 and at every checkpoint (``--ckpt-every``, and the last step). The run is
trained in parts that end at those checkpoints (``train``'s ``stop_at`` and ``resume``, so the trained weights are
those of one uninterrupted run). ``best.json`` names the selected checkpoint and holds the scores
(:func:`steerflow.training.checkpoint.select_checkpoint`; the step-0 weights are written as ``step-00000000`` when
they are the selected ones), ``run.json``'s ``selection`` records ``selected_step`` and the ``val_nll`` curve, and
``load_checkpoint(out)`` / ``load_run`` / ``sample`` / ``eval`` / ``plot`` load the selected checkpoint.
``latest.json`` still names the last checkpoint: ``--resume`` continues from it, and the scores so far come from
``best.json``. ``--select last`` (the default otherwise) keeps the last step, as before.

``--repeats`` (with ``--base vmf --split train``) is for catalogues whose events recur at the same coordinates: the
model is ``p(x) = λ Σ_u w_u vMF(x; s_u, κ) + (1 − λ) p_1(x)`` (:class:`steerflow.manifolds.RepeatedSites`), with
a component at each distinct training site ``s_u`` and the flow ``p_1`` — and its fitted base — trained on the
distinct sites (its base chosen on the validation points that repeat no training site). ``λ`` and the discount
``d`` are chosen on the validation split with each scored checkpoint; the pair of the kept checkpoint is saved as
``sites.json`` + ``sites.safetensors`` and recorded in ``run.json`` (``base.sites``); ``sample``, ``eval`` and
``plot`` use it.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
from pathlib import Path

import torch

from . import _common as C
from .main import CLIError, Command, register

BASES = ("uniform", "vmf")
SELECT = ("last", "val")
VAL_ODE = {"method": "rk4", "steps": 32}
"""The likelihood solve of ``--select val``'s validation NLL (a coarser grid than ``eval``'s RK4-64)."""
VAL_BATCH = 1024
SELECT_WORDS = {"last": "its last step", "val": "the checkpoint with the lowest validation NLL"}

COUPLINGS = ("independent", "exact-ot", "sinkhorn")
MODEL_CHOICES = ("mlp", "unet", "mlp-selu")
PATH_CHOICES = ("linear", "cosine", "vp")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="moons",
                   help="a built-in dataset name (e.g. moons, 8gaussians, digits) or a .npy/.npz file of samples")
    p.add_argument("--coupling", choices=COUPLINGS, default="independent",
                   help="how minibatch noise and data are paired: independent (I-CFM / 1-RF), exact-ot "
                        "(OT-CFM), sinkhorn (entropic OT)")
    p.add_argument("--coupling-workers", type=C.nonneg_int, default=None,
                   help="couple this many batches ahead in background threads while the current step trains; "
                        "the loss trace does not change (default: 1 for exact-ot/sinkhorn when the machine has a "
                        "second core, else 0)")
    p.add_argument("--steps", type=C.positive_int, default=5000, help="optimisation steps")
    p.add_argument("--batch", type=C.positive_int, default=256, help="batch size")
    p.add_argument("--out", default="steerflow_run", help="checkpoint directory")
    p.add_argument("--model", choices=MODEL_CHOICES, default=None,
                   help="network (default: mlp for vectors, unet for images)")
    p.add_argument("--hidden", type=C.positive_int, default=None, help="hidden width of the MLP")
    p.add_argument("--unet-width", type=C.positive_int, default=None, metavar="C",
                   help="base channel count of the U-Net (image data; default 32)")
    p.add_argument("--image-size", type=C.positive_int, default=None, metavar="N",
                   help="resize the images of an image-folder --data to N x N on load")
    p.add_argument("--lr", type=C.positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--lr-schedule", "--schedule", dest="schedule", choices=("cosine", "constant"), default="cosine",
                   help="learning-rate schedule after the warm-up (--schedule is the old name)")
    p.add_argument("--warmup", type=C.nonneg_int, default=0, metavar="N",
                   help="linear learning-rate warm-up over the first N steps")
    p.add_argument("--grad-clip", type=C.positive_float, default=None, metavar="G",
                   help="clip the global gradient norm to G (default: no clipping)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass (CUDA only)")
    p.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="also write the training curves for TensorBoard into DIR (default: <out>/tensorboard, "
                        "beside log.jsonl); needs pip install tensorboard")
    p.add_argument("--ema", type=C.unit_float, default=0.999, help="EMA decay of the weights (0 disables)")
    C.add_seed(p)
    C.add_checkpointing(p)
    p.add_argument("--source", default="normal", help="source distribution: normal, or a toy name (e.g. 8gaussians)")
    C.add_device(p)
    p.add_argument("--path", choices=PATH_CHOICES, default="linear",
                   help="probability path x_t = alpha_t x_1 + sigma_t x_0")
    p.add_argument("--unconditional", action="store_true",
                   help="ignore the labels of a labelled dataset (default: class-conditional with a null class)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--manifold", default=None,
                   help="train a flow on this manifold (sphere2, torus2, so3, hyperbolic2, products such as "
                        "sphere2xtorus1): Riemannian flow matching with geodesic paths from the uniform/base "
                        "distribution. --data is then volcano, earthquake, flood or a lat/lon .csv (sphere2), "
                        "or a .npy of points on the manifold")
    p.add_argument("--base", choices=BASES, default="uniform",
                   help="with --manifold: the flow's source. uniform: the manifold's base distribution "
                        "(uniform on compact manifolds); vmf (sphere2 only): a von Mises-Fisher mixture fitted "
                        "by EM to the training points, saved with the run; the network's output layer then starts "
                        "at zero, so the untrained flow is the identity and its density the base's")
    p.add_argument("--base-components", type=C.positive_int, nargs="+", default=None, metavar="K",
                   help="with --base vmf: the numbers of mixture components to try (default: 10 30 100 300, "
                        "each at most the number of training points); with several, the one whose fit scores "
                        "best on held-out points is kept: the validation split with --split train, else a "
                        "random 10%% of the training points")
    p.add_argument("--base-kappa-max", type=C.positive_float, nargs="+", default=None, metavar="KAPPA",
                   help="with --base vmf: the caps on the components' concentrations to try (default: 1e4), "
                        "chosen with --base-components")
    p.add_argument("--repeats", action="store_true",
                   help="with --base vmf --split train: give every distinct training site a component of its own "
                        "(events that recur at the same coordinates, e.g. a volcano erupting again), its weight "
                        "chosen on the validation split; the flow learns where new sites appear")
    p.add_argument("--split", choices=("all", "train"), default="all",
                   help="with --manifold: train on all points, or on the 80%% part of the random 80/10/10 "
                        "split drawn with --seed (then 'steerflow eval --split test' scores the held-out 10%%)")
    p.add_argument("--select", choices=SELECT, default=None,
                   help="with --manifold: which checkpoint the run keeps as its model. last: the last step; val "
                        "(needs --split train): the one with the lowest validation NLL among step 0 and every "
                        "checkpoint (--ckpt-every), named in best.json and used by sample/eval/plot (--resume "
                        "still continues from the last step). Default: val with --base vmf --split train (on one "
                        "process), else last")


def build(model_name: str | None, event_shape: tuple[int, ...], hidden: int | None, n_classes: int | None = None,
          unet_width: int | None = None):
    """Build the network for ``event_shape`` (vectors → MLP, (c, h, w) → U-Net with ``unet_width`` base
    channels), class-conditional with a null class (label dropout 0.1, for classifier-free guidance) when
    ``n_classes`` is given."""
    from ..models import build_model

    cond_kw = {} if n_classes is None else {"n_classes": int(n_classes), "label_dropout": 0.1}

    if model_name is None:
        model_name = "unet" if len(event_shape) == 3 else "mlp"
    if model_name in ("mlp", "mlp-selu"):
        if len(event_shape) != 1:
            raise CLIError(f"--model {model_name} needs vector data (n, d); the data has samples of shape "
                           f"{tuple(event_shape)} (use --model unet)")
        if unet_width is not None:
            raise CLIError(f"--unet-width applies to the U-Net (image data); --model {model_name} has --hidden")
        if model_name == "mlp-selu" and n_classes is not None:
            raise CLIError("--model mlp-selu is unconditional; the data has labels (add --unconditional)")
        kw = {"dim": int(event_shape[0]), **cond_kw}
        if hidden is not None:
            kw["hidden" if model_name == "mlp" else "width"] = hidden
        return build_model(model_name, **kw)
    if len(event_shape) != 3:
        raise CLIError(f"--model unet needs image data (n, c, h, w); the data has samples of shape {tuple(event_shape)}")
    c, h, w = event_shape
    width = {} if unet_width is None else {"base_channels": int(unet_width)}
    try:
        return build_model("unet", in_channels=int(c), image_size=int(h), **width, **cond_kw)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--model unet for images of shape {tuple(event_shape)}: {e}") from None


class _Unlabelled:
    """A labelled dataset seen without its labels."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def sample(self, n: int, generator=None):
        x = self.dataset.sample(n, generator=generator)
        return x[0] if isinstance(x, tuple) else x


def _check_resume(out: Path, model) -> None:
    """Refuse to resume a checkpoint of a different architecture, naming both configs."""
    from ..training import read_config

    try:
        stored = read_config(out).get("model") or {}
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(f"--resume {str(out)!r}: {e}") from None
    want = {"name": model.name, "config": model.config}
    if stored.get("name") != want["name"] or stored.get("config") != want["config"]:
        raise CLIError(f"--resume {str(out)!r}: the checkpoint holds {stored.get('name')} {stored.get('config')}, "
                       f"but this run builds {want['name']} {want['config']} (use the same --model/--hidden/--data)")


def _optimisation(args: argparse.Namespace, out: Path, device: torch.device) -> dict:
    """``train``'s ``config=`` (a :class:`~steerflow.training.TrainConfig` from the optimisation and checkpointing
    flags) and ``callbacks=``."""
    from ..training import TrainConfig

    if args.warmup > args.steps:
        raise CLIError(f"--warmup {args.warmup} is longer than the run (--steps {args.steps})")
    if args.bf16 and device.type != "cuda":
        raise CLIError(f"--bf16 (bfloat16 autocast) needs a CUDA device; the device is {device}")
    callbacks = None
    if args.tensorboard is not None:
        from ..training import TensorBoardLogger

        try:
            callbacks = [TensorBoardLogger(Path(args.tensorboard) if args.tensorboard else out / "tensorboard")]
        except ImportError as e:
            raise CLIError(f"--tensorboard: {e}") from None
    config = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=args.warmup,
                         lr_schedule=args.schedule, ema_decay=args.ema or None, grad_clip=args.grad_clip,
                         amp="bf16" if args.bf16 else None, seed=args.seed, ckpt_every=args.ckpt_every)
    return dict(config=config, callbacks=callbacks)


def _run_manifold(args: argparse.Namespace) -> int:
    """``train`` on a manifold: the same loop, with ``TangentVelocity``, ``GeodesicPath`` and ``M.random_base``."""
    from ..paths.geodesic import GeodesicPath
    from ..training import train

    manifold = C.manifold_of(args.manifold)
    if args.coupling != "independent":
        raise CLIError(f"--coupling {args.coupling} is not available with --manifold (minibatch OT on "
                       "manifolds is not implemented); use --coupling independent")
    for flag, val, default in (("--source", args.source, "normal"), ("--path", args.path, "linear")):
        if val != default:
            raise CLIError(f"{flag} {val} does not apply with --manifold: the source is {manifold.name}'s base "
                           "distribution and the path is the geodesic one")
    if args.model not in (None, "mlp"):
        raise CLIError(f"--model {args.model} is not available with --manifold; the network is an MLP "
                       "on ambient coordinates projected onto the tangent space (--model mlp)")
    for flag, val in (("--unet-width", args.unet_width), ("--image-size", args.image_size)):
        if val is not None:
            raise CLIError(f"{flag} applies to image data, not with --manifold")
    request = _base_request(args)
    if request is not None and manifold.name != "sphere2":
        raise CLIError(f"--base vmf is a von Mises-Fisher mixture on the sphere: it needs --manifold sphere2, "
                       f"not {manifold.name}")
    repeats = request is not None and request.get("repeats", False)
    if repeats and args.split != "train":
        raise CLIError("--repeats chooses the weight of the repeated sites on the validation split: it needs "
                       f"--split train (not --split {args.split})")
    select = _select_mode(args, request)
    device = C.device_of(args.device)
    points = C.load_manifold_data(args.data, manifold)
    split = args.split
    x_1 = C.split_points(points, split, args.seed)
    x_val = C.split_points(points, "val", args.seed) if split == "train" else None
    sites = None
    if repeats:  # a component per distinct training site; the flow and its base learn where new sites appear
        from ..manifolds.vmf import RepeatedSites

        sites = RepeatedSites.from_points(x_1)
        x_1 = sites.sites.to(x_1.dtype)
    config = {"dim": manifold.ambient_dim}
    if args.hidden is not None:
        config["hidden"] = args.hidden
    kind = C.network_embed(manifold)
    embed = {"embed": kind} if kind else {}
    if embed:  # (cos θ, sin θ) per angle in, the ambient velocity out
        config["in_dim"] = manifold.periodic_features(torch.zeros(1, *manifold.shape)).shape[1]  # (width only)
    with C.seeded(args.seed):  # initial weights from --seed, the caller's RNG untouched
        model = C.build_manifold_model(manifold, {"name": "mlp", "config": config, **embed})
    if request is not None:  # from a fitted base, the untrained flow is the base itself
        zero_output_layer(model)
    network = {"name": "mlp", "config": dict(model.model.config), **embed}
    out = Path(args.out)
    C.check_out(out, args.resume)
    info = C.RunInfo(data=args.data, source="base", kind="flow", coupling="independent", path="geodesic",
                     default_steps=100, default_method="euler", manifold=manifold.name, network=network,
                     split=split, split_seed=args.seed if split != "all" else None,
                     data_points=int(points.shape[0]), data_sha256=C.points_digest(points),
                     selection=None if select == "last" else {"metric": "val_nll", "weights": "ema" if args.ema
                                                              else "model", "ode": dict(VAL_ODE)})
    base = None
    if args.resume:
        old = C.RunInfo.load(out)
        old_split, new_split = (old.split or "all", old.split_seed), (info.split, info.split_seed)
        same_data = old.data_sha256 in (None, info.data_sha256)
        if (old.manifold, old.network, old_split) != (info.manifold, info.network, new_split) or not same_data:
            # (another split or other data would train on points the first part held out)
            raise CLIError(f"--resume {str(out)!r}: the checkpoint holds a {old.network} on {old.manifold} "
                           f"({_split_words(*old_split)}{'' if same_data else ', other data'}), but this run "
                           f"builds {network} on {manifold.name} ({_split_words(*new_split)})")
        old_request = None if old.base is None else {k: old.base[k] for k in ("name", "candidates", "repeats")
                                                     if k in old.base}
        if old_request != request:
            raise CLIError(f"--resume {str(out)!r}: the run was trained from {_base_words(old_request)}, but this "
                           f"run asks for {_base_words(request)} (use the same --base options)")
        if request is not None:  # the base it was trained from, as saved
            base, info = _load_saved_base(out), dataclasses.replace(info, base=old.base)
        old_select = "last" if old.selection is None else "val"
        if old_select != select:
            raise CLIError(f"--resume {str(out)!r}: the run keeps {SELECT_WORDS[old_select]} (--select "
                           f"{old_select}), but this run asks for --select {select} (pass --select {old_select})")
    options = _optimisation(args, out, device)
    if request is not None and base is None:
        base, record = _fit_base(request, x_1, x_val, args.seed, sites)
        info = dataclasses.replace(info, base=record)
    if sites is not None and not args.resume:  # the base's own choice of (λ, d) until a checkpoint is kept
        sites = sites.select(x_val, base.log_prob(x_val.double()))[0]
        info = dataclasses.replace(info, base={**info.base, "sites": _sites_record(sites)})
    if not args.resume and C.is_main_process():  # (before run.json, which names them; a killed attempt's are not ours)
        if base is not None:
            base.save(out, "base")
        else:
            for name in ("base.json", "base.safetensors"):
                (out / name).unlink(missing_ok=True)
        if sites is not None:
            sites.save(out, "sites")
        else:
            for name in ("sites.json", "sites.safetensors"):
                (out / name).unlink(missing_ok=True)
    C.begin_run(out, info, args.resume)
    source = manifold.random_base if base is None else base.sample
    kept = ""
    if select == "last":
        res = train(model, x_1, source=source, coupling=None, path=GeodesicPath(manifold), device=device,
                    out_dir=out, resume=args.resume, progress=not args.quiet, **options)
    else:
        score = validation_nll(x_val, manifold, None if base is None else base.log_prob, sites=sites)
        res, scores, best = _train_selecting(model, x_1, source=source, path=GeodesicPath(manifold),
                                             device=device, out=out, resume=args.resume, quiet=args.quiet,
                                             score=score, **options)
        info = dataclasses.replace(info, selection={**info.selection, "selected_step": best,
                                                    "val_nll": {str(k): scores[k] if math.isfinite(scores[k])
                                                                else None for k in sorted(scores)}})
        kept = (f"; kept step {best} of the lowest validation NLL {scores[best]:.4g} (step 0: {scores[0]:.4g}, "
                f"last: {scores[res.step]:.4g}; best.json)")
    final = res.losses[-max(1, len(res.losses) // 10):].mean().item()
    if sites is not None:  # (λ, d) of the kept weights, chosen on validation
        from ..training.run import load_run

        kept_model = load_run(out, ema=True, info=info).model
        sites = sites.select(x_val, _val_log_prob(kept_model, x_val, manifold, base.log_prob))[0]
        if C.is_main_process():
            sites.save(out, "sites")
        info = dataclasses.replace(info, base={**info.base, "sites": _sites_record(sites)})
        kept += f"; repeated sites: {len(sites)}, weight {sites.weight:.2f} (sites.json)"
    from_base = "" if base is None else f" from a vMF mixture of {len(base)} components (base.json)"
    trained_on = f"{x_1.shape[0]} points" if sites is None else \
        f"the {len(sites)} distinct sites of {int(sites.counts.sum())} points"
    C.end_run(out, info, f"trained TangentVelocity(MLP) on {manifold.name}{from_base} for {args.steps} steps on "
                         f"{trained_on} of {args.data} ({args.split}); final loss {final:.4g}{kept}; "
                         f"checkpoint in {out}")
    return 0


def zero_output_layer(model: torch.nn.Module) -> None:
    """Zero the output layer of ``TangentVelocity(MLPVelocity)``'s network (:meth:`MLPVelocity.zero_output_
    <steerflow.models.MLPVelocity.zero_output_>`): ``v_θ = P_x f_θ ≡ 0``, so the flow maps every point to itself
    until trained."""
    from ..models import MLPVelocity

    net = model.model
    if not isinstance(net, MLPVelocity):
        raise TypeError(f"expected TangentVelocity(MLPVelocity), got a network of type {type(net).__name__}")
    net.zero_output_()


def _select_mode(args: argparse.Namespace, request: dict | None) -> str:
    """``--select``, or its default: ``val`` with a fitted base and a validation split (one process), else ``last``."""
    from ..training.distributed import env_requests_distributed

    if args.select is None:
        fits = request is not None and args.split == "train" and not env_requests_distributed()
        return "val" if fits else "last"
    if args.select == "val" and args.split != "train":
        raise CLIError("--select val keeps the checkpoint with the lowest NLL on the validation split: it needs "
                       f"--split train (not --split {args.split})")
    if args.select == "val" and env_requests_distributed():
        raise CLIError("--select val scores checkpoints in one process; under torchrun pass --select last")
    return args.select


def _val_log_prob(net: torch.nn.Module, x_val: torch.Tensor, manifold, base_log_prob=None) -> torch.Tensor:
    """``log p_1(x)`` (float64, on the CPU) of the flow of ``net`` at ``x_val``:
    :func:`~steerflow.manifolds.manifold_log_likelihood` with :data:`VAL_ODE`, ``VAL_BATCH`` points per solve, no
    autograd graph, ``net`` in eval mode for the solve."""
    from ..manifolds import manifold_log_likelihood

    was_training = net.training
    net.eval()
    try:
        x = x_val.to(next(net.parameters()).device)
        logp = manifold_log_likelihood(net, x, manifold, batch_size=VAL_BATCH, base_log_prob=base_log_prob,
                                       **VAL_ODE)
    finally:
        net.train(was_training)
    return logp.double().cpu()


def validation_nll(x_val: torch.Tensor, manifold, base_log_prob=None, sites=None):
    """``score(net) -> float``: ``-mean log p_1(x)`` over ``x_val`` of the flow of ``net`` (``base_log_prob``
    default ``manifold.base_log_prob``), +inf when not finite. With ``sites`` (a
    :class:`~steerflow.manifolds.RepeatedSites`): the NLL of ``sites.log_prob(x, log p_1(x))`` with ``(λ, d)``
    chosen on ``x_val`` for these weights."""

    def score(net: torch.nn.Module) -> float:
        logp = _val_log_prob(net, x_val, manifold, base_log_prob)
        nll = float(-logp.mean()) if sites is None else sites.select(x_val, logp)[1]
        return nll if math.isfinite(nll) else math.inf

    return score


def _train_selecting(model, x_1, *, source, path, device, out: Path, resume: bool, quiet: bool, score, config,
                     callbacks):
    """``train`` in parts ending at each checkpoint, ``score`` (lower is better) of the weights ``eval`` uses at
    step 0 and after each part, ``best.json`` pointed at the lowest. Returns the last part's result, the scores
    ``{step: score}`` and the selected step."""
    from ..training import load_checkpoint, train
    from ..training.callbacks import Callbacks
    from ..training.checkpoint import (LATEST, best_step, read_config, read_selection, save_checkpoint,
                                       select_checkpoint)

    initial = copy.deepcopy(model)  # step 0's weights (a resumed run rebuilds the same ones from --seed)
    callbacks = Callbacks(callbacks)
    resumed = resume and (out / LATEST).exists()
    start = int(read_config(out)["step"]) if resumed else 0
    chosen = read_selection(out) if resumed else None
    scores = {k: v for k, v in (chosen or {}).get("scores", {}).items() if k <= start}
    if 0 not in scores:
        scores[0] = score(initial)
    if start not in scores:  # (a run killed between its checkpoint and the checkpoint's score)
        ckpt = load_checkpoint(out, latest=True, device=device)
        scores[start] = score(ckpt.ema_model if ckpt.ema_model is not None else ckpt.model)
    every, steps = config.ckpt_every, config.steps
    stops = [k for k in sorted({*range(every or steps, steps, every or steps), steps}) if k > start] or [steps]
    saved_initial = False
    best = 0
    for i, stop in enumerate(stops):
        part = dataclasses.replace(config, stop_at=stop if stop < steps else None)
        res = train(model, x_1, source=source, coupling=None, path=path, device=device, out_dir=out,
                    resume=resume or i > 0, progress=not quiet, config=part, callbacks=callbacks.on_log)
        if res.step not in scores:
            scores[res.step] = score(res.ema if res.ema is not None else res.model)
        if best_step(scores) == 0 and not saved_initial:  # the untrained flow is the best
            save_checkpoint(out, initial, ema=initial if config.ema_decay else None,
                            config=read_config(out)["training"], step=0, extra={"losses": torch.zeros(0)},
                            update_latest=False)
            saved_initial = True
        best = select_checkpoint(out, scores, metric="val_nll")
        if not quiet:
            print(f"step {res.step}: validation NLL {scores[res.step]:.4f} (kept: step {best}, {scores[best]:.4f})",
                  file=sys.stderr)
    callbacks.on_end(res)
    return res, scores, best


def _base_words(request: dict | None) -> str:
    if request is None:
        return "the manifold's base distribution (--base uniform)"
    c = request.get("candidates") or {}
    return (f"--base {request.get('name')} (--base-components {' '.join(map(str, c.get('components', [])))} "
            f"--base-kappa-max {' '.join(f'{k:g}' for k in c.get('kappa_max', []))}"
            f"{' --repeats' if request.get('repeats') else ''})")


def _load_saved_base(out: Path):
    from ..manifolds.vmf import VonMisesFisherMixture

    try:
        return VonMisesFisherMixture.load(out, "base")
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(f"--resume {str(out)!r}: the run's fitted base cannot be loaded ({C._msg(e)})") from None


def _base_request(args: argparse.Namespace) -> dict | None:
    """What ``--base`` asks for: None (the manifold's base distribution) or the candidates of a vMF mixture."""
    from ..manifolds.vmf import DEFAULT_COMPONENTS

    if args.base == "uniform":
        for flag, val in (("--base-components", args.base_components), ("--base-kappa-max", args.base_kappa_max),
                          ("--repeats", args.repeats or None)):
            if val is not None:
                raise CLIError(f"{flag} applies with --base vmf (a fitted von Mises-Fisher mixture on sphere2)")
        return None
    request = {"name": "vmf", "candidates": {"components": list(args.base_components or DEFAULT_COMPONENTS),
                                             "kappa_max": list(args.base_kappa_max or (1e4,))}}
    return {**request, "repeats": True} if args.repeats else request


CHOSEN_ON = {"held_out": "val", "train_slice": "10% of the training points (held out, then fitted on all)",
             None: None}
"""Where ``run.json`` says the base's ``(K, κ_max)`` was chosen (from ``EMSelection.chosen_on``)."""


def _fit_base(request: dict, x_1: torch.Tensor, held_out: torch.Tensor | None, seed: int, sites=None):
    """The vMF mixture ``request`` asks for, fitted to the training points ``x_1`` (chosen on ``held_out``, the
    validation part of the split with ``--split train``, else on a 10 % slice of ``x_1``), and its ``run.json``
    record. With ``sites`` (``--repeats``) ``x_1`` are the distinct sites and the choice is made on the held-out
    points that repeat none."""
    from ..manifolds.vmf import VonMisesFisherMixture

    if sites is not None and held_out is not None:
        new = held_out[~sites.repeats(held_out)]
        held_out = new if new.shape[0] else held_out
    c = request["candidates"]
    try:
        mix, sel = VonMisesFisherMixture.fit_em_select(x_1, held_out, c["components"], c["kappa_max"], seed=seed)
    except ValueError as e:
        raise CLIError(f"--base vmf: {C._msg(e)}") from None
    record = {**request, "file": "base.json", "components": sel.components, "kappa_max": sel.kappa_max,
              "fitted_components": sel.fitted, "chosen_on": CHOSEN_ON[sel.chosen_on], "held_out_nll": sel.held_out_nll}
    return mix, record


def _sites_record(sites) -> dict:
    """``run.json``'s ``base.sites``: the file and the chosen weight of the repeated sites."""
    from ..training.run import SITES_NAME

    return {"name": SITES_NAME, "file": f"{SITES_NAME}.json", "sites": len(sites), "events": int(sites.counts.sum()),
            "kappa": sites.kappa, "weight": sites.weight, "discount": sites.discount, "chosen_on": "val"}


def _split_words(split: str, seed: int | None) -> str:
    return f"split {split}" + (f", seed {seed}" if seed is not None else "")


def run(args: argparse.Namespace) -> int:
    from ..training import train
    from ..training.checkpoint import LATEST

    if args.manifold is not None:
        return _run_manifold(args)
    if args.split != "all":
        raise CLIError("--split applies with --manifold only")
    if args.select is not None:
        raise CLIError("--select applies with --manifold only")
    if args.base != "uniform":
        raise CLIError(f"--base {args.base} is a source on the sphere: it needs --manifold sphere2 (flat flows "
                       "choose theirs with --source)")
    _base_request(args)  # (--base-components / --base-kappa-max without --base vmf)
    device = C.device_of(args.device)
    dataset = C.load_data(args.data, image_size=args.image_size)
    event_shape = tuple(C.data_sampler(dataset)(2, C.generator(0)).shape[1:])
    n_classes = None
    if getattr(dataset, "labels", None) is not None:
        if args.unconditional:
            dataset = _Unlabelled(dataset)
        else:
            classes = getattr(dataset, "classes", None)
            n_classes = len(classes) if classes else int(dataset.labels.max()) + 1
    with C.seeded(args.seed):  # initial weights from --seed, the caller's RNG untouched
        model = build(args.model, event_shape, args.hidden, n_classes, unet_width=args.unet_width)
    source = C.source_sampler(args.source, event_shape)
    out = Path(args.out)
    C.check_out(out, args.resume)
    if args.resume and (out / LATEST).exists():
        _check_resume(out, model)
    coupling = None if args.coupling == "independent" else args.coupling  # independent: no re-pairing
    info = C.RunInfo(data=args.data, source=args.source, kind="flow", coupling=args.coupling, path=args.path,
                     extra={} if args.image_size is None else {"image_size": args.image_size})
    options = _optimisation(args, out, device)
    C.begin_run(out, info, args.resume)  # (an interrupted run's checkpoint then samples from the right source)
    options["config"] = dataclasses.replace(options["config"],
                                            coupling_workers=C.coupling_workers(args.coupling_workers, coupling))
    res = train(model, dataset, source=source, coupling=coupling, path=args.path, device=device, out_dir=out,
                resume=args.resume, progress=not args.quiet, **options)
    final = res.losses[-max(1, len(res.losses) // 10):].mean().item()
    C.end_run(out, info, f"trained {type(model).__name__} for {args.steps} steps ({args.coupling} coupling); "
                         f"final loss {final:.4g}; checkpoint in {out}")
    return 0


register(Command("train", "train a flow-matching model (I-CFM / 1-RF, OT-CFM, Sinkhorn-CFM)", configure, run,
                 description="Train a velocity field v(x, t) by conditional flow matching.\n"
                             "Example:  steerflow train --data moons --coupling exact-ot --steps 5000 --out runs/ot\n"
                             "A killed run continues where its last checkpoint (--ckpt-every) left it:  "
                             "the same command with --resume\n"
                             "On the sphere:  steerflow train --manifold sphere2 --data volcano --split train "
                             "--seed 0 --base vmf --out runs/volcano"))
