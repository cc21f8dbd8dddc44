"""What does the one-step W2 score on the moons see? Controlled defects of an exact sampler, scored like a model.

``bench_quality.py`` / ``bench_onestep.py`` score a sampler by the exact ``W₂`` between 2000 of its points and 2000
fresh data points. A perfect sampler scores ≈ 0.21 there (``w2_noise.md``), mostly from the random moon counts of
the two sets. This script asks which defects of a sampler that score notices: it draws the moons' own random
variables (moon bit, angle φ, jitter ε; :func:`steerflow.data.toys.moons`) once per evaluation set, builds the
exact sample from them and, from *the same draws*, samples with one defect each (common random numbers, so the
paired difference isolates the defect):

* ``moon share p`` — a point is on the lower moon when its uniform is below ``1 − p`` instead of ½;
* ``between q`` — a fraction ``q`` of the points replaced by points spread over the gap between the moons
  (a Gaussian of std 0.5 around the data mean);
* ``ripple a`` — the angle warped to ``φ + a sin(5φ)/5``: density along each moon ``∝ 1/(1 + a cos 5φ)``;
* ``edge blur s`` — extra jitter ``3 s ζ (1, 1)``, ``ζ ~ N(0, 1)``, along the direction of the data's own jitter
  (softens the band edges);
* ``jitter s`` — isotropic Gaussian noise of std ``s``.

Each variant is scored against ``--sets`` independent reference sets; the table gives the mean ``W₂`` and the
mean paired excess over the exact sample on the same draws and references, with its standard error.

Run (≈ 5 min on one core)::

    python benchmarks/bench_w2_sensitivity.py

writes ``benchmarks/results/w2_sensitivity.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from steerflow.data.toys import moons
from steerflow.metrics import w2

RESULTS = Path(__file__).resolve().parent / "results"
MEAN = torch.tensor([0.8, 0.05], dtype=torch.float64)  # the moons' mean (steerflow.data.toys.moons)

# name -> keyword arguments of `defective`
VARIANTS = {
    "moon share 0.51": {"share": 0.51}, "moon share 0.52": {"share": 0.52},
    "between 0.01": {"between": 0.01}, "between 0.02": {"between": 0.02}, "between 0.05": {"between": 0.05},
    "ripple 0.1": {"ripple": 0.1}, "ripple 0.2": {"ripple": 0.2},
    "edge blur 0.02": {"blur": 0.02}, "edge blur 0.04": {"blur": 0.04},
    "jitter 0.05": {"jitter": 0.05}, "jitter 0.1": {"jitter": 0.1}, "jitter 0.15": {"jitter": 0.15},
}


def draws(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The moons' random variables for ``n`` points, plus the normals the defects use."""
    u = torch.rand(n, 3, generator=g, dtype=torch.float64)
    return {"phi": math.pi * u[:, 0], "side": u[:, 1], "eps": 0.2 * u[:, 2],
            "z": torch.randn(n, 3, generator=g, dtype=torch.float64)}


def defective(d: dict[str, torch.Tensor], *, share: float = 0.5, between: float = 0.0, ripple: float = 0.0,
              blur: float = 0.0, jitter: float = 0.0) -> torch.Tensor:
    """The moons sample of the draws ``d`` (exact with the defaults) with the given defects (see the docstring)."""
    phi = d["phi"] + ripple * torch.sin(5 * d["phi"]) / 5
    lower = d["side"] < 1.0 - share
    x = torch.where(lower, 1.0 - torch.cos(phi), torch.cos(phi))
    y = torch.where(lower, 0.5 - torch.sin(phi), torch.sin(phi))
    pts = 3.0 * torch.stack([x + d["eps"], y + d["eps"]], dim=1) - 1.0
    pts = pts + 3.0 * blur * d["z"][:, :1] + jitter * d["z"][:, 1:]
    k = int(round(between * pts.shape[0]))
    if k:
        pts = pts.clone()
        pts[:k] = MEAN + 0.5 * d["z"][:k, 1:]
    return pts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", type=int, default=40, help="evaluation sets (draws and references)")
    p.add_argument("--n-eval", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "w2_sensitivity"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    exact, scores = [], {name: [] for name in VARIANTS}
    for i in range(args.sets):
        ref = moons(args.n_eval, g).double()
        d = draws(args.n_eval, g)
        exact.append(w2(defective(d), ref))
        for name, kw in VARIANTS.items():
            scores[name].append(w2(defective(d, **kw), ref))
        print(f"set {i + 1}/{args.sets}: exact {exact[-1]:.4f}", flush=True)
    exact_a = np.array(exact)

    def stat(v: np.ndarray) -> dict:
        return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / math.sqrt(v.size))}

    rows = {name: {"w2": stat(np.array(v)), "excess": stat(np.array(v) - exact_a), "kwargs": VARIANTS[name]}
            for name, v in scores.items()}
    result = {"command": "python benchmarks/bench_w2_sensitivity.py", "sets": args.sets, "n_eval": args.n_eval,
              "seed": args.seed, "exact": stat(exact_a), "rows": rows, "seconds": time.perf_counter() - t0,
              "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["# Which sampler defects does the one-step W2 score see? (moons, exact OT, 2000 vs 2000)", "",
             f"{args.sets} evaluation sets; each defect is applied to the exact sample of the same draws (common random "
             "numbers) and scored against the same reference; `excess` = W2 of the defective sample − W2 of the exact "
             "one, mean ± standard error over the sets. Definitions: `bench_w2_sensitivity.py`'s docstring.", "",
             "| sampler | W2 | excess over exact |", "|---|---:|---:|",
             f"| exact | {result['exact']['mean']:.4f} ± {result['exact']['se']:.4f} | 0 |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['w2']['mean']:.4f} ± {r['w2']['se']:.4f} | "
                     f"{r['excess']['mean']:+.4f} ± {r['excess']['se']:.4f} |")
    lines += ["", f"Reproduce: `{result['command']}` ({result['seconds'] / 60:.1f} min; torch {torch.__version__}).", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
