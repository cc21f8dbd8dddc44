"""Steering a learned 32×32 image prior: U-Net flow on photo crops, seven inverse tasks, every guidance method.

Bed: 32×32 crops of scikit-image's bundled photographs (``steerflow.data.photos.photo_crops``; shipped in the
wheel, no download), split by whole photographs (``CROP_SPLITS``): the flow trains on overlapping crops
(stride 8) of the training photographs; the strengths are tuned on non-overlapping crops of the validation
photograph (``rocket``) and the methods are scored on non-overlapping crops of the test photographs
(``chelsea``, ``coffee``). Validation and test crops flatter than ``MIN_STD`` (pixel std in [-1, 1] units) are
dropped (sky and background have nothing to restore); a seeded random subset of ``--n-val`` / ``--n-test`` is
kept. Grayscale by default (``--rgb``: the colour split, colour photographs only).

Prior: a ``UNetVelocity`` trained by ``steerflow train --data photos32`` (a subprocess; the exact command is
printed and stored with its wall time) into ``--ckpt`` (default ``<tmp>/steerflow_bench_images[_rgb]/flow``);
an existing checkpoint there is loaded instead (its training command and time are read from the
``bench_train.json`` written beside it). The real run's settings (``TRAIN``) are chosen to fit ≈ 45 min on
this 2-core machine (about 1 s per step measured; see benchmarks/README.md, "32×32 images (issue 17)")::

    steerflow train --data photos32 --model unet --unet-width 16 --steps 2500 --batch 32 --lr 0.001 \\
        --warmup 100 --lr-schedule cosine --ema 0.998 --seed 0 --threads 1 --ckpt-every 500 --device cpu \\
        --quiet --out <ckpt>

A run killed midway continues from its last checkpoint with the same command and ``--resume``.

Unguided quality: the squared energy distance (V-statistic, flattened pixels) between ``--n-test`` unguided
samples and the test crops, beside two data-to-data references (validation crops vs test crops, training
crops vs test crops; same sizes), and a PNG grid of the samples.

Tasks (``TASKS``), each at measurement noise σ ∈ {0.01, 0.05}: box inpainting (centre 16×16 hidden),
free-form inpainting (brush strokes hiding 20–40 %, one seeded mask), random-pixel inpainting (70 % missing,
one seeded mask), ×4 super-resolution (4×4 average pooling), Gaussian deblur (9×9, std 2), motion deblur
(length 9 at 45°), denoising. Methods: ``steerflow.steering.tasks.INVERSE_METHODS`` by default (unguided,
FlowChef, DPS, DDS, EnKG with 8 particles per image, OT-ODE, PnP-Flow, steerflow's default), all through the
one ``steerflow.sample`` loop (``--steps`` Euler steps). Tuning rule, the same for every method with a
strength: per task, the value of ``TUNE_GRID[method]`` (a log grid holding the method's default; FlowChef: inner
steps × step size) with the best mean PSNR over the validation crops at both noise levels; methods without a
strength (unguided, DDS) run as they are.

Summary (end of ``<out>.md``, ``summary()``): each method's mean PSNR over all cells; whether the default is the
method to pick (best mean PSNR, within 0.3 dB of the best method in every cell, ≤ 1.5× unguided time and
≤ 1.2× unguided peak memory); FlowChef against DPS per cell (ΔPSNR, speed-up, memory ratio).

Metrics: PSNR and SSIM per test image (outputs clipped to [-1, 1], data range 2; SSIM with the 11×11
Gaussian window, σ = 1.5, valid positions, population covariances — what
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``
computes), reported as mean ± standard error over the images (EnKG: the mean over an image's particles first).
Time: wall seconds of the batched solve / number of images (fastest of ``--repeats`` identical seeded
solves), and its ratio to unguided sampling of the same batch. Peak memory per image: on CPU the peak of
live tensor bytes during a separate ``PROFILE_STEPS``-step solve of the same batch from torch.profiler
(``profile_memory=True``, per-op self allocations replayed in time order; op granularity, Python objects
excluded); on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before that solve; divided by the
number of images, and its ratio to unguided. NFE / VJP / operator calls per batched solve from ``Cost``.

Outputs: ``<out>.json``, ``<out>.md`` (default ``benchmarks/results/steering_images``), ``<out>_samples.png``
(unguided samples), ``<out>_grid.png`` (per task at σ = 0.05, one test crop per row: truth, measurement,
then each method's output in ``methods`` order) and ``<out>_grid_rows.pt`` (the grid's rows, for ``--merge``).

Reproduce:  python benchmarks/bench_steering_images.py                 (prepared; see benchmarks/README.md)
            python benchmarks/bench_steering_images.py --tasks box,freeform --merge   (a part; others merged in)
            python benchmarks/bench_steering_images.py --tasks box --out /tmp/a  (parts side by side, then)
            python benchmarks/bench_steering_images.py --tasks '' --merge-from /tmp/a,/tmp/b
            python benchmarks/bench_steering_images.py --quick --out /tmp/x   (smoke run, ≈ 1-2 min)
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import steerflow
from steerflow.data.images import save_image
from steerflow.data.photos import CROP_SPLITS, photo_crops
from steerflow.metrics.cost import Cost
from steerflow.metrics.distances import energy_distance
from steerflow.metrics.image import psnr, ssim
from steerflow.steering import get_guidance
from steerflow.steering.tasks import INVERSE_METHODS, METHODS, build_method, build_task
from steerflow.training import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_steering_learned import profile_peak_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 32
DATA_RANGE = 2.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
NOISES = (0.01, 0.05)
MIN_STD = 0.1
ENKG_ENSEMBLE = 8
PROFILE_STEPS = 5
MASK_SEED = 123
TASKS = {
    "box": ("box", {}),
    "freeform": ("freeform", {"coverage": (0.2, 0.4)}),
    "random70": ("random", {"p_observed": 0.3}),
    "sr4": ("superres", {"factor": 4}),
    "deblur_gauss": ("deblur", {"blur": "gaussian", "blur_size": 9, "blur_std": 2.0}),
    "deblur_motion": ("deblur", {"blur": "motion", "blur_size": 9, "blur_angle": 45.0}),
    "denoise": ("denoise", {}),
}
"""Benchmark task name -> (``build_task`` name, its keyword arguments)."""
TASK_NAMES = {"box": "box inpaint (16×16)", "freeform": "free-form inpaint", "random70": "random 70 % missing",
              "sr4": "×4 super-res", "deblur_gauss": "Gaussian deblur", "deblur_motion": "motion deblur",
              "denoise": "denoise"}
FLOWCHEF_GRID = tuple({"n_inner": k, "step_size": s, "schedule": "constant"}
                      for k in (1, 5) for s in (2.0, 1.0, 0.5, 0.2, 0.1))
"""FlowChef's knobs: inner gradient steps per grid step (``v`` held fixed: no network call) and step size."""
TUNE_GRID = {"flowchef": FLOWCHEF_GRID, "dps": (4.0, 2.0, 1.0, 0.5, 0.2, 0.05),
             "enkg": (1.0, 0.5, 0.2, 0.05, 0.01), "otode": (8.0, 4.0, 2.0, 1.0, 0.5),
             "pnpflow": (16.0, 8.0, 4.0, 2.0, 1.0, 0.5), "default": (4.0, 2.0, 1.5, 1.0, 0.5),
             "lookahead": (2.0, 1.0, 0.5, 0.2, 0.05), "dreamguider": (4.0, 2.0, 1.0, 0.5, 0.2)}
"""Log grids of each method's main strength (``build_method``'s ``scale``: PnP-Flow's step size, the default's
relaxation at t = 0, the others' guidance scale; FlowChef: keyword dicts), each holding the method's default."""
TRAIN = {"unet_width": 16, "steps": 2500, "batch": 32, "lr": 1e-3, "warmup": 100, "ema": 0.998}
"""The real run's ``steerflow train`` settings (≈ 45 min on this 2-core machine; see the module docstring)."""
TRAIN_QUICK = {"unet_width": 8, "steps": 20, "batch": 16, "lr": 1e-3, "warmup": 2, "ema": 0.9}
QUICK_TASKS = ("box", "sr4")


# --- prior ------------------------------------------------------------------------------------------------
def train_command(out: Path, settings: dict, rgb: bool, threads: int, device: str) -> list[str]:
    """The ``steerflow train`` command line that trains the prior into ``out``."""
    return ["steerflow", "train", "--data", "photos32-rgb" if rgb else "photos32", "--model", "unet",
            "--unet-width", str(settings["unet_width"]), "--steps", str(settings["steps"]),
            "--batch", str(settings["batch"]), "--lr", f"{settings['lr']:g}", "--warmup", str(settings["warmup"]),
            "--lr-schedule", "cosine", "--ema", f"{settings['ema']:g}", "--seed", "0", "--threads", str(threads),
            "--ckpt-every", str(max(1, min(500, settings["steps"]))), "--device", device, "--quiet",
            "--out", str(out)]


def get_prior(ckpt: Path, settings: dict, rgb: bool, threads: int, device: str):
    """Load the prior from ``ckpt``, training it first (``steerflow train`` in a subprocess) when absent.

    Returns ``(model, info)``; ``info`` holds the command, its wall time and whether it was cached.
    """
    record = ckpt / "bench_train.json"
    if (ckpt / "latest.json").exists():
        info = json.loads(record.read_text()) if record.exists() else {"command": None, "wall_seconds": None}
        info["cached"] = True
    else:
        cmd = train_command(ckpt, settings, rgb, threads, device)
        print("training the prior:  " + shlex.join(cmd), flush=True)
        t0 = time.perf_counter()
        # the same command through this interpreter (the console script may not be on PATH)
        subprocess.run([sys.executable, "-m", "steerflow"] + cmd[1:], check=True)
        info = {"command": shlex.join(cmd), "wall_seconds": time.perf_counter() - t0, "settings": settings,
                "threads": threads, "device": device}
        record.write_text(json.dumps(info, indent=1))
        info["cached"] = False
        print(f"trained in {info['wall_seconds']:.0f} s -> {ckpt}", flush=True)
    ck = load_checkpoint(ckpt, device=device)
    model = (ck.ema_model or ck.model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, info


def unguided_quality(model, x_test, x_val, x_train, steps, device, out_png: Path, seed: int = 0) -> dict:
    """Energy distance of unguided samples to the test crops, beside data-to-data references, and a grid."""
    n = x_test.shape[0]
    x0 = torch.randn(n, *x_test.shape[1:], generator=torch.Generator().manual_seed(seed)).to(device)
    samples = steerflow.sample(model, x0, steps=steps, method="euler").detach().cpu().clamp(-1, 1)
    save_image(samples[:64], out_png, nrow=8)
    m = min(n, x_val.shape[0])
    train_ref = x_train[torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(seed))[:n]]
    return {"n": n, "energy_distance_samples_vs_test": energy_distance(samples, x_test),
            "energy_distance_val_vs_test": energy_distance(x_val[:m], x_test[:m]),
            "energy_distance_train_vs_test": energy_distance(train_ref, x_test),
            "samples_png": out_png.name}


# --- one solve --------------------------------------------------------------------------------------------
def make_operator(task: str, shape):
    name, kwargs = TASKS[task]
    return build_task(name, shape, generator=torch.Generator().manual_seed(MASK_SEED), **kwargs)


def measure(op, x_true, noise, seed):
    """``y = A x + σ ε`` with a seeded ε."""
    ax = op(x_true)
    return ax + noise * torch.randn(ax.shape, generator=torch.Generator().manual_seed(seed)).to(ax.device)


def peak_bytes(fn, device: str) -> int:
    """Peak tensor bytes allocated during ``fn()`` (CPU: torch.profiler; CUDA: the allocator's peak)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    return profile_peak_bytes(fn)


def run_inverse(model, x_true, task, noise, method, steps, seed, device, *, scale=None, repeats=1,
                measure_memory=True) -> dict:
    """Solve one task for a batch with one method; per-image PSNR / SSIM, time, memory and cost."""
    shape = tuple(x_true.shape[1:])
    op = make_operator(task, shape)
    x_true = x_true.to(device)
    y = measure(op, x_true, noise, seed)
    n = x_true.shape[0]
    reps = ENKG_ENSEMBLE if method == "enkg" else 1
    y_run = y.repeat_interleave(reps, 0)

    def solve(n_steps=steps):
        if isinstance(scale, dict):  # FlowChef's keyword settings
            guidance = get_guidance(method, op, y_run, noise, **scale)
        else:
            guidance = build_method(method, op, y_run, noise, scale=scale, ensemble_size=ENKG_ENSEMBLE)
        x0 = torch.randn(n * reps, *shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
        gen = torch.Generator(device=device).manual_seed(seed + 2)
        cost = Cost()
        out = steerflow.sample(model, x0, steps=n_steps, method="euler", guidance=guidance, generator=gen,
                               cost=cost)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, cost

    seconds = float("inf")
    for _ in range(repeats):  # seeded: every repeat computes the same result; the fastest is kept
        t0 = time.perf_counter()
        out, cost = solve()
        seconds = min(seconds, time.perf_counter() - t0)
    peak = peak_bytes(lambda: solve(PROFILE_STEPS), device) if measure_memory else None
    out = out.detach().clamp(-1, 1)
    x_rep = x_true.repeat_interleave(reps, 0)
    p = psnr(out, x_rep, DATA_RANGE, reduction="none").reshape(n, reps).mean(1)
    s = ssim(out, x_rep, DATA_RANGE, window_size=SSIM_WINDOW, sigma=SSIM_SIGMA, reduction="none")
    s = s.reshape(n, reps).mean(1)
    return {"psnr_per_image": p.tolist(), "ssim_per_image": s.tolist(),
            "seconds_per_image": seconds / n, "peak_bytes_per_image": None if peak is None else peak / n,
            "nfe": cost.nfe, "vjp": cost.vjp, "operator_calls": cost.operator_calls,
            "particles_per_image": reps, "strength": scale, "output": out[::reps].cpu(), "measurement": y.cpu()}


def strength_label(value) -> str:
    """A grid value as text: a number, or ``k=…,s=…`` for FlowChef's keyword settings."""
    if isinstance(value, dict):
        return f"k={value['n_inner']},s={value['step_size']:g}"
    return "—" if value is None else f"{value:g}"


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error ``s / √n`` (``s`` with ``n − 1``); 0 for a single value."""
    a = np.asarray(values, dtype=np.float64)
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else 0.0
    return float(a.mean()), se


def tune(model, x_val, tasks, methods, noises, steps, device, grid) -> tuple[dict, dict]:
    """Per task, each method's strength with the best mean validation PSNR over the noise levels."""
    chosen, table = {}, {}
    for task in tasks:
        chosen[task], table[task] = {}, {}
        for m in methods:
            if m not in grid:
                continue
            scores, values = {}, {}
            for value in grid[m]:
                label = strength_label(value)
                values[label] = value
                try:
                    score = float(np.mean([np.mean(run_inverse(model, x_val, task, noise, m, steps, seed=7,
                                                                device=device, scale=value,
                                                                measure_memory=False)["psnr_per_image"])
                                           for noise in noises]))
                except FloatingPointError:  # the solve diverged at this strength
                    score = float("-inf")
                scores[label] = score if np.isfinite(score) else float("-inf")
            best = max(scores, key=scores.get)  # first of equal scores wins (grid order)
            chosen[task][m] = values[best]
            table[task][m] = {k: round(v, 3) for k, v in scores.items()}
            print(f"  tune {task:13s} {m:9s} " + " ".join(f"{k}:{v:.2f}" for k, v in scores.items())
                  + f" -> {best}", flush=True)
    return chosen, table


# --- figures and report -------------------------------------------------------------------------------------
def as_image(y: torch.Tensor, shape) -> torch.Tensor:
    """A measurement shown at image size: nearest-neighbour upsampling when it is smaller (super-resolution)."""
    if tuple(y.shape[1:]) == tuple(shape):
        return y
    return F.interpolate(y, size=tuple(shape[1:]), mode="nearest")


def write_grid(rows: list[torch.Tensor], path: Path, zoom: int = 3) -> None:
    """One row per (task, image): truth, measurement, each method's output; enlarged ``zoom``× (nearest)."""
    tiles = torch.cat(rows)
    tiles = tiles.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2)
    save_image(tiles, path, nrow=rows[0].shape[0])


def timing_for(res: dict, path: Path) -> dict | None:
    """The ``--timing`` file beside the result file ``path`` when it timed ``res``'s strengths and steps, else None
    (a later run or ``--update`` makes an older re-timing stale)."""
    timed = path.with_name(path.stem + "_timing.json")
    if not timed.exists():
        return None
    t = json.loads(timed.read_text())
    return t if (t.get("strength"), t.get("steps")) == (res["strength"], res["config"]["steps"]) else None


def write_markdown(res: dict, path: Path) -> None:
    timed = timing_for(res, path)
    if timed is not None:
        res = {**res, "timing": timed}
    L = ["# Steering a learned 32×32 image prior (issue 17)", "",
         f"Reproduce: `{res['command']}`"
         + "".join(f", then `{u['command']}`" for u in res.get("updates", [])), "", res["setup"], ""]
    q = res["unguided_quality"]
    tr = res["training"]
    L += ["## Prior", "",
          f"Training: `{tr.get('command')}` — "
          + (f"{tr['wall_seconds']:.0f} s" if tr.get("wall_seconds") is not None else "time not recorded")
          + (" (cached checkpoint)" if tr.get("cached") else "") + ".", "",
          f"Unguided sample quality (squared energy distance, {q['n']} images, flattened pixels in [-1, 1]; lower is "
          f"better): samples vs test {q['energy_distance_samples_vs_test']:.3f}; references: validation crops vs "
          f"test {q['energy_distance_val_vs_test']:.3f}, training crops vs test "
          f"{q['energy_distance_train_vs_test']:.3f} (the prior models all training crops, flat ones included, while "
          f"the test crops have pixel std ≥ {MIN_STD}: the training-crops figure is what a perfect prior would "
          f"score). Samples: [{q['samples_png']}]({q['samples_png']}).", ""]
    L += ["PSNR (dB) and SSIM: mean ± standard error over the test crops. Time and peak memory per image "
          "relative to unguided sampling of the same batch (absolute values in the JSON). NFE / VJP / A-calls "
          "per batched solve.", ""]
    methods = res["methods"]
    for noise in res["noises"]:
        L += [f"## σ = {noise}", "",
              "| task | method | PSNR | SSIM | time × | memory × | NFE / VJP / A | strength |",
              "|---|---|---|---|---|---|---|---|"]
        for task in res["tasks"]:
            for m in methods:
                r = res["cells"][f"{task}@{noise}"][m]
                t = "—" if r["time_vs_unguided"] is None else f"{r['time_vs_unguided']:.2f}"
                mem = "—" if r["memory_vs_unguided"] is None else f"{r['memory_vs_unguided']:.2f}"
                st = strength_label(r["strength"])
                L.append(f"| {TASK_NAMES[task]} | {m} | {r['psnr']:.2f} ± {r['psnr_se']:.2f} | "
                         f"{r['ssim']:.3f} ± {r['ssim_se']:.3f} | {t} | {mem} | "
                         f"{r['nfe']} / {r['vjp']} / {r['operator_calls']} | {st} |")
        L.append("")
    L += [f"Figure: [{res['grid_png']}]({res['grid_png']}) — per task at σ = {res['noises'][-1]}, one test crop per "
          f"row: truth, measurement, then {', '.join(methods)}.", ""]
    L += summary_lines(res)
    path.write_text("\n".join(L))


def summary(res: dict) -> dict:
    """The issue's two questions: is the default the method to pick (best mean PSNR, within 0.3 dB of the best
    method in every cell, ≤ 1.5× unguided time, ≤ 1.2× unguided memory), and FlowChef against DPS."""
    cells, methods = res["cells"], [m for m in res["methods"] if m != "unguided"]
    keys = [f"{t}@{n}" for n in res["noises"] for t in res["tasks"]]
    mean_psnr = {m: float(np.mean([cells[k][m]["psnr"] for k in keys])) for m in methods}
    out = {"mean_psnr": mean_psnr}
    if "default" in methods:
        gaps = {k: max(cells[k][m]["psnr"] for m in methods) - cells[k]["default"]["psnr"] for k in keys}
        times = [cells[k]["default"]["time_vs_unguided"] for k in keys]
        if res.get("timing"):  # re-timed alone (--timing): these ratios, not the side-by-side ones
            times = [c["default_vs_unguided"] for c in res["timing"]["cells"].values()]
        mems = [cells[k]["default"]["memory_vs_unguided"] for k in keys]
        out["default"] = {
            "best_mean": max(mean_psnr, key=mean_psnr.get) == "default", "max_gap_db": max(gaps.values()),
            "worst_cell": max(gaps, key=gaps.get), "gaps_db": gaps,
            "max_time_vs_unguided": None if None in times else max(times),
            "max_memory_vs_unguided": None if None in mems else max(mems)}
        d = out["default"]
        d["met"] = bool(d["best_mean"] and d["max_gap_db"] <= 0.3
                        and d["max_time_vs_unguided"] is not None and d["max_time_vs_unguided"] <= 1.5
                        and d["max_memory_vs_unguided"] is not None and d["max_memory_vs_unguided"] <= 1.2)
    if "flowchef" in methods and "dps" in methods:
        rows = {}
        for k in keys:
            f, p = cells[k]["flowchef"], cells[k]["dps"]
            speed = p["seconds_per_image"] / f["seconds_per_image"]
            mem = (None if f["peak_bytes_per_image"] is None or not p["peak_bytes_per_image"]
                   else f["peak_bytes_per_image"] / p["peak_bytes_per_image"])
            dpsnr = f["psnr"] - p["psnr"]
            rows[k] = {"dpsnr_db": dpsnr, "speedup": speed, "memory_ratio": mem,
                       "met": bool(dpsnr >= -0.5 and speed >= 1.5 and mem is not None and mem < 1.0)}
        out["flowchef_vs_dps"] = rows
    return out


def summary_lines(res: dict) -> list[str]:
    s = summary(res)
    timed = res.get("timing")
    L = ["## Summary", "", "Mean PSNR over every task and noise level: "
         + ", ".join(f"{m} {v:.2f}" for m, v in sorted(s["mean_psnr"].items(), key=lambda kv: -kv[1])) + " dB.", ""]
    d = s.get("default")
    if d:
        t = "—" if d["max_time_vs_unguided"] is None else f"{d['max_time_vs_unguided']:.2f}×"
        mem = "—" if d["max_memory_vs_unguided"] is None else f"{d['max_memory_vs_unguided']:.2f}×"
        L += [f"Default (issue 17, item 3: best mean PSNR, within 0.3 dB of the best method in every cell, ≤ 1.5× "
              f"unguided time, ≤ 1.2× unguided memory): best mean {'yes' if d['best_mean'] else 'no'}; largest gap to "
              f"the best method {d['max_gap_db']:.2f} dB ({d['worst_cell']}); time up to {t}, memory up to {mem} "
              f"of unguided — **{'met' if d['met'] else 'not met'}**.", ""]
        if timed:
            ratios = [c["default_vs_unguided"] for c in timed["cells"].values()]
            L += [f"The per-cell times above may come from benchmark processes running side by side; re-timed alone "
                  f"(`--timing`: {timed['protocol']}), the default takes {min(ratios):.2f}–{max(ratios):.2f}× the "
                  f"unguided time (" + ", ".join(f"{k} {c['default_vs_unguided']:.2f}×"
                                                  for k, c in timed["cells"].items()) + ").", ""]
    rows = s.get("flowchef_vs_dps")
    if rows:
        L += ["FlowChef vs DPS (item 4: within 0.5 dB at ≥ 1.5× speed and less memory):", "",
              "| cell | ΔPSNR FlowChef − DPS | speed-up | memory FlowChef / DPS | met |", "|---|---|---|---|---|"]
        for k, r in rows.items():
            mem = "—" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
            L.append(f"| {k} | {r['dpsnr_db']:+.2f} dB | {r['speedup']:.2f}× | {mem} | {'yes' if r['met'] else 'no'} |")
        L.append("")
    return L


SAME_SETTINGS = ("quick", "rgb", "steps", "n_test", "n_val", "no_tune", "device")
"""The settings a result file must share with this run to be merged with it or updated by it."""


def settings_diff(prev: dict, args) -> list[str]:
    """The names of ``SAME_SETTINGS`` in which the result ``prev`` differs from this run's ``args``."""
    return [k for k in SAME_SETTINGS if prev["config"].get(k) != vars(args).get(k)]


def update_previous(out: Path, args, methods, tasks, cells, chosen, table, grid_rows) -> tuple[dict, dict]:
    """``<out>.json`` with the cells and strengths of ``methods`` on ``tasks`` replaced by this run's (the other
    methods' cells kept; time and memory ratios against the stored unguided cells), and the figure rows with
    those methods' tiles replaced (``grid_rows``: this run's rows, in ``methods`` order); ``--update``."""
    prev_path = out.with_suffix(".json")
    if not prev_path.exists():
        raise SystemExit(f"--update: no {prev_path} to update")
    prev = json.loads(prev_path.read_text())
    diff = settings_diff(prev, args)
    extra = [m for m in methods if m not in prev["methods"]] + [t for t in tasks if t not in prev["tasks"]]
    if diff or extra or "unguided" in methods:
        why = ", ".join(diff) or (f"{', '.join(extra)} not in it" if extra else "unguided is the reference")
        raise SystemExit(f"--update: {prev_path} cannot take this run ({why})")
    for key, new in cells.items():
        base = prev["cells"][key]["unguided"]
        for m, r in new.items():
            r["time_vs_unguided"] = r["seconds_per_image"] / base["seconds_per_image"]
            ok = base["peak_bytes_per_image"] and r["peak_bytes_per_image"] is not None
            r["memory_vs_unguided"] = r["peak_bytes_per_image"] / base["peak_bytes_per_image"] if ok else None
            prev["cells"][key][m] = r
    for task in tasks:
        for m in methods:
            if m in chosen.get(task, {}):
                prev["strength"][task][m] = chosen[task][m]
                prev["tuning"][task][m] = table[task][m]
    rows_path = out.with_name(out.name + "_grid_rows.pt")
    rows = torch.load(rows_path, weights_only=True) if rows_path.exists() else {}
    for task, new_rows in grid_rows.items():  # rows: truth, measurement, then one tile per method
        if task in rows:
            for i, m in enumerate(methods):
                rows[task][2 + prev["methods"].index(m)] = new_rows[2 + i]
    prev.setdefault("updates", []).append(
        {"methods": methods, "tasks": tasks, "command": "python benchmarks/bench_steering_images.py --update "
         f"--methods {','.join(methods)} --tasks {','.join(tasks)} --steps {args.steps}"})
    return prev, {t: r.contiguous() for t, r in rows.items()}


def merge_previous(out: Path, args, methods, tasks, cells, chosen, table, grid_rows, rows_path):
    """Add the tasks of the existing ``<out>.json`` that this run did not rerun (in place); the merged task list."""
    prev_path = out.with_suffix(".json")
    if not prev_path.exists():
        return tasks, chosen, table
    return merge_part(prev_path, rows_path, args, methods, tasks, cells, chosen, table, grid_rows)


def merge_part(prev_path: Path, rows_path: Path, args, methods, tasks, cells, chosen, table, grid_rows):
    """Add the tasks of the result file ``prev_path`` that are not in ``tasks`` (in place); the merged task list."""
    prev = json.loads(prev_path.read_text())
    diff = settings_diff(prev, args)
    if diff or prev["methods"] != methods:
        raise SystemExit(f"--merge: {prev_path} was made with other settings ({', '.join(diff) or 'methods'})")
    old_rows = torch.load(rows_path, weights_only=True) if rows_path.exists() else {}
    for task in prev["tasks"]:
        if task in tasks:
            continue
        for noise in NOISES:
            cells[f"{task}@{noise}"] = prev["cells"][f"{task}@{noise}"]
        chosen[task], table[task] = prev["strength"].get(task, {}), prev["tuning"].get(task, {})
        if task in old_rows:
            grid_rows[task] = old_rows[task]
    return [t for t in TASKS if t in tasks or t in prev["tasks"]], chosen, table


def timing(res: dict, out: Path, ckpt: Path, device: str, n_images: int = 32, repeats: int = 3) -> dict:
    """Interleaved wall times of unguided, default and PnP-Flow solves at the strengths of the result ``res``
    (``<out>.json``; fastest of ``repeats`` each, ``n_images`` test crops; σ = 0.05, and both σ for the deblur
    tasks, whose conjugate gradients depend on it): the time ratios without a second process beside them. Written
    to ``<out>_timing.json`` with the strengths and steps it timed, and quoted in the summary of a result with the
    same ones (:func:`timing_for`)."""
    model, _ = get_prior(ckpt, TRAIN, res["config"]["rgb"], torch.get_num_threads(), device)
    x = photo_crops(split="test", rgb=res["config"]["rgb"], min_std=MIN_STD, max_crops=n_images,
                    generator=torch.Generator().manual_seed(0))
    methods = [m for m in ("unguided", "default", "pnpflow") if m in res["methods"]]
    cells = {}
    for task in res["tasks"]:
        for noise in res["noises"] if task.startswith("deblur") else res["noises"][-1:]:
            best = {m: float("inf") for m in methods}
            for _ in range(repeats):
                for m in methods:
                    r = run_inverse(model, x, task, noise, m, res["config"]["steps"], seed=0, device=device,
                                    scale=res["strength"][task].get(m), measure_memory=False)
                    best[m] = min(best[m], r["seconds_per_image"])
            cells[f"{task}@{noise}"] = {**{f"seconds_per_image_{m}": v for m, v in best.items()},
                                        **{f"{m}_vs_unguided": best[m] / best["unguided"] for m in methods}}
            print(f"  timing {task}@{noise}: " + ", ".join(f"{m} {best[m] / best['unguided']:.2f}×" for m in methods),
                  flush=True)
    result = {"protocol": f"interleaved {', '.join(methods)} solves of {n_images} test crops at the tuned "
                          f"strengths, fastest of {repeats} each, {torch.get_num_threads()} torch thread(s), "
                          "one process", "steps": res["config"]["steps"], "strength": res["strength"],
              "cells": cells}
    out.with_name(out.name + "_timing.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=None, help="checkpoint folder of the prior; trained there when absent "
                                                 "(default: <tmp>/steerflow_bench_images[_rgb][_quick]/flow)")
    ap.add_argument("--rgb", action="store_true", help="the colour split (photos32-rgb) instead of grayscale")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for training and evaluation (one was 2.7× faster than two on this busy "
                         "2-core machine; try 2 when it is idle)")
    ap.add_argument("--methods", default=",".join(INVERSE_METHODS))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50, help="Euler steps of every solve")
    ap.add_argument("--repeats", type=int, default=1, help="timed solves per cell (the fastest is kept)")
    ap.add_argument("--no-tune", action="store_true", help="every method at its default strength")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: a tiny U-Net trained for 20 steps, 8 test and 4 validation crops, the tasks "
                         f"{', '.join(QUICK_TASKS)}, 4 Euler steps, two grid values per method")
    ap.add_argument("--merge", action="store_true",
                    help="keep the cells of the tasks not run now from the existing <out>.json (same settings), so "
                         "the tasks can be run in several invocations")
    ap.add_argument("--merge-from", default="", type=lambda v: [p for p in v.split(",") if p],
                    help="comma-separated outputs (without suffix) of other invocations with the same settings whose "
                         "tasks are added, e.g. parts run side by side with --tasks ... --out <part>; --tasks '' "
                         "only merges")
    ap.add_argument("--update", action="store_true",
                    help="re-run --methods on --tasks and replace their cells in the existing <out>.json (same "
                         "settings; the other methods' cells, and the unguided reference, are kept)")
    ap.add_argument("--timing", action="store_true",
                    help="re-time unguided / default / PnP-Flow interleaved at the strengths of the existing "
                         "<out>.json (no second process beside it), write <out>_timing.json and rewrite <out>.md")
    ap.add_argument("--out", default=str(RESULTS / "steering_images"), help="output path without suffix")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; expected some of {list(METHODS)}")
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}; expected some of {list(TASKS)}")
    settings, grid = TRAIN, dict(TUNE_GRID)
    if args.quick:
        settings = TRAIN_QUICK
        args.n_test, args.n_val, args.steps, args.repeats = 8, 4, 4, 1
        if args.tasks == ",".join(TASKS):
            tasks = list(QUICK_TASKS)
        grid = {m: g[:2] for m, g in grid.items()}
    if args.no_tune:
        grid = {}
    for name, val in (("--n-test", args.n_test), ("--n-val", args.n_val), ("--steps", args.steps)):
        if val < 1:
            ap.error(f"{name} must be >= 1, got {val}")
    torch.set_num_threads(args.threads)
    tag = "images" + ("_rgb" if args.rgb else "") + ("_quick" if args.quick else "")
    ckpt = Path(args.ckpt) if args.ckpt else Path(tempfile.gettempdir()) / f"steerflow_bench_{tag}" / "flow"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if args.timing:
        out = Path(args.out)
        res = json.loads(out.with_suffix(".json").read_text())
        timing(res, out, ckpt, args.device, n_images=min(32, args.n_test), repeats=max(3, args.repeats))
        write_markdown(res, out.with_suffix(".md"))
        return 0
    model, train_info = get_prior(ckpt, settings, args.rgb, args.threads, args.device)

    split = CROP_SPLITS["rgb" if args.rgb else "gray"]
    x_test = photo_crops(split="test", rgb=args.rgb, min_std=MIN_STD, max_crops=args.n_test,
                         generator=torch.Generator().manual_seed(0))
    x_val = photo_crops(split="val", rgb=args.rgb, min_std=MIN_STD, max_crops=args.n_val,
                        generator=torch.Generator().manual_seed(1))
    if x_test.shape[0] < args.n_test or x_val.shape[0] < args.n_val:
        raise SystemExit(f"only {x_test.shape[0]} test / {x_val.shape[0]} validation crops with std >= {MIN_STD}")
    x_train = photo_crops(split="train", rgb=args.rgb)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    quality = unguided_quality(model, x_test, photo_crops(split="val", rgb=args.rgb, min_std=MIN_STD), x_train,
                               args.steps, args.device, out.with_name(out.name + "_samples.png"))
    del x_train
    print(f"unguided: energy distance to test {quality['energy_distance_samples_vs_test']:.4f} "
          f"(val vs test {quality['energy_distance_val_vs_test']:.4f})", flush=True)

    chosen, table = tune(model, x_val, tasks, methods, NOISES, args.steps, args.device, grid)
    cells, grid_rows = {}, {}
    for noise in NOISES:
        for task in tasks:
            key = f"{task}@{noise}"
            cells[key] = {}
            outputs, y_shown = {}, None
            for m in methods:
                r = run_inverse(model, x_test, task, noise, m, args.steps, seed=0, device=args.device,
                                scale=chosen[task].get(m), repeats=args.repeats)
                outputs[m], y_shown = r.pop("output"), r.pop("measurement")
                r["psnr"], r["psnr_se"] = mean_se(r["psnr_per_image"])
                r["ssim"], r["ssim_se"] = mean_se(r["ssim_per_image"])
                cells[key][m] = r
                print(f"  {key:18s} {m:9s} PSNR={r['psnr']:6.2f}±{r['psnr_se']:.2f} SSIM={r['ssim']:.3f}"
                      f"±{r['ssim_se']:.3f} {r['seconds_per_image'] * 1e3:8.1f} ms/img "
                      f"NFE={r['nfe']} VJP={r['vjp']} A={r['operator_calls']}", flush=True)
            base = cells[key].get("unguided")
            for r in cells[key].values():
                r["time_vs_unguided"] = None if base is None else r["seconds_per_image"] / base["seconds_per_image"]
                ok = base is not None and base["peak_bytes_per_image"] and r["peak_bytes_per_image"] is not None
                r["memory_vs_unguided"] = r["peak_bytes_per_image"] / base["peak_bytes_per_image"] if ok else None
            if noise == NOISES[-1]:
                shape = tuple(x_test.shape[1:])
                grid_rows[task] = torch.cat([x_test[:1], as_image(y_shown[:1], shape).clamp(-1, 1)]
                                            + [outputs[m][:1] for m in methods])
    rows_path = out.with_name(out.name + "_grid_rows.pt")
    if args.update:
        res, rows = update_previous(out, args, methods, tasks, cells, chosen, table, grid_rows)
        torch.save(rows, rows_path)
        write_grid([rows[t] for t in res["tasks"] if t in rows], out.with_name(out.name + "_grid.png"))
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        write_markdown(res, out.with_suffix(".md"))
        print(f"updated {', '.join(methods)} on {', '.join(tasks)} in {out.with_suffix('.json')}", flush=True)
        return 0
    if args.merge:
        tasks, chosen, table = merge_previous(out, args, methods, tasks, cells, chosen, table, grid_rows, rows_path)
    for part in args.merge_from:
        part = Path(part)
        tasks, chosen, table = merge_part(part.with_suffix(".json"), part.with_name(part.name + "_grid_rows.pt"),
                                          args, methods, tasks, cells, chosen, table, grid_rows)
    if args.merge or args.merge_from:
        cells = {f"{t}@{noise}": cells[f"{t}@{noise}"] for noise in NOISES for t in tasks}
    if not tasks:
        raise SystemExit("no task was run or merged")
    torch.save({t: r.contiguous() for t, r in grid_rows.items()}, rows_path)
    grid_png = out.with_name(out.name + "_grid.png")
    write_grid([grid_rows[t] for t in tasks if t in grid_rows], grid_png)
    cmd = "python benchmarks/bench_steering_images.py" + (" --rgb" if args.rgb else "") + (
        " --quick" if args.quick else "")
    for flag, value, default in (("--steps", args.steps, 50), ("--n-test", args.n_test, 64),
                                 ("--n-val", args.n_val, 16), ("--methods", ",".join(methods),
                                                               ",".join(INVERSE_METHODS))):
        if value != default and not args.quick:
            cmd += f" {flag} {value}"
    if args.merge or args.merge_from:
        cmd += "  (tasks run in several invocations with --tasks ... and merged)"
    setup = (f"Prior: UNetVelocity (base width {settings['unet_width']}, channel_mult (1, 2), 1 residual block per "
             f"level) trained by `steerflow train --data {'photos32-rgb' if args.rgb else 'photos32'}` on the 32×32 "
             f"training crops of {', '.join(split['train'])}; tuning on {x_val.shape[0]} crops of "
             f"{', '.join(split['val'])}, test on {x_test.shape[0]} crops of {', '.join(split['test'])} (pixel std ≥ "
             f"{MIN_STD}, non-overlapping). {args.steps} Euler steps; EnKG {ENKG_ENSEMBLE} particles per image. "
             f"SSIM: 11×11 Gaussian window, σ = 1.5, valid (skimage's gaussian_weights=True, "
             f"use_sample_covariance=False). Strengths: per task, best mean validation PSNR over σ ∈ {{0.01, 0.05}} "
             f"on TUNE_GRID{' (--no-tune: defaults)' if args.no_tune else ''}. Device {args.device}, "
             f"{args.threads} threads, torch {torch.__version__}."
             + (" QUICK SMOKE RUN: numbers are meaningless." if args.quick else ""))
    res = {"command": cmd, "setup": setup, "config": vars(args), "methods": methods, "tasks": tasks,
           "noises": list(NOISES), "training": train_info, "unguided_quality": quality, "strength": chosen,
           "tuning": table, "cells": cells, "grid_png": grid_png.name,
           "memory_method": ("torch.cuda.max_memory_allocated above the pre-solve allocation"
                             if args.device.startswith("cuda") else
                             f"torch.profiler profile_memory peak of live tensor bytes, {PROFILE_STEPS}-step solve")}
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out.with_suffix(".md"))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {grid_png.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
