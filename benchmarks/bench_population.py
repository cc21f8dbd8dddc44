"""Population-conditioned flows (Meta Flow Matching, Atanackovic et al. 2024) on held-out glyph populations.

Family (steerflow.transport.population): 2-D point clouds of 12 glyph-like shapes, each population a glyph at
a random rotation θ and centre c with noise; its future is ``T_c(x) = c + λ R(φ)(x - c) + b`` observed as an
independent draw. Ten glyphs train (``per_glyph`` poses each); N and E are held out entirely. Models, equal
budget (steps, batch of 8 populations × 64 points, Adam), independent coupling inside each population:

* ``plain FM``: v(x, t) — the point only;
* ``label FM (glyph id)``: v(x, t, one-hot glyph) — zero vector for held-out glyphs;
* ``label FM (glyph id + pose)``: v(x, t, [one-hot, cos θ, sin θ, c]) — oracle metadata;
* ``Meta FM (mean pooling)`` / ``Meta FM (attention pooling)``: v(x, t, φ(P_0)) with a SetEncoder of P_0.

Metrics per test population (mean over populations): exact W1 and W2 by optimal assignment between the
pushed-forward population and the observed future, and squared MMD (steerflow.metrics.mmd_rbf).
The floor row pushes P_0 through the true T_c (the metrics' sampling noise).
Reproduce: ``python benchmarks/bench_population.py [--steps 4000]``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from steerflow.metrics import mmd_rbf
from steerflow.models.population import ConditionedVelocityMLP, PopulationVelocity, SetEncoder
from steerflow.solvers import sample
from steerflow.transport.population import assignment_wasserstein, make_populations, rotation, train_population_flow

RESULTS = Path(__file__).parent / "results"
TRAIN = ["L", "T", "V", "Z", "X", "H", "O", "C", "Y", "F"]
HELD_OUT = ["N", "E"]


def evaluate(push, fam) -> dict:
    w1, w2, mmd = [], [], []
    for i in range(fam.sources.shape[0]):
        x = push(i)
        w1.append(float(assignment_wasserstein(x, fam.targets[i], p=1)))
        w2.append(float(assignment_wasserstein(x, fam.targets[i], p=2)))
        mmd.append(mmd_rbf(x, fam.targets[i]))
    k = len(w1)
    return dict(W1=sum(w1) / k, W2=sum(w2) / k, MMD=sum(mmd) / k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--per-glyph", type=int, default=30)
    ap.add_argument("--points", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    family = dict(train_glyphs=TRAIN, centre_range=2.0, scale=0.5)
    train_fam = make_populations(TRAIN, args.per_glyph, args.points, g, **family)
    test_fam = make_populations(HELD_OUT, 5, args.points, g, **family)
    seen_fam = make_populations(TRAIN[:5], 1, args.points, g, **family)       # new poses of training glyphs
    n_glyph = len(TRAIN)
    models = {
        "plain FM": (lambda: ConditionedVelocityMLP(2, 0, 128, 3), lambda f: None),
        "label FM (glyph id)": (lambda: ConditionedVelocityMLP(2, n_glyph, 128, 3), lambda f: f.labels[:, :n_glyph]),
        "label FM (glyph id + pose)": (lambda: ConditionedVelocityMLP(2, n_glyph + 4, 128, 3), lambda f: f.labels),
        "Meta FM (mean pooling)": (lambda: PopulationVelocity(SetEncoder(2, 64, 32, pooling="mean"),
                                                              ConditionedVelocityMLP(2, 32, 128, 3)), lambda f: f.sources),
        "Meta FM (attention pooling)": (lambda: PopulationVelocity(SetEncoder(2, 64, 32, pooling="attention"),
                                                                   ConditionedVelocityMLP(2, 32, 128, 3)), lambda f: f.sources),
    }
    T = 0.5 * rotation(torch.tensor(0.5 * torch.pi))
    rows = []
    for split, fam in (("held-out glyphs", test_fam), ("training glyphs, new poses", seen_fam)):
        floor = evaluate(lambda i: fam.centres[i] + (fam.sources[i] - fam.centres[i]) @ T.T + torch.tensor([0.8, 0.0]), fam)
        rows.append(dict(model="floor (true T_c)", split=split, train_seconds=0.0, **floor))
    for name, (make, cond_of) in models.items():
        torch.manual_seed(args.seed)
        model = make()
        t0 = time.perf_counter()
        train_population_flow(model, train_fam.sources, train_fam.targets, cond_of(train_fam), steps=args.steps,
                              populations_per_batch=8, points_per_population=64, lr=2e-3,
                              generator=torch.Generator().manual_seed(args.seed))
        secs = time.perf_counter() - t0
        for split, fam in (("held-out glyphs", test_fam), ("training glyphs, new poses", seen_fam)):
            conds = cond_of(fam)

            def push(i, model=model, conds=conds, fam=fam):
                with torch.no_grad():
                    return sample(model, fam.sources[i], steps=20, method="midpoint",
                                  cond=None if conds is None else conds[i:i + 1])

            rows.append(dict(model=name, split=split, train_seconds=round(secs, 1), **evaluate(push, fam)))
            print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = (f"python benchmarks/bench_population.py --steps {args.steps} --per-glyph {args.per_glyph} "
           f"--points {args.points} --seed {args.seed}")
    meta = dict(args=vars(args), family=dict(centre_range=2.0, scale=0.5, turn="pi/2", shift=[0.8, 0.0], noise=0.04),
                train_glyphs=TRAIN, held_out=HELD_OUT, torch_threads=1, command=cmd)
    (RESULTS / "population.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = ["# Population-conditioned flows on held-out glyph populations", "",
             f"{len(TRAIN)} training glyphs × {args.per_glyph} poses, {args.points} points per population; held out: "
             f"{', '.join(HELD_OUT)} (5 poses each). {args.steps} steps, 8 populations × 64 points per batch, "
             "independent coupling inside populations, CPU 1 thread. W1/W2 exact (assignment), MMD squared (RBF).", "",
             "| model | split | W1 | W2 | MMD | train s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['split']} | {r['W1']:.3f} | {r['W2']:.3f} | {r['MMD']:.2e} | {r['train_seconds']} |")
    lines += ["", f"Reproduce: `{cmd}`"]
    (RESULTS / "population.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
