"""``steerflow sample``: draw samples from a checkpoint with a chosen solver and time grid."""
from __future__ import annotations

import argparse
import sys

import torch

from . import _common as C
from .main import CLIError, Command, register

METHODS = ("euler", "midpoint", "heun", "rk4", "dopri5")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory (from train, reflow or distill)")
    p.add_argument("--n", type=C.positive_int, default=1000, help="number of samples")
    p.add_argument("--steps", type=C.positive_int, default=None,
                   help="solver steps (default: 1 for a distilled model, else 100; dopri5 is adaptive)")
    p.add_argument("--method", choices=METHODS, default=None, help="step rule (default: euler)")
    p.add_argument("--out", default="samples.npy", help="output .npy file, shape (n, *d)")
    C.add_seed(p)
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights when the checkpoint has them")
    p.add_argument("--grid", choices=("uniform", "shifted"), default="uniform", help="time grid")
    p.add_argument("--shift", type=C.positive_float, default=3.0, help="shift of the shifted grid (SD3)")
    p.add_argument("--batch", type=C.positive_int, default=4096, help="solve this many samples at a time")
    C.add_device(p)


def draw(loaded: C.Loaded, n: int, *, steps: int | None, method: str | None, seed: int, grid: str = "uniform",
         shift: float = 3.0, batch: int = 4096, device: torch.device | str = "cpu",
         return_source: bool = False):
    """Sample ``n`` points from a loaded checkpoint: ``x_0 ~ source``, then the ODE solve."""
    from ..solvers import sample, shifted_grid, uniform_grid

    info = loaded.info
    method = method or info.default_method
    steps = steps or info.default_steps
    event_shape = tuple(loaded.model.event_shape)
    g = C.generator(seed)
    x_0 = C.source_sampler(info.source, event_shape)(n, g)
    ts = None
    if method != "dopri5":
        ts = shifted_grid(steps, shift) if grid == "shifted" else uniform_grid(steps)
    out = []
    with torch.no_grad():
        for i in range(0, n, batch):
            xb = x_0[i:i + batch].to(device)
            out.append(sample(loaded.model, xb, ts=ts, method=method, generator=g).cpu())
    x_1 = torch.cat(out)
    return (x_0, x_1) if return_source else x_1


def run(args: argparse.Namespace) -> int:
    device = C.device_of(args.device)
    if not str(args.out).endswith(".npy"):
        raise CLIError(f"--out must be a .npy file, got {args.out!r}")
    loaded = C.load_flow(args.ckpt, ema=args.ema, device=device)
    x = draw(loaded, args.n, steps=args.steps, method=args.method, seed=args.seed, grid=args.grid, shift=args.shift,
             batch=args.batch, device=device)
    C.save_npy(args.out, x.numpy())
    print(f"wrote {tuple(x.shape)} samples to {args.out}", file=sys.stderr)
    return 0


register(Command("sample", "draw samples from a checkpoint into a .npy file", configure, run,
                 description="Integrate the flow from source noise.\n"
                             "Example:  steerflow sample --ckpt runs/ot --n 2000 --steps 4 --method euler --out s.npy"))
