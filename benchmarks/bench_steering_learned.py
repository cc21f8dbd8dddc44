"""Steering on a learned flow: sklearn's 8×8 digits, held-out images, every guidance method.

A class-conditional MLP flow (64-D vectors, label dropout for the null class) is trained once and cached
(``--cache``, default a temp folder; not committed). Tasks on held-out images, each at measurement noise
σ ∈ {0.01, 0.05} (pixels in [-1, 1]): box inpainting (centre 4×4 hidden), random inpainting (40 % of pixels
observed), 2× super-resolution (2×2 average pooling), Gaussian deblur (5×5, std 1), denoising. Methods:
unguided, FlowChef, DPS, DDS, EnKG, OT-ODE, PnP-Flow and steerflow's default, all through the one
``steerflow.sample`` loop with 100 Euler steps on the unconditional (null-class) field; each method's strength
is chosen per task on validation digits (not the test digits) from ``TUNE_GRID`` (FlowChef: inner steps, step
size and schedule jointly; ``--no-tune``: defaults). Class guidance: CFG and classifier guidance (a noise-aware
classifier trained here) scored by a separately trained SVM on clean images.

Metrics: PSNR and SSIM against the clean image, outputs clipped to [-1, 1], data range R = 2; SSIM with a
5×5 Gaussian window (σ = 1.5, valid positions: a 4×4 map on 8×8 images). Time per image: wall time of the
batched solve / number of images, one thread, fastest of ``--repeats`` identical seeded solves (the machine
is shared, so single timings are noisy). Peak memory: torch.profiler (CPU, ``profile_memory=True``):
the peak of live tensor bytes allocated during the solve, replayed from per-op self allocations in time
order (op granularity; Python objects excluded), in a second, separate 5-step solve of the same batch (the
live set of one step does not grow with the number of steps).

Second bed (``--bed patches``): 8×8 grayscale patches of scikit-image's bundled photographs
(``steerflow.data.photos.photo_patches``). An unconditional MLP flow is trained on the overlapping (stride 4)
patches of the training photographs and tested on non-overlapping patches of two photographs held out whole
(``chelsea``, ``coffee``), keeping only textured ones (pixel std ≥ ``PATCH_MIN_STD`` in [-1, 1] units: flat
background has nothing to restore); the validation patches for tuning come from the same held-out photographs
(disjoint from the test patches). Same tasks, noises, methods, tuning and metrics; no class-guidance table
(the patches have no classes). Results go to ``results/steering_learned_patches.{json,md}``.

Reproduce:  python benchmarks/bench_steering_learned.py            (about 5 min on one CPU core, longer when busy)
            python benchmarks/bench_steering_learned.py --bed patches   (training ≈ 5 min + the benchmark)
            python benchmarks/bench_steering_learned.py --quick    (smoke run)
            python benchmarks/bench_steering_learned.py --methods flowchef,dps --merge
                (re-tune and re-measure only those methods; the others' rows come from the existing JSON)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import steerflow
from steerflow.steering.tasks import build_task, build_method, INVERSE_METHODS
from steerflow.data.loaders import load_digits
from steerflow.metrics.image import psnr, ssim
from steerflow.metrics.cost import Cost
from steerflow.models import MLPVelocity
from steerflow.steering.cfg import ClassifierFreeGuidance, ClassifierGuidance
from steerflow.training import load_checkpoint, train

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (1, 8, 8)
DATA_RANGE = 2.0
SSIM_WINDOW = 5
TASKS = ("box", "random", "superres", "deblur", "denoise")
TASK_NAMES = {"box": "inpaint (box)", "random": "inpaint (random 40%)", "superres": "2x super-res",
              "deblur": "Gaussian deblur", "denoise": "denoise"}
NOISES = (0.01, 0.05)
ENKG_ENSEMBLE = 8
FLOWCHEF_GRID = tuple({"n_inner": k, "step_size": s, "schedule": w}
                      for k in (1, 3, 5, 10) for s in (4.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.03)
                      for w in ("constant", "linear"))
"""FlowChef's real hyper-parameters: inner gradient steps per outer step (v held fixed, no network call),
step size ``s`` on ``½‖y − A x̂_1‖²`` and its time schedule (``s_t = s`` or ``s (1 − t)``)."""
TUNE_GRID = {"flowchef": FLOWCHEF_GRID, "dps": (2.0, 1.0, 0.5, 0.2, 0.05),
             "enkg": (1.0, 0.5, 0.2, 0.05, 0.01), "otode": (8.0, 4.0, 2.0, 1.0, 0.5),
             "pnpflow": (16.0, 8.0, 4.0, 2.0, 1.0, 0.5), "default": (4.0, 2.0, 1.5, 1.0, 0.5)}
"""Values of each method's main strength tried on the validation images (the method's default included;
PnP-Flow: step size, FlowChef: (n_inner, step size, schedule), the others: scale). DDS and unguided have no
strength knob."""
N_VAL = 8
PROFILE_STEPS = 5
BEDS = ("digits", "patches")
PATCH_TRAIN_STRIDE = 4
PATCH_MIN_STD = 0.1
"""Test/validation patches with a smaller pixel std (in [-1, 1] units, ≈ 13 gray levels) are dropped."""


# --- models ---------------------------------------------------------------------------------------------
def split_digits(seed: int = 0):
    data = load_digits()
    train_set, test_set = data.split((0.85, 0.15), generator=torch.Generator().manual_seed(seed))
    return train_set, test_set


def split_patches(n_test: int, seed: int = 0):
    """Training patches (stride ``PATCH_TRAIN_STRIDE``, all of them) and ``n_test`` textured held-out patches
    (non-overlapping tiles of ``TEST_IMAGES`` with std ≥ ``PATCH_MIN_STD``, a seeded random subset)."""
    from steerflow.data.photos import photo_patches

    x_train = photo_patches(8, split="train", stride=PATCH_TRAIN_STRIDE)
    x_test = photo_patches(8, split="test", min_std=PATCH_MIN_STD, max_patches=n_test,
                           generator=torch.Generator().manual_seed(seed))
    return x_train, x_test


def get_patch_flow(cache: Path, x_train, steps: int) -> torch.nn.Module:
    """The unconditional patch flow (trained once, cached like the digits flow)."""
    out = cache / "flow"
    if not (out / "latest.json").exists():
        model = MLPVelocity(dim=64, hidden=512, depth=4, time_embed_dim=64)
        t0 = time.time()
        train(model, x_train, steps=steps, batch_size=256, lr=1e-3, warmup=min(200, steps // 10),
              lr_schedule="cosine", ema_decay=0.999, device="cpu", seed=0, out_dir=out, log_every=250,
              progress=False)
        print(f"trained the flow in {time.time() - t0:.0f} s -> {out}", flush=True)
    ck = load_checkpoint(out)
    return (ck.ema_model or ck.model).eval()


def get_flow(cache: Path, train_set, steps: int) -> torch.nn.Module:
    out = cache / "flow"
    if not (out / "latest.json").exists():
        model = MLPVelocity(dim=64, hidden=512, depth=4, time_embed_dim=64, n_classes=10, label_dropout=0.15)
        t0 = time.time()
        train(model, (train_set.x, train_set.labels), steps=steps, batch_size=256, lr=1e-3, warmup=min(200, steps // 10),
              lr_schedule="cosine", ema_decay=0.999, device="cpu", seed=0, out_dir=out, log_every=250,
              progress=False)
        print(f"trained the flow in {time.time() - t0:.0f} s -> {out}", flush=True)
    ck = load_checkpoint(out)
    return (ck.ema_model or ck.model).eval()


class NoisyClassifier(torch.nn.Module):
    """``p(c | x_t)``: an MLP on ``[x_t, φ(t)]`` trained on the linear path (for classifier guidance)."""

    def __init__(self) -> None:
        super().__init__()
        from steerflow.models.base import SinusoidalTimeEmbedding

        self.emb = SinusoidalTimeEmbedding(32)
        self.net = torch.nn.Sequential(torch.nn.Linear(64 + 32, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256),
                                       torch.nn.SiLU(), torch.nn.Linear(256, 10))

    def forward(self, x, t):
        return self.net(torch.cat([x.reshape(x.shape[0], -1), self.emb(t)], -1))


def get_noisy_classifier(cache: Path, train_set, steps: int = 3000) -> NoisyClassifier:
    from safetensors.torch import load_file, save_file

    path = cache / "classifier_xt.safetensors"
    clf = NoisyClassifier()
    if path.exists():
        clf.load_state_dict(load_file(path))
        return clf.eval()
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-3)
    x, y = train_set.x, train_set.labels
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (256,), generator=g)
        t = torch.rand(256, generator=g)
        x0 = torch.randn(256, *SHAPE, generator=g)
        xt = t[:, None, None, None] * x[idx] + (1 - t[:, None, None, None]) * x0
        loss = torch.nn.functional.cross_entropy(clf(xt, t), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_file(clf.state_dict(), str(path))
    return clf.eval()


def get_judge(train_set):
    """The separately trained scorer: an RBF SVM on clean training images (sklearn)."""
    try:
        from sklearn.svm import SVC
    except ImportError as e:  # pragma: no cover
        raise ImportError("the benchmark needs scikit-learn: pip install 'steerflow[bench]'") from e
    svm = SVC(C=10.0, gamma="scale")
    svm.fit(train_set.x.reshape(train_set.x.shape[0], -1).numpy(), train_set.labels.numpy())
    return svm


# --- measurement ----------------------------------------------------------------------------------------
def profile_peak_bytes(fn) -> int:
    """Peak of live tensor bytes during ``fn()`` from torch.profiler's per-op self allocations (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage != 0)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


def strength_label(value) -> str:
    """A grid value as text: a number, or ``k=…,s=…,schedule`` for FlowChef's settings."""
    if isinstance(value, dict):
        return f"k={value['n_inner']},s={value['step_size']:g},{value['schedule']}"
    return str(value)


def make_guidance(method, op, y, noise, strength):
    """The method's guidance; ``strength`` is a number (its main knob, via ``build_method``) or a dict of
    keyword arguments for the guidance's constructor (FlowChef's n_inner / step_size / schedule)."""
    if isinstance(strength, dict):
        from steerflow.steering import get_guidance

        return get_guidance(method, op, y, noise, **strength)
    return build_method(method, op, y, noise, scale=strength, ensemble_size=ENKG_ENSEMBLE)


def run_inverse(v, x_true, task, noise, method, steps, seed, measure_memory=True, scale=None, repeats=1):
    gen = torch.Generator().manual_seed(seed)
    op = build_task(task, SHAPE, generator=torch.Generator().manual_seed(123))
    y = op(x_true) + noise * torch.randn(op(x_true).shape, generator=gen)
    n = x_true.shape[0]
    reps = ENKG_ENSEMBLE if method == "enkg" else 1
    y_run = y.repeat_interleave(reps, 0)

    def solve(steps=steps):
        guidance = make_guidance(method, op, y_run, noise, scale)
        x0 = torch.randn(n * reps, *SHAPE, generator=torch.Generator().manual_seed(seed + 1))
        cost = Cost()
        out = steerflow.sample(v, x0, steps=steps, method="euler", guidance=guidance,
                               generator=torch.Generator().manual_seed(seed + 2), cost=cost)
        return out, cost

    # the network's parameters are frozen: autograd records a graph only where a method asks for one
    seconds = float("inf")
    for _ in range(repeats):  # the solve is seeded: every repeat computes the same result; keep the fastest
        t0 = time.perf_counter()
        out, cost = solve()
        seconds = min(seconds, time.perf_counter() - t0)
    # the live set of a step does not grow with the number of steps: profile a short solve of the same batch
    peak = profile_peak_bytes(lambda: solve(PROFILE_STEPS)) if measure_memory else None
    out = out.detach().clamp(-1, 1)
    x_rep = x_true.repeat_interleave(reps, 0)
    return {
        "psnr": psnr(out, x_rep, DATA_RANGE),
        "ssim": ssim(out, x_rep, DATA_RANGE, window_size=SSIM_WINDOW),
        "seconds_per_image": seconds / n,
        "peak_memory_mb": None if peak is None else peak / 2**20,
        "nfe": cost.nfe, "vjp": cost.vjp, "operator_calls": cost.operator_calls,
        "particles_per_image": reps, "strength": scale,
    }


def tune(v, x_val, methods, noises, steps):
    """Per task, each method's strength maximising the mean PSNR over the validation images and noise levels."""
    chosen, table = {}, {}
    for task in TASKS:
        chosen[task], table[task] = {}, {}
        for m in methods:
            if m not in TUNE_GRID:
                continue
            scores, values = {}, {}
            for value in TUNE_GRID[m]:
                label = strength_label(value)
                values[label] = value
                try:
                    score = float(np.mean([run_inverse(v, x_val, task, noise, m, steps, seed=7,
                                                       measure_memory=False, scale=value)["psnr"]
                                           for noise in noises]))
                except FloatingPointError:  # the solve diverged at this strength
                    score = float("-inf")
                scores[label] = score if np.isfinite(score) else float("-inf")
            best = max(scores, key=scores.get)  # first of equal scores wins (grid order)
            chosen[task][m], table[task][m] = values[best], {k: round(val, 3) for k, val in scores.items()}
            shown = sorted(scores.items(), key=lambda kv: -kv[1])[:5] if len(scores) > 8 else scores.items()
            print(f"  tune {task:9s} {m:9s} " + " ".join(f"{k}:{val:.2f}" for k, val in shown)
                  + f" -> {best}", flush=True)
    return chosen, table


def run_class(model, noisy_clf, judge, n_per_class, steps, seed):
    labels = torch.arange(10).repeat_interleave(n_per_class)
    n = labels.numel()
    x0 = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))
    settings = {
        "unguided (null class)": dict(guidance=None),
        "conditional (CFG w=1)": dict(guidance=ClassifierFreeGuidance(1.0, labels)),
        "CFG w=2": dict(guidance=ClassifierFreeGuidance(2.0, labels)),
        "CFG w=4": dict(guidance=ClassifierFreeGuidance(4.0, labels)),
        "classifier guidance x_t s=1": dict(guidance=ClassifierGuidance(noisy_clf, labels, 1.0)),
        "classifier guidance x_t s=3": dict(guidance=ClassifierGuidance(noisy_clf, labels, 3.0)),
    }
    rows = {}
    for name, kw in settings.items():
        t0 = time.perf_counter()
        cost = Cost()
        out = steerflow.sample(model, x0, steps=steps, method="euler", cost=cost, **kw).detach().clamp(-1, 1)
        seconds = time.perf_counter() - t0
        pred = judge.predict(out.reshape(n, -1).numpy())
        rows[name] = {"accuracy": float((pred == labels.numpy()).mean()), "seconds_per_image": seconds / n,
                      "nfe": cost.nfe, "vjp": cost.vjp}
        print(f"  class  {name:32s} acc={rows[name]['accuracy']:.3f}  {seconds / n * 1e3:.1f} ms/img", flush=True)
    return rows


# --- report ----------------------------------------------------------------------------------------------
def write_markdown(res: dict, path: Path, cmd: str) -> None:
    digits = res["config"].get("bed", "digits") == "digits"
    title = "8×8 digits" if digits else "8×8 patches of scikit-image's bundled photographs"
    L = [f"# Steering a learned flow: {title}", "",
         f"Reproduce: `{cmd}`", "",
         res["setup"], "",
         "PSNR (dB) / SSIM vs the clean held-out image (clipped to [-1, 1], data range 2, SSIM 5×5 Gaussian window, "
         "σ_w = 1.5, valid). Time: ms per image (one thread, batched solve, fastest of "
         f"{res['config'].get('repeats', 1)} identical seeded runs). Memory: peak live tensor MB during the "
         "solve from torch.profiler (CPU, op granularity). EnKG runs an ensemble of "
         f"{ENKG_ENSEMBLE} particles per image (time and memory include them; PSNR is the mean over particles).", ""]
    methods = res["methods"]
    for noise in sorted({float(k.split("@")[1]) for k in res["inverse"]}):
        L += [f"## Measurement noise σ = {noise}", "",
              "| method | " + " | ".join(TASK_NAMES[t] for t in TASKS) + " | ms/img (mean) | peak MB (mean) |",
              "|---|" + "---|" * (len(TASKS) + 2)]
        for m in methods:
            cells, times, mems = [], [], []
            for task in TASKS:
                r = res["inverse"][f"{task}@{noise}"].get(m)
                if r is None or "diverged" in r:
                    cells.append("—" if r is None else "diverged")
                    continue
                cells.append(f"{r['psnr']:.2f} / {r['ssim']:.3f}")
                times.append(r["seconds_per_image"] * 1e3)
                if r["peak_memory_mb"] is not None:
                    mems.append(r["peak_memory_mb"])
            L.append(f"| {m} | " + " | ".join(cells) + f" | {np.mean(times):.1f} | "
                     + (f"{np.mean(mems):.2f}" if mems else "—") + " |")
        L.append("")
    if res.get("strength"):
        L += ["## Chosen strengths (per task, by validation PSNR)", "",
              "| method | " + " | ".join(TASK_NAMES[t] for t in TASKS) + " |", "|---|" + "---|" * len(TASKS)]
        for m in methods:
            if any(m in res["strength"][t] for t in TASKS):
                L.append(f"| {m} | " + " | ".join(strength_label(res["strength"][t][m]) if m in res["strength"][t]
                                                  else "—" for t in TASKS) + " |")
        L.append("")
    L += ["## FlowChef vs DPS (the issue's target: PSNR within 0.5 dB, ≥ 1.5× faster, less peak memory)", "",
          "| task | σ | FlowChef setting | ΔPSNR FlowChef − DPS (dB) | ms/img FlowChef / DPS | speed-up DPS/FlowChef "
          "| peak MB FlowChef / DPS | NFE / VJP / A-calls FlowChef | NFE / VJP / A-calls DPS | target met |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for row in res["flowchef_vs_dps"]:
        setting = row.get("flowchef_setting")
        cf, cd = row.get("cost_flowchef") or {}, row.get("cost_dps") or {}
        L.append(f"| {TASK_NAMES[row['task']]} | {row['noise']} | {strength_label(setting) if setting is not None else '—'} "
                 f"| {row['delta_psnr']:+.2f} | {row.get('ms_flowchef', float('nan')):.1f} / "
                 f"{row.get('ms_dps', float('nan')):.1f} | {row['speedup']:.2f}× | "
                 f"{row['mem_flowchef']:.2f} / {row['mem_dps']:.2f} | "
                 f"{cf.get('nfe')} / {cf.get('vjp')} / {cf.get('operator_calls')} | "
                 f"{cd.get('nfe')} / {cd.get('vjp')} / {cd.get('operator_calls')} | {'yes' if row['met'] else 'no'} |")
    s = res["flowchef_vs_dps_summary"]
    L += ["", f"Target met on {s['met']} of {s['total']} task/noise settings "
              f"(PSNR within 0.5 dB: {s['psnr_ok']}, ≥ 1.5× faster: {s['speed_ok']}, less memory: {s['mem_ok']}). "
              "NFE = network evaluations, VJP = backward passes through the network, A-calls = operator "
              "applications (FlowChef's inner steps cost only these), per batched solve.", ""]
    if res.get("merged"):
        L += [f"Merged run: {', '.join(res['merged']['rerun'])} re-tuned and re-measured in this run; the rows of "
              f"{', '.join(res['merged']['kept'])} and the class-guidance table come from the previous full run "
              "(same seeds, images and protocol; their timings are from that run).", ""]
    if not digits:
        L += ["## Class guidance", "", "Not applicable: the photo patches have no classes (the flow is unconditional), "
              "so there is no CFG or classifier-guidance table on this bed.", ""]
    if res.get("class"):
        L += ["## Class guidance (accuracy of a separately trained RBF-SVM on the generated digits)", "",
              "| setting | accuracy | ms/img | NFE | VJP |", "|---|---|---|---|---|"]
        for name, r in res["class"].items():
            L.append(f"| {name} | {r['accuracy']:.3f} | {r['seconds_per_image'] * 1e3:.1f} | {r['nfe']} | {r['vjp']} |")
        L += ["", f"SVM accuracy on clean held-out digits: {res['judge_test_accuracy']:.3f}.", ""]
    path.write_text("\n".join(L))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bed", choices=BEDS, default="digits",
                    help="digits: sklearn's 8×8 digits (class-conditional flow); patches: 8×8 patches of "
                         "scikit-image's bundled photographs (unconditional flow)")
    ap.add_argument("--cache", default=None, help="default: <tmp>/steerflow_bench_<bed>")
    ap.add_argument("--train-steps", type=int, default=None, help="default: 4000 (digits), 15000 (patches)")
    ap.add_argument("--n-images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--methods", default=",".join(INVERSE_METHODS))
    ap.add_argument("--n-per-class", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="timed solves per method and task (the fastest is kept)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-tune", action="store_true", help="use every method's default strength")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--quick", action="store_true", help="8 images, 20 steps, one noise level (smoke run)")
    ap.add_argument("--merge", action="store_true",
                    help="rerun (tune + test) only --methods and keep every other method's rows, strengths and the "
                         "class-guidance table from the existing --out JSON (which must come from a full run)")
    ap.add_argument("--out", default=None,
                    help="default: results/steering_learned (digits), results/steering_learned_patches (patches)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    digits = args.bed == "digits"
    if args.cache is None:
        args.cache = os.path.join(tempfile.gettempdir(), f"steerflow_bench_{args.bed}")
    if args.train_steps is None:
        args.train_steps = 4000 if digits else 15000
    if args.out is None:
        args.out = str(RESULTS / ("steering_learned" if digits else "steering_learned_patches"))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if digits:
        train_set, test_set = split_digits()
        model = get_flow(cache, train_set, args.train_steps)
        noisy_clf = get_noisy_classifier(cache, train_set)
    else:
        x_train, x_pool = split_patches(args.n_images + N_VAL)
        model = get_patch_flow(cache, x_train, args.train_steps)
    if args.train_only:
        return 0
    if args.quick:
        args.n_images, args.steps, args.n_per_class = 8, 20, 3
    if digits:
        judge = get_judge(train_set)
        judge_acc = float((judge.predict(test_set.x.reshape(test_set.x.shape[0], -1).numpy())
                           == test_set.labels.numpy()).mean())
        x_true = test_set.x[: args.n_images]
        x_val = test_set.x[args.n_images: args.n_images + N_VAL]
    else:
        judge_acc = None
        x_true, x_val = x_pool[: args.n_images], x_pool[args.n_images: args.n_images + N_VAL]
    methods = [m for m in args.methods.split(",") if m]
    previous = None
    if args.merge:
        prev_path = Path(args.out).with_suffix(".json")
        if not prev_path.exists():
            raise SystemExit(f"--merge needs an existing result at {prev_path}")
        previous = json.loads(prev_path.read_text())
        if previous["config"].get("quick") != args.quick or previous["config"].get("steps") != args.steps:
            raise SystemExit("--merge: the existing result was made with other --quick/--steps settings")
        if previous["config"].get("bed", "digits") != args.bed:
            raise SystemExit(f"--merge: the existing result is from --bed {previous['config'].get('bed', 'digits')}")
    for p in model.parameters():
        p.requires_grad_(False)
    if digits:
        setup = (f"Flow: MLPVelocity(dim=64, hidden=512, depth=4, n_classes=10, label dropout 0.15), "
                     f"{args.train_steps} AdamW steps, batch 256, EMA 0.999, on {train_set.x.shape[0]} training digits; "
                     f"{x_true.shape[0]} held-out test digits; {args.steps} Euler steps; guidance on the null-class "
                     f"(unconditional) field. Each method's main strength is chosen per task from a small grid "
                     f"(TUNE_GRID) by mean PSNR on {N_VAL} other held-out digits at both noise levels (--no-tune: "
                     f"defaults). torch {torch.__version__}, 1 thread.")
    else:
        from steerflow.data.photos import TEST_IMAGES, TRAIN_IMAGES

        setup = (f"Flow: unconditional MLPVelocity(dim=64, hidden=512, depth=4), {args.train_steps} AdamW steps, "
                 f"batch 256, EMA 0.999, on {x_train.shape[0]} overlapping 8×8 grayscale patches (stride "
                 f"{PATCH_TRAIN_STRIDE}, BT.709 luminance, v / 127.5 − 1) of scikit-image's bundled photographs "
                 f"{', '.join(TRAIN_IMAGES)}; {x_true.shape[0]} test patches: non-overlapping tiles of the held-out "
                 f"photographs {', '.join(TEST_IMAGES)} with pixel std ≥ {PATCH_MIN_STD} (a seeded random subset; "
                 f"flat patches dropped); {args.steps} Euler steps. Each method's main strength is chosen per task "
                 f"from a small grid (TUNE_GRID) by mean PSNR on {N_VAL} other held-out patches of the same test "
                 f"photographs at both noise levels (--no-tune: defaults). Class guidance does not apply (the patches "
                 f"have no classes): no CFG / classifier-guidance table. torch {torch.__version__}, 1 thread.")
    res = {"setup": setup, "methods": methods, "inverse": {}, "judge_test_accuracy": judge_acc,
           "config": vars(args)}
    res["setup"] += (" FlowChef is tuned over n_inner ∈ {1, 3, 5, 10} inner gradient steps (v held fixed: no extra "
                     "network call), step size ∈ {4, 2, 1, 0.5, 0.2, 0.1, 0.03} and schedule ∈ {constant, linear}.")
    noises = NOISES[1:] if args.quick else NOISES
    if args.no_tune:
        chosen = {task: {} for task in TASKS}
    else:
        chosen, res["tuning"] = tune(model, x_val, methods, noises, args.steps)
    if previous is not None:  # keep the other methods' tuning from the full run
        for task in TASKS:
            for m, val in previous.get("strength", {}).get(task, {}).items():
                chosen[task].setdefault(m, val)
            if "tuning" in res:
                for m, val in previous.get("tuning", {}).get(task, {}).items():
                    res["tuning"][task].setdefault(m, val)
    res["strength"] = chosen
    for noise in noises:
        for task in TASKS:
            key = f"{task}@{noise}"
            res["inverse"][key] = {}
            for m in methods:
                try:
                    r = run_inverse(model, x_true, task, noise, m, args.steps, seed=0,
                                    measure_memory=not args.no_memory, scale=chosen[task].get(m), repeats=args.repeats)
                except FloatingPointError as e:  # a method without a tuned strength may diverge: record, go on
                    res["inverse"][key][m] = {"diverged": str(e).split(".")[0], "strength": chosen[task].get(m)}
                    print(f"  {key:16s} {m:10s} diverged", flush=True)
                    continue
                res["inverse"][key][m] = r
                print(f"  {key:16s} {m:10s} PSNR={r['psnr']:6.2f} SSIM={r['ssim']:.3f} "
                      f"{r['seconds_per_image'] * 1e3:7.2f} ms/img  peak={r['peak_memory_mb']} MB", flush=True)
    if previous is not None:
        rerun = list(methods)
        res["methods"] = list(previous["methods"]) + [m for m in methods if m not in previous["methods"]]
        for key, rows in previous["inverse"].items():
            for m, r in rows.items():
                res["inverse"].setdefault(key, {}).setdefault(m, r)
            res["inverse"][key] = {m: res["inverse"][key][m] for m in res["methods"] if m in res["inverse"][key]}
        res["merged"] = {"rerun": rerun, "kept": [m for m in res["methods"] if m not in rerun],
                         "previous_setup": previous["setup"]}
        methods = res["methods"]
    comp = []
    if "flowchef" in methods and "dps" in methods:
        for key, rows in res["inverse"].items():
            f, d = rows["flowchef"], rows["dps"]
            task, noise = key.split("@")
            dp, sp = f["psnr"] - d["psnr"], d["seconds_per_image"] / f["seconds_per_image"]
            mf, md = f["peak_memory_mb"] or float("nan"), d["peak_memory_mb"] or float("nan")
            comp.append({"task": task, "noise": float(noise), "delta_psnr": dp, "speedup": sp, "mem_flowchef": mf,
                         "mem_dps": md, "psnr_ok": dp >= -0.5, "speed_ok": sp >= 1.5, "mem_ok": mf < md,
                         "met": dp >= -0.5 and sp >= 1.5 and mf < md,
                         "flowchef_setting": res["strength"][task].get("flowchef"),
                         "ms_flowchef": f["seconds_per_image"] * 1e3, "ms_dps": d["seconds_per_image"] * 1e3,
                         "cost_flowchef": {k: f.get(k) for k in ("nfe", "vjp", "operator_calls")},
                         "cost_dps": {k: d.get(k) for k in ("nfe", "vjp", "operator_calls")}})
    res["flowchef_vs_dps"] = comp
    res["flowchef_vs_dps_summary"] = {k: sum(c[k] for c in comp) for k in ("met", "psnr_ok", "speed_ok", "mem_ok")}
    res["flowchef_vs_dps_summary"]["total"] = len(comp)
    if not digits:
        res["class"] = {}
        res["class_guidance"] = "not applicable: the photo patches have no classes (unconditional flow)"
    elif previous is not None:
        res["class"] = previous.get("class", {})
    else:
        res["class"] = run_class(model, noisy_clf, judge, args.n_per_class, args.steps, seed=0)
    cmd = ("python benchmarks/bench_steering_learned.py" + ("" if digits else " --bed patches")
           + (" --quick" if args.quick else ""))
    if args.merge:
        cmd = (cmd + "  (full run), then  " + cmd + f" --methods {','.join(res['merged']['rerun'])} --merge")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out.with_suffix(".md"), cmd)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}\nreproduce: {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
