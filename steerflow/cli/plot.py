"""``steerflow plot``: a PNG of samples (scatter or image grid) or of a checkpoint's ODE trajectories."""
from __future__ import annotations

import argparse
import sys

import torch

from . import _common as C
from .main import CLIError, Command, register


def configure(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help=".npy file of samples (n, 2) or images (n, c, h, w)")
    src.add_argument("--ckpt", help="checkpoint directory: sample it (or draw its trajectories)")
    p.add_argument("--out", default="samples.png", help="output PNG")
    p.add_argument("--kind", choices=("samples", "trajectories"), default="samples",
                   help="what to draw; trajectories need --ckpt and 2-D data")
    p.add_argument("--data", default=None,
                   help="dataset drawn behind 2-D samples (default: the checkpoint's dataset, if any)")
    p.add_argument("--n", type=C.positive_int, default=2000, help="samples to draw with --ckpt")
    p.add_argument("--steps", type=C.positive_int, default=None, help="solver steps with --ckpt")
    p.add_argument("--method", choices=("euler", "midpoint", "heun", "rk4", "dopri5"), default=None,
                   help="solver with --ckpt")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    C.add_seed(p)
    C.add_device(p)


def run(args: argparse.Namespace) -> int:
    from ..plotting import plot_samples, plot_trajectories
    from ..solvers import sample
    from .sample import draw

    if not str(args.out).lower().endswith(".png"):
        raise CLIError(f"--out must be a .png file, got {args.out!r}")
    device = C.device_of(args.device)
    data_name = args.data
    loaded = None
    if args.ckpt:
        loaded = C.load_flow(args.ckpt, ema=args.ema, device=device)
        data_name = data_name or loaded.info.data
    elif args.kind == "trajectories":
        raise CLIError("--kind trajectories needs --ckpt (a .npy file holds end points only)")
    reference = None
    if data_name is not None:
        reference = C.data_sampler(C.load_data(data_name))(args.n, C.generator(args.seed + 1))
    if args.kind == "trajectories":
        if tuple(loaded.model.event_shape) != (2,):
            raise CLIError(f"--kind trajectories draws 2-D flows; this model generates {tuple(loaded.model.event_shape)}")
        n = min(args.n, 256)
        x_0 = C.source_sampler(loaded.info.source, (2,))(n, C.generator(args.seed)).to(device)
        method = args.method or ("euler" if loaded.info.kind == "distilled" else "rk4")
        steps = args.steps or (1 if loaded.info.kind == "distilled" else 32)
        with torch.no_grad():
            traj = sample(loaded.model, x_0, steps=steps if method != "dopri5" else None, method=method,
                          return_trajectory=True)
        label = f"{loaded.info.kind} ({method}, NFE {traj.nfe})"
        plot_trajectories({label: traj.xs.cpu()}, args.out, data=reference)
    else:
        if loaded is not None:
            x = draw(loaded, args.n, steps=args.steps, method=args.method, seed=args.seed, device=device)
            title = f"{loaded.info.kind} samples"
        else:
            x = torch.from_numpy(C.load_npy(args.samples))
            title = f"{x.shape[0]} samples"
        if reference is not None and tuple(reference.shape[1:]) != tuple(x.shape[1:]):
            raise CLIError(f"--data {data_name!r} has samples of shape {tuple(reference.shape[1:])}, the samples "
                           f"have shape {tuple(x.shape[1:])}")
        try:
            plot_samples(x, args.out, data=reference, title=title)
        except ValueError as e:
            raise CLIError(f"cannot plot samples of shape {tuple(x.shape)}: {e}") from None
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


register(Command("plot", "plot samples, images or trajectories to a PNG", configure, run,
                 description="Draw samples over the data, an image grid, or ODE trajectories.\n"
                             "Example:  steerflow plot --ckpt runs/2rf --kind trajectories --out traj.png"))
