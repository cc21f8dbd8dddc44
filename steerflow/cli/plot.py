"""``steerflow plot``: a PNG of samples (scatter or image grid) or of a checkpoint's ODE trajectories.

Points on the sphere ``S²`` (a ``sphere2`` checkpoint, a ``.csv`` of latitude/longitude, or a ``.npy`` of
unit vectors with ``--map``) are drawn on a Mollweide world map; ``--kind density`` draws a ``sphere2``
checkpoint's learned log-density ``log p_1`` (:func:`steerflow.manifolds.manifold_log_likelihood`, with the fitted
base's log-density when the run saved one) on a latitude/longitude grid.
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import _common as C
from .main import CLIError, Command, register


def configure(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help=".npy file of samples (n, 2) or images (n, c, h, w); or a .csv of "
                                       "latitude/longitude (drawn on a world map)")
    src.add_argument("--ckpt", help="checkpoint directory: sample it (or draw its trajectories)")
    p.add_argument("--out", default="samples.png", help="output PNG")
    p.add_argument("--kind", choices=("samples", "trajectories", "density"), default="samples",
                   help="what to draw; trajectories need --ckpt and 2-D data; density needs a sphere2 --ckpt")
    p.add_argument("--map", action="store_true",
                   help="draw --samples (n, 3) unit vectors as points on a world map (implied for sphere2 "
                        "checkpoints and .csv samples)")
    p.add_argument("--data", default=None,
                   help="dataset drawn behind 2-D samples (default: the checkpoint's dataset, if any)")
    p.add_argument("--n", type=C.positive_int, default=2000, help="samples to draw with --ckpt")
    p.add_argument("--steps", type=C.positive_int, default=None, help="solver steps with --ckpt")
    p.add_argument("--method", choices=("euler", "midpoint", "heun", "rk4", "dopri5"), default=None,
                   help="solver with --ckpt")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    C.add_seed(p)
    C.add_device(p)


def _latlon(x: torch.Tensor):
    from ..data.earth import xyz_to_latlon

    lat, lon = xyz_to_latlon(x.double())
    return lat.numpy(), lon.numpy()


def plot_sphere_map(out: str, *, samples=None, data=None, density=None, title: str = "") -> None:
    """A Mollweide world map: ``data`` (n, 3) in grey, ``samples`` (m, 3) on top, or a ``density`` grid
    ``(lon, lat, log p)`` in radians with the data points over it."""
    import numpy as np

    from ..plotting import DATA_COLOR, SAMPLE_COLOR, _plt, _save

    plt = _plt()
    fig = plt.figure(figsize=(8, 4.6))
    ax = fig.add_subplot(1, 1, 1, projection="mollweide")
    if density is not None:
        lon_g, lat_g, logp = density
        finite = np.isfinite(logp)  # cells the flow does not reach (log p = -inf) are left blank
        logp = np.where(finite, logp, np.nan)
        vmin = float(np.quantile(logp[finite], 0.02)) if finite.any() else None
        mesh = ax.pcolormesh(lon_g, lat_g, logp, cmap="viridis", shading="auto", vmin=vmin, rasterized=True)
        cb = fig.colorbar(mesh, ax=ax, shrink=0.6, pad=0.03)
        cb.set_label("log p (nats / sr)")
    if data is not None:
        lat, lon = _latlon(data)
        ax.scatter(np.deg2rad(lon), np.deg2rad(lat), s=3, linewidths=0, alpha=0.7, zorder=2,
                   c="#ff5a36" if density is not None else "#555555", label="data")
    if samples is not None:
        lat, lon = _latlon(samples)
        ax.scatter(np.deg2rad(lon), np.deg2rad(lat), s=2, linewidths=0, alpha=0.6, c=SAMPLE_COLOR, zorder=3,
                   label="samples")
    ax.grid(True, alpha=0.3, color=DATA_COLOR)
    ax.set_xticklabels([])
    if samples is not None and data is not None:
        ax.legend(loc="lower left", fontsize=8, markerscale=4, frameon=False)
    ax.set_title(title, fontsize=10, pad=12)
    _save(fig, out)


def _density_grid(loaded, n_lat: int = 36, n_lon: int = 72, batch: int = 2048):
    """``log p_1`` of a sphere2 flow at cell centres of a lat/lon grid (RK4, 24 steps)."""
    from ..data.earth import latlon_to_xyz
    from ..manifolds import manifold_log_likelihood

    lat = torch.linspace(-90 + 90 / n_lat, 90 - 90 / n_lat, n_lat, dtype=torch.float64)
    lon = torch.linspace(-180 + 180 / n_lon, 180 - 180 / n_lon, n_lon, dtype=torch.float64)
    LAT, LON = torch.meshgrid(lat, lon, indexing="ij")
    x = latlon_to_xyz(LAT.reshape(-1), LON.reshape(-1))
    device = next(loaded.model.parameters()).device
    base_log_prob = None if loaded.base is None else loaded.base.log_prob
    logp = manifold_log_likelihood(loaded.model, x.to(device), loaded.manifold, method="rk4", steps=24,
                                   batch_size=batch, base_log_prob=base_log_prob).cpu()
    if loaded.sites is not None:  # (the sites' components are far narrower than a cell)
        logp = loaded.sites.log_prob(x, logp)
    return torch.deg2rad(LON).numpy(), torch.deg2rad(LAT).numpy(), logp.reshape(n_lat, n_lon).numpy()


def _sphere_reference(name: str | None, n: int, seed: int):
    if name is None:
        return None
    from ..manifolds import Sphere

    x = C.load_manifold_data(name, Sphere(2))
    if x.shape[0] > n:
        x = x[torch.randperm(x.shape[0], generator=C.generator(seed))[:n]]
    return x


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
        loaded = C.load_flow(args.ckpt, ema=args.ema, device=device, allow_manifold=True)
        data_name = data_name or loaded.info.data
    elif args.kind == "trajectories":
        raise CLIError("--kind trajectories needs --ckpt (a .npy file holds end points only)")
    manifold = loaded.manifold if loaded is not None else None
    on_map = (args.map or (manifold is not None and manifold.name == "sphere2")
              or (args.samples is not None and str(args.samples).lower().endswith(".csv")))
    if args.kind == "density" and not (manifold is not None and manifold.name == "sphere2"):
        raise CLIError("--kind density draws the learned density of a sphere2 checkpoint (--ckpt)")
    if manifold is not None and not on_map:
        raise CLIError(f"plot draws flows on sphere2 as maps; {args.ckpt!r} holds a flow on {manifold.name} "
                       "(sample it and plot the .npy yourself)")
    if on_map:
        if args.kind == "trajectories":
            raise CLIError("--kind trajectories draws flat 2-D flows; on the sphere use --kind samples or density")
        reference = _sphere_reference(data_name, args.n, args.seed + 1)
        if args.kind == "density":
            plot_sphere_map(args.out, data=reference, density=_density_grid(loaded),
                            title=f"learned log-density on S² ({loaded.info.data}) with data points")
        else:
            if loaded is not None:
                x = draw(loaded, args.n, steps=args.steps, method=args.method, seed=args.seed, device=device)
                title = f"{x.shape[0]} model samples on S²"
            elif str(args.samples).lower().endswith(".csv"):
                from ..data.earth import load_latlon_csv

                try:
                    x = load_latlon_csv(args.samples)
                except (OSError, ValueError) as e:
                    raise CLIError(f"--samples {args.samples!r}: {e}") from None
                title = f"{x.shape[0]} points"
            else:
                from ..manifolds import Sphere

                x = torch.from_numpy(C.load_npy(args.samples)).float()
                try:
                    Sphere(2).check_point(x, atol=1e-3)
                except ValueError as e:
                    raise CLIError(f"--map needs unit vectors (n, 3) on the sphere: {e}") from None
                title = f"{x.shape[0]} points"
            plot_sphere_map(args.out, samples=x, data=reference,
                            title=title + (f" over {data_name} (grey)" if reference is not None else ""))
        print(f"wrote {args.out}", file=sys.stderr)
        return 0
    if args.kind == "density":
        raise CLIError("--kind density needs a sphere2 --ckpt")
    reference = None
    if data_name is not None:
        reference = C.data_sampler(C.load_run_data(data_name, loaded.info if loaded is not None else None))(args.n, C.generator(args.seed + 1))
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
                             "Example:  steerflow plot --ckpt runs/2rf --kind trajectories --out traj.png\n"
                             "On the sphere:  steerflow plot --ckpt runs/volcano --kind density --out map.png"))
