"""``steerflow train``: flow matching on a named or file dataset, with a chosen coupling and path.

With ``--manifold M`` the same :func:`steerflow.training.train` runs Riemannian Flow Matching (Chen &
Lipman 2024): network ``TangentVelocity(MLP, M)`` (``v_θ(x, t) = P_x f_θ(x, t)``), path
``GeodesicPath(M)`` (``x_t = exp_{x_0}(t log_{x_0} x_1)``, loss ``|v_θ(x_t, t) - ẋ_t|²_{x_t}``), source
``M.random_base`` (uniform on compact manifolds), independent coupling.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from . import _common as C
from .main import CLIError, Command, register

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
    p.add_argument("--split", choices=("all", "train"), default="all",
                   help="with --manifold: train on all points, or on the 80%% part of the random 80/10/10 "
                        "split drawn with --seed (then 'steerflow eval --split test' scores the held-out 10%%)")


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
    device = C.device_of(args.device)
    points = C.load_manifold_data(args.data, manifold)
    split = args.split
    x_1 = C.split_points(points, split, args.seed)
    config = {"dim": manifold.ambient_dim}
    if args.hidden is not None:
        config["hidden"] = args.hidden
    kind = C.network_embed(manifold)
    embed = {"embed": kind} if kind else {}
    if embed:  # (cos θ, sin θ) per angle in, the ambient velocity out
        config["in_dim"] = manifold.periodic_features(torch.zeros(1, *manifold.shape)).shape[1]  # (width only)
    with C.seeded(args.seed):  # initial weights from --seed, the caller's RNG untouched
        model = C.build_manifold_model(manifold, {"name": "mlp", "config": config, **embed})
    network = {"name": "mlp", "config": dict(model.model.config), **embed}
    out = Path(args.out)
    C.check_out(out, args.resume)
    info = C.RunInfo(data=args.data, source="base", kind="flow", coupling="independent", path="geodesic",
                     default_steps=100, default_method="euler", manifold=manifold.name, network=network,
                     split=split, split_seed=args.seed if split != "all" else None,
                     data_points=int(points.shape[0]), data_sha256=C.points_digest(points))
    if args.resume:
        old = C.RunInfo.load(out)
        old_split, new_split = (old.split or "all", old.split_seed), (info.split, info.split_seed)
        same_data = old.data_sha256 in (None, info.data_sha256)
        if (old.manifold, old.network, old_split) != (info.manifold, info.network, new_split) or not same_data:
            # (another split or other data would train on points the first part held out)
            raise CLIError(f"--resume {str(out)!r}: the checkpoint holds a {old.network} on {old.manifold} "
                           f"({_split_words(*old_split)}{'' if same_data else ', other data'}), but this run "
                           f"builds {network} on {manifold.name} ({_split_words(*new_split)})")
    options = _optimisation(args, out, device)
    C.begin_run(out, info, args.resume)
    res = train(model, x_1, source=manifold.random_base, coupling=None, path=GeodesicPath(manifold), device=device,
                out_dir=out, resume=args.resume, progress=not args.quiet, **options)
    final = res.losses[-max(1, len(res.losses) // 10):].mean().item()
    C.end_run(out, info, f"trained TangentVelocity(MLP) on {manifold.name} for {args.steps} steps on "
                         f"{x_1.shape[0]} points of {args.data} ({args.split}); final loss {final:.4g}; "
                         f"checkpoint in {out}")
    return 0


def _split_words(split: str, seed: int | None) -> str:
    return f"split {split}" + (f", seed {seed}" if seed is not None else "")


def run(args: argparse.Namespace) -> int:
    from ..training import train
    from ..training.checkpoint import LATEST

    if args.manifold is not None:
        return _run_manifold(args)
    if args.split != "all":
        raise CLIError("--split applies with --manifold only")
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
                             "--seed 0 --out runs/volcano"))
