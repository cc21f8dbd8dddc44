"""Figures for samples, trajectories and image grids (matplotlib, imported lazily, ``Agg`` backend).

Every function takes plain arrays (NumPy or torch, on any device), writes one PNG atomically and returns
its path. Nothing here trains or samples: the demo and the ``plot`` command compute, this module draws.

* :func:`plot_samples` — a 2-D scatter over the data (optionally), or an image grid for image batches;
* :func:`plot_nfe_grid` — rows = models, columns = NFE: how few steps each model survives;
* :func:`plot_trajectories` — ODE paths ``x_{t_0} → x_{t_n}`` per model, the picture of straightness;
* :func:`image_grid` — ``(b, c, h, w)`` → one ``(H, W, c)`` mosaic.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["as_numpy", "image_grid", "plot_samples", "plot_nfe_grid", "plot_trajectories", "plot_losses",
           "plot_metric_vs_nfe"]

# a fixed, colour-blind–safe palette (Okabe & Ito 2008)
DATA_COLOR = "#bbbbbb"
SOURCE_COLOR = "#56B4E9"
SAMPLE_COLOR = "#D55E00"
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def as_numpy(x) -> np.ndarray:
    """A float64 NumPy copy of a tensor or array-like (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def _save(fig, out: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` to ``out`` through a temporary file and a rename, so a crash never leaves half a PNG."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", facecolor="white")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        _plt().close(fig)
    return out


def _limits(*arrays: np.ndarray, pad: float = 0.08, q: float = 0.995) -> tuple[tuple[float, float], tuple[float, float]]:
    """Square-ish axis limits covering the central ``q`` mass of all points (outliers do not zoom out)."""
    pts = np.concatenate([a.reshape(-1, a.shape[-1])[:, :2] for a in arrays if a is not None and a.size], 0)
    lo = np.quantile(pts, 1 - q, axis=0)
    hi = np.quantile(pts, q, axis=0)
    span = float(max(hi - lo)) * (1 + 2 * pad)
    mid = (hi + lo) / 2
    return (mid[0] - span / 2, mid[0] + span / 2), (mid[1] - span / 2, mid[1] + span / 2)


def _style(ax, xlim, ylim) -> None:
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_color("#cccccc")


def _is_image_batch(x: np.ndarray) -> bool:
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return True
    if x.ndim == 3:
        return True
    return x.ndim == 2 and x.shape[1] > 3 and int(math.isqrt(x.shape[1])) ** 2 == x.shape[1]


def image_grid(x, *, nrow: int | None = None, pad: int = 2, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Tile a batch of images into one mosaic.

    Args:
        x: (b, c, h, w) with c in {1, 3}, (b, h, w), or (b, h*w) flattened square greyscale images.
        nrow: images per row (default ``ceil(sqrt(b))``).
        value_range: (lo, hi) mapped to [0, 1]; default the batch's 0.5%/99.5% quantiles.

    Returns:
        (H, W, 3) float array in [0, 1].
    """
    x = as_numpy(x)
    if x.ndim == 2:
        s = int(math.isqrt(x.shape[1]))
        if s * s != x.shape[1]:
            raise ValueError(f"flattened images must be square, got {x.shape[1]} pixels")
        x = x.reshape(-1, 1, s, s)
    elif x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (b, c, h, w) with c in (1, 3), got shape {x.shape}")
    if value_range is None:
        value_range = (float(np.quantile(x, 0.005)), float(np.quantile(x, 0.995)))
    lo, hi = value_range
    x = np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    b, _, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(b)))
    ncol_rows = int(math.ceil(b / nrow))
    grid = np.ones((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, 3))
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = \
            x[i].transpose(1, 2, 0)
    return grid


def plot_samples(samples, out, *, data=None, title: str | None = None, max_points: int = 4000) -> Path:
    """Scatter 2-D ``samples`` (n, 2) over ``data`` (m, 2), or draw an image grid for image batches."""
    plt = _plt()
    x = as_numpy(samples)
    if _is_image_batch(x):
        grid = image_grid(x[:64])
        fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1]))
        ax.imshow(grid, interpolation="nearest")
        ax.axis("off")
        if title:
            ax.set_title(title)
        return _save(fig, out)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"plot expects (n, 2) points or an image batch, got shape {x.shape}")
    x = x[:max_points]
    d = as_numpy(data)[:max_points] if data is not None else None
    fig, ax = plt.subplots(figsize=(5, 5))
    if d is not None:
        ax.scatter(d[:, 0], d[:, 1], s=3, c=DATA_COLOR, alpha=0.6, lw=0, label="data", rasterized=True)
    ax.scatter(x[:, 0], x[:, 1], s=3, c=SAMPLE_COLOR, alpha=0.6, lw=0, label="samples", rasterized=True)
    _style(ax, *_limits(x, d))
    if d is not None:
        ax.legend(loc="upper right", markerscale=4, frameon=False, fontsize=8)
    if x.shape[1] > 2:
        title = (title + " " if title else "") + f"(first 2 of {x.shape[1]} dims)"
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, out)


def plot_nfe_grid(samples: Mapping[str, Mapping[str, object]], out, *, data=None,
                  scores: Mapping[str, Mapping[str, float]] | None = None, score_name: str = "W2",
                  title: str | None = None, max_points: int = 2000) -> Path:
    """A grid of 2-D scatters: one row per model, one column per NFE setting.

    Args:
        samples: ``{model: {nfe_label: (n, 2) samples}}``; columns follow the first model's order.
        data: (m, 2) reference samples drawn behind every panel.
        scores: optional ``{model: {nfe_label: value}}`` printed in each panel's corner.
    """
    plt = _plt()
    rows = list(samples)
    cols: list[str] = []
    for r in rows:
        cols += [c for c in samples[r] if c not in cols]
    d = as_numpy(data)[:max_points] if data is not None else None
    allpts = [as_numpy(v)[:max_points] for r in rows for v in samples[r].values()]
    # limits from the data (samples at one step can be far off; clip them at the frame)
    xlim, ylim = _limits(d if d is not None else np.concatenate(allpts), pad=0.25)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.1 * len(cols) + 0.6, 2.1 * len(rows) + 0.3),
                             squeeze=False)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i, j]
            if d is not None:
                ax.scatter(d[:, 0], d[:, 1], s=2, c=DATA_COLOR, alpha=0.5, lw=0, rasterized=True)
            if c in samples[r]:
                x = as_numpy(samples[r][c])[:max_points]
                ax.scatter(x[:, 0], x[:, 1], s=2, c=PALETTE[i % len(PALETTE)], alpha=0.6, lw=0, rasterized=True)
                if scores is not None and c in scores.get(r, {}):
                    ax.text(0.03, 0.03, f"{score_name} {scores[r][c]:.3f}", transform=ax.transAxes, fontsize=7,
                            bbox=dict(facecolor="white", alpha=0.8, lw=0, pad=1.5))
            else:
                ax.text(0.5, 0.5, "n/a", transform=ax.transAxes, ha="center", va="center", color="#777777",
                        fontsize=9, bbox=dict(facecolor="white", alpha=0.85, lw=0))
            _style(ax, xlim, ylim)
            if i == 0:
                ax.set_title(c, fontsize=9)
            if j == 0:
                ax.set_ylabel(r, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out)


def plot_trajectories(trajectories: Mapping[str, object], out, *, data=None, n_paths: int = 160,
                      straightness: Mapping[str, float] | None = None, title: str | None = None) -> Path:
    """Draw ODE trajectories per model: one panel each, source points, paths, and end points.

    Args:
        trajectories: ``{model: (n_times, b, 2) states}`` (e.g. ``Trajectory.xs``).
        data: (m, 2) reference data drawn in the background.
        straightness: optional ``{model: S}`` printed under each title.
    """
    plt = _plt()
    names = list(trajectories)
    d = as_numpy(data)[:3000] if data is not None else None
    trajs = {k: as_numpy(v)[:, :n_paths] for k, v in trajectories.items()}
    for k, v in trajs.items():
        if v.ndim != 3 or v.shape[-1] < 2:
            raise ValueError(f"trajectory {k!r} must have shape (n_times, b, 2), got {v.shape}")
    xlim, ylim = _limits(*[v[[0, -1]] for v in trajs.values()], d, pad=0.05, q=1.0)
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.5), squeeze=False)
    for j, k in enumerate(names):
        ax, xs = axes[0, j], trajs[k]
        if d is not None:
            ax.scatter(d[:, 0], d[:, 1], s=2, c=DATA_COLOR, alpha=0.4, lw=0, rasterized=True)
        for p in range(xs.shape[1]):
            ax.plot(xs[:, p, 0], xs[:, p, 1], c="#444444", alpha=0.35, lw=0.6)
        ax.scatter(xs[0, :, 0], xs[0, :, 1], s=6, c=SOURCE_COLOR, lw=0, label="x_0", zorder=3)
        ax.scatter(xs[-1, :, 0], xs[-1, :, 1], s=6, c=PALETTE[j % len(PALETTE)], lw=0, label="x_1", zorder=3)
        _style(ax, xlim, ylim)
        sub = f"\nstraightness {straightness[k]:.4f}" if straightness is not None and k in straightness else ""
        ax.set_title(f"{k}{sub}", fontsize=9)
        if j == 0:
            ax.legend(loc="upper right", markerscale=2, frameon=False, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out)


def plot_losses(losses: Mapping[str, Sequence[float]], out, *, title: str | None = None, smooth: int = 50) -> Path:
    """Training-loss curves ``{name: [loss per step]}`` (moving average over ``smooth`` steps, log scale)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for j, (k, v) in enumerate(losses.items()):
        v = np.asarray(list(v), dtype=np.float64)
        if v.size == 0:
            continue
        w = max(1, min(smooth, v.size // 5 or 1))
        ma = np.convolve(v, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(ma.size) + w, ma, c=PALETTE[j % len(PALETTE)], lw=1.2, label=k)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_metric_vs_nfe(curves: Mapping[str, Sequence[tuple[float, float]]], out, *, floor: float | None = None,
                       ylabel: str = "W2", title: str | None = None) -> Path:
    """Quality against cost: ``{model: [(nfe, value), ...]}`` on a log-x axis, with an optional noise floor."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    markers = "osD^v<>p"
    for j, (k, pts) in enumerate(curves.items()):
        pts = sorted((float(a), float(b)) for a, b in pts)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker=markers[j % len(markers)], ms=5, lw=1.4, c=PALETTE[j % len(PALETTE)], label=k)
    if floor is not None:
        ax.axhline(floor, c="#888888", ls="--", lw=1, label="noise floor (data vs data)")
    ax.set_xscale("log", base=2)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)
