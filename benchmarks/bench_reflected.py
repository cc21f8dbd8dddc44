"""Reflected flow matching (Xie et al. 2024) vs plain flow matching on a density piled against box walls.

Data: a 4×4 checkerboard on [0, 1]² whose coordinates are pushed towards the walls by
``φ(u) = ½ + ½ sign(2u - 1)|2u - 1|^0.35`` (support exactly the closed box, mass piled at edges and corners).
All runs use the same network (steerflow.models.MLPVelocity), optimiser budget and source Gaussian
N(½, 0.5² I) (unfolded); they differ only in the path and the sampler's geometry:

* ``plain``: linear path, flat sampler;
* ``plain + reflected sampler``: the same model sampled with ``geometry=Box`` (reflection only at sampling);
* ``reflected (folded normal)``: :class:`ReflectedPath` with the folded Gaussian base, ``geometry=Box``;
* ``reflected (uniform base)``: uniform source on the box (the linear path then never leaves the box),
  ``geometry=Box``.

Reported per sampler setting: fraction of samples outside [0, 1]², and energy distance (squared, exact) to
held-out data. Reproduce: ``python benchmarks/bench_reflected.py [--steps 3000]``.

``--digits``: a class-conditional model of sklearn's 8×8 digits (pixels in [-1, 1], many exactly at ±1)
trained plain and reflected (Box(-1, 1)^64, folded N(0, I) base, the same Gaussian source), sampled with
classifier-free guidance (steerflow.steering.cfg) at growing scales: fraction of pixels (and of images) outside
[-1, 1], and the accuracy of a logistic-regression classifier fitted on the real digits.
Reproduce: ``python benchmarks/bench_reflected.py --digits [--steps 4000]``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from steerflow.manifolds.domains import Box, ReflectedPath
from steerflow.metrics import energy_distance
from steerflow.models import MLPVelocity
from steerflow.solvers import sample
from steerflow.training import train

RESULTS = Path(__file__).parent / "results"


def walled_checkerboard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Checkerboard on [0, 1]² (dark cells of a 4×4 board) pushed against the walls, (n, 2)."""
    cell = torch.randint(0, 8, (n,), generator=generator)
    row = cell // 2
    col = 2 * (cell % 2) + (row % 2)
    u = (torch.stack([col, row], -1) + torch.rand(n, 2, generator=generator)) / 4
    z = 2 * u - 1
    return 0.5 + 0.5 * torch.sign(z) * z.abs().pow(0.35)


def digits(args) -> None:
    from sklearn.linear_model import LogisticRegression

    from steerflow.data.loaders import load_digits
    from steerflow.steering.cfg import ClassifierFreeGuidance

    ds = load_digits()
    x, y = ds.x.reshape(-1, 64), ds.labels
    box = Box(-1.0, 1.0, dim=64, base="folded_normal", scale=0.5)       # unfolded source N(0, I)
    clf = LogisticRegression(max_iter=2000).fit(x.numpy(), y.numpy())
    labels = torch.arange(10).repeat_interleave(args.n_eval // 10)
    rows = []
    for name, path in (("plain", "linear"), ("reflected", ReflectedPath(box))):
        torch.manual_seed(args.seed)
        model = MLPVelocity(64, hidden=256, depth=3, n_classes=10, label_dropout=0.1)
        t0 = time.perf_counter()
        res = train(model, (x, y), source=lambda n, gen: box.random_source(n, gen), path=path, steps=args.steps,
                    batch_size=256, lr=1e-3, seed=args.seed, progress=False, device="cpu")
        secs = time.perf_counter() - t0
        model = res.model.eval()
        x_0 = box.random_source(labels.shape[0], torch.Generator().manual_seed(args.seed + 2))
        samplers = [("flat", None, x_0), ("reflected sampler", box, box.reflect(x_0))] if name == "plain" \
            else [("reflected sampler", box, box.reflect(x_0))]
        for sampler_name, geometry, start in samplers:
            for w in (1.0, 2.0, 4.0, 8.0):
                with torch.no_grad():
                    out = sample(model, start, steps=32, method="heun", geometry=geometry,
                                 guidance=ClassifierFreeGuidance(w, labels))
                outside = (out.abs() > 1.0)
                acc = float((torch.from_numpy(clf.predict(out.numpy())) == labels).float().mean())
                rows.append(dict(model=name, sampler=sampler_name, guidance=w,
                                 pixels_outside=float(outside.float().mean()),
                                 images_outside=float(outside.any(-1).float().mean()),
                                 max_abs_pixel=float(out.abs().max()), classifier_accuracy=acc,
                                 train_seconds=round(secs, 1)))
                print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = f"python benchmarks/bench_reflected.py --digits --steps {args.steps} --n-eval {args.n_eval} --seed {args.seed}"
    (RESULTS / "reflected_digits.json").write_text(json.dumps(dict(meta=dict(args=vars(args), command=cmd), rows=rows), indent=2))
    lines = ["# Classifier-free guidance on 8×8 digits: plain vs reflected flow matching", "",
             f"MLPVelocity(64, 256, 3, n_classes=10, label dropout 0.1), {args.steps} steps × 256; source N(0, I); "
             f"{labels.shape[0]} samples (equal per class), Heun 32 steps. Classifier: logistic regression on the real "
             f"digits (accuracy on real data {clf.score(x.numpy(), y.numpy()):.3f}).", "",
             "| model | sampler | CFG scale | pixels outside [-1,1] | images with a pixel outside | max abs pixel | classifier accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['guidance']:g} | {r['pixels_outside']:.2%} | "
                     f"{r['images_outside']:.1%} | {r['max_abs_pixel']:.2f} | {r['classifier_accuracy']:.3f} |")
    lines += ["", f"Reproduce: `{cmd}`"]
    (RESULTS / "reflected_digits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--n-eval", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--digits", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.digits:
        digits(args)
        return
    g = torch.Generator().manual_seed(args.seed)
    data = walled_checkerboard(200_000, g)
    held_out = walled_checkerboard(args.n_eval, torch.Generator().manual_seed(args.seed + 1))
    folded = Box(0.0, 1.0, dim=2, base="folded_normal", scale=0.5)
    uniform = Box(0.0, 1.0, dim=2)
    gauss = lambda n, gen: folded.random_source(n, gen)               # N(½, 0.5² I), unfolded
    configs = {
        "plain": dict(path="linear", source=gauss),
        "reflected (folded normal)": dict(path=ReflectedPath(folded), source=gauss),
        "reflected (uniform base)": dict(path=ReflectedPath(uniform), source=lambda n, gen: uniform.random_source(n, gen)),
    }
    rows = []
    for name, cfg in configs.items():
        torch.manual_seed(args.seed)
        model = MLPVelocity(2, hidden=128, depth=3)
        t0 = time.perf_counter()
        res = train(model, data, source=cfg["source"], path=cfg["path"], steps=args.steps, batch_size=args.batch,
                    lr=2e-3, seed=args.seed, progress=False, device="cpu")
        secs = time.perf_counter() - t0
        model = res.model.eval()
        eg = torch.Generator().manual_seed(args.seed + 2)
        if name == "plain":
            x_0 = gauss(args.n_eval, eg)
            samplers = [("flat", None), ("reflected sampler", folded)]
        else:
            dom = folded if "folded" in name else uniform
            x_0 = dom.random_base(args.n_eval, eg)        # the t = 0 marginal of the reflected path
            samplers = [("reflected sampler", dom)]
        for sampler_name, geometry in samplers:
            for method, steps in (("euler", 8), ("euler", 32), ("heun", 16)):
                with torch.no_grad():
                    x = sample(model, x_0, steps=steps, method=method, geometry=geometry)
                out = float((~uniform.contains(x)).float().mean())
                ed = energy_distance(x, held_out)
                rows.append(dict(model=name, sampler=sampler_name, method=method, steps=steps,
                                 out_of_domain=out, energy_distance=ed, train_seconds=round(secs, 1),
                                 final_loss=float(res.losses[-100:].mean())))
                print(rows[-1], flush=True)
    ref = energy_distance(walled_checkerboard(args.n_eval, torch.Generator().manual_seed(99)), held_out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = dict(steps=args.steps, batch=args.batch, n_eval=args.n_eval, seed=args.seed,
                data_vs_data_energy_distance=ref, torch_threads=1,
                command=f"python benchmarks/bench_reflected.py --steps {args.steps} --batch {args.batch} "
                        f"--n-eval {args.n_eval} --seed {args.seed}")
    (RESULTS / "reflected.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = ["# Reflected vs plain flow matching: walled checkerboard in [0, 1]²", "",
             f"Same MLPVelocity(2, 128, 3), {args.steps} steps × batch {args.batch}, CPU 1 thread; "
             f"{args.n_eval} samples vs {args.n_eval} held-out points. Energy distance is squared (exact V-statistic); "
             f"two independent data sets give {ref:.2e}.", "",
             "| model | sampler | method | steps | out of [0,1]² | energy distance |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['method']} | {r['steps']} | {r['out_of_domain']:.2%} | "
                     f"{r['energy_distance']:.2e} |")
    lines += ["", f"Reproduce: `{meta['command']}`"]
    (RESULTS / "reflected.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
