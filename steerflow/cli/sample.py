"""``steerflow sample``: draw samples from a checkpoint with a chosen solver and time grid.

A checkpoint trained with ``--manifold M`` is sampled by the same solver loop from ``x_0 ~ M.random_base`` (or
from the fitted base saved with the run, ``train --base vmf``) with ``geometry=M`` (every step retracts onto
``M``); on ``sphere2`` the samples can be written as latitude/longitude in degrees (``--latlon``, or an ``--out``
ending in ``.csv``).
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import _common as C
from .main import CLIError, Command, register
from .pipeline import add_pipeline_args, is_pipeline_folder, run_sample

METHODS = ("euler", "midpoint", "heun", "rk4", "dopri5")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", default=None, help="checkpoint directory (from train, reflow or distill)")
    p.add_argument("--n", type=C.positive_int, default=None,
                   help="number of samples (default 1000; with --pipeline: images per prompt, default 1)")
    p.add_argument("--steps", type=C.positive_int, default=None,
                   help="solver steps (default: 1 for a distilled model, 28 for a pipeline, else 100; dopri5 is "
                        "adaptive)")
    p.add_argument("--method", choices=METHODS, default=None, help="step rule (default: euler)")
    p.add_argument("--out", default="samples.npy",
                   help="output .npy file, shape (n, *d); for a sphere2 checkpoint also a .csv of lat,lon; for an "
                        "image model (and --pipeline) a .png/.jpg grid of the images")
    p.add_argument("--latlon", action="store_true",
                   help="sphere2 checkpoints: write latitude/longitude in degrees, (n, 2), instead of unit "
                        "vectors (n, 3) (implied by an --out ending in .csv)")
    C.add_seed(p)
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights when the checkpoint has them")
    p.add_argument("--grid", choices=("uniform", "shifted"), default="uniform", help="time grid")
    p.add_argument("--shift", type=C.positive_float, default=3.0, help="shift of the shifted grid (SD3)")
    p.add_argument("--batch", type=C.positive_int, default=4096, help="solve this many samples at a time")
    C.add_device(p)
    C.add_quiet(p)
    add_pipeline_args(p, prompt_help="text prompt (with --pipeline)")


def draw(loaded: C.Loaded, n: int, *, steps: int | None, method: str | None, seed: int, grid: str = "uniform",
         shift: float = 3.0, batch: int = 4096, device: torch.device | str = "cpu",
         return_source: bool = False, progress: bool = False):
    """Sample ``n`` points from a loaded checkpoint: ``x_0 ~ source``, then the ODE solve.

    For a manifold checkpoint ``x_0 ~ M.random_base``, or ``x_0 ~ loaded.base.sample`` when the run saved a fitted
    base, and the solve runs with ``geometry=M``. A run with repeated sites (``train --repeats``) draws each point
    from its sites with probability ``λ`` (``RepeatedSites.sample``), else from the flow; ``x_0`` of a site draw is
    the point itself.
    """
    def flow(m: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return _draw_flow(loaded, m, g, steps=steps, method=method, grid=grid, shift=shift, batch=batch,
                          device=device, progress=progress)

    sites = getattr(loaded, "sites", None)
    if sites is None:
        x_0, x_1 = flow(n, C.generator(seed))
        return (x_0, x_1) if return_source else x_1
    sources = []  # the flow's x_0 of the draws not at a site

    def flow_points(m: int, _) -> torch.Tensor:
        x_0, x_1 = flow(m, C.generator(seed))
        sources.append(x_0)
        return x_1

    x_1, at_site = sites.sample(n, flow_points, C.generator(seed + 1), with_mask=True)
    if not return_source:
        return x_1
    x_0 = x_1.clone()
    if sources:
        x_0[~at_site] = sources[0].to(x_0.dtype)
    return x_0, x_1


def _draw_flow(loaded: C.Loaded, n: int, g: torch.Generator, *, steps: int | None, method: str | None, grid: str,
               shift: float, batch: int, device, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_0, x_1)``: ``n`` source draws with ``g`` and their ODE solves (the flow of :func:`draw`)."""
    from ..solvers import sample, shifted_grid, uniform_grid

    info = loaded.info
    method = method or info.default_method
    steps = steps or info.default_steps
    manifold = getattr(loaded, "manifold", None)
    base = getattr(loaded, "base", None)
    if base is not None:
        x_0 = base.sample(n, g)
    elif manifold is None:
        x_0 = C.source_sampler(info.source, tuple(loaded.model.event_shape))(n, g)
    else:
        x_0 = manifold.random_base(n, g)
    ts = None
    if method != "dopri5":
        ts = shifted_grid(steps, shift) if grid == "shifted" else uniform_grid(steps)
    out = []
    starts = range(0, n, batch)
    many = progress and len(starts) > 1  # one bar over the batches; a single batch shows its solver steps
    if many:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="sampling", unit="batch", leave=False)
    with torch.no_grad():
        for i in starts:
            xb = x_0[i:i + batch].to(device)
            out.append(sample(loaded.model, xb, ts=ts, method=method, generator=g, geometry=manifold,
                              progress=progress and not many).cpu())
    return x_0, torch.cat(out)


def write_latlon(path: str, x: torch.Tensor) -> None:
    """Write points on ``S²`` (n, 3) as latitude/longitude in degrees: a ``.csv`` with a ``lat,lon`` header
    or a ``.npy`` of shape (n, 2)."""
    import numpy as np

    from ..data.earth import xyz_to_latlon

    lat, lon = xyz_to_latlon(x.double())
    ll = torch.stack([lat, lon], -1).numpy()
    if str(path).lower().endswith(".csv"):
        from pathlib import Path

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        np.savetxt(tmp, ll, delimiter=",", header="lat,lon", comments="", fmt="%.6f")
        tmp.replace(p)
    else:
        C.save_npy(path, ll)


def run(args: argparse.Namespace) -> int:
    if args.pipeline is not None or is_pipeline_folder(args.ckpt):
        args.n = args.n or 1
        return run_sample(args)
    if args.ckpt is None:
        raise CLIError("sample needs --ckpt (a steerflow checkpoint) or --pipeline (a diffusers pipeline folder)")
    args.n = args.n or 1000
    device = C.device_of(args.device)
    out = str(args.out)
    image_out = out.lower().endswith((".png", ".jpg", ".jpeg"))
    if not (out.lower().endswith((".npy", ".csv")) or image_out):
        raise CLIError(f"--out must be a .npy file (a .csv for --latlon, a .png/.jpg grid for image models), "
                       f"got {args.out!r}")
    loaded = C.load_flow(args.ckpt, ema=args.ema, device=device, allow_manifold=True)
    if image_out:
        from .steer import image_shape

        try:
            shape = image_shape(tuple(loaded.model.event_shape))
        except CLIError:
            raise CLIError(f"a .png/.jpg grid is for image models; {args.ckpt!r} holds states of shape "
                           f"{tuple(loaded.model.event_shape)} (write a .npy)") from None
    latlon = args.latlon or out.lower().endswith(".csv")
    name = loaded.manifold.name if loaded.manifold is not None else None
    if latlon and name != "sphere2":
        what = f"a flow on {name}" if name else "a flat flow"
        raise CLIError(f"--latlon and .csv output are for sphere2 checkpoints; {args.ckpt!r} holds {what} "
                       "(write a .npy)")
    x = draw(loaded, args.n, steps=args.steps, method=args.method, seed=args.seed, grid=args.grid, shift=args.shift,
             batch=args.batch, device=device, progress=not args.quiet)
    if latlon:
        write_latlon(out, x)
        print(f"wrote {x.shape[0]} samples as latitude/longitude (degrees) to {out}", file=sys.stderr)
    elif image_out:
        from ..data.images import save_image

        save_image(x.reshape(x.shape[0], *shape).clamp(-1, 1), out)
        print(f"wrote a grid of {x.shape[0]} images {shape} to {out}", file=sys.stderr)
    else:
        C.save_npy(out, x.numpy())
        print(f"wrote {tuple(x.shape)} samples to {out}", file=sys.stderr)
    return 0


register(Command("sample", "draw samples from a checkpoint or a diffusers pipeline (.npy, or a .png/.jpg grid)",
                 configure, run,
                 description="Integrate the flow from source noise.\n"
                             "Example:  steerflow sample --ckpt runs/ot --n 2000 --steps 4 --method euler --out s.npy\n"
                             "On the sphere:  steerflow sample --ckpt runs/volcano --n 2000 --out s.csv\n"
                             "A diffusers pipeline:  steerflow sample --pipeline sd3/ --prompt 'a cat' --n 4 "
                             "--steps 28 --guidance 7 --out grid.png"))
