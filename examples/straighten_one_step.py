"""Straighten a flow to one step: 1-rectified flow → reflow (2-rectified flow) → one-step distillation.

    python examples/straighten_one_step.py               # 5000-step fits on moons (several minutes on a CPU)
    python examples/straighten_one_step.py --fast        # a seconds-long smoke run of the same code

Writes to ``--out`` (default ``straighten_out/``): ``one_step.png`` (one row per model, columns 1, 2 and 8 Euler
steps, energy distance to fresh data in each corner) and ``results.json`` (those numbers and each flow's
straightness, 0 for perfectly straight paths). ``steerflow demo`` is the full version with the CLI's settings.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import steerflow
from steerflow.data import load_dataset, sample_toy
from steerflow.metrics import energy_distance, straightness
from steerflow.models import build_model
from steerflow.plotting import plot_nfe_grid
from steerflow.straighten import distill, reflow
from steerflow.training import train


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="moons")
    p.add_argument("--steps", type=int, default=5000, help="optimiser steps of each fit (train, reflow, distill)")
    p.add_argument("--pairs", type=int, default=20000, help="ODE pairs drawn from the 1-RF for reflow")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--fast", action="store_true", help="tiny fits (smoke test)")
    p.add_argument("--out", default="straighten_out")
    args = p.parse_args(argv)
    if args.fast:
        args.steps, args.pairs, args.hidden = 150, 1000, 64
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    lr = 3e-3 if args.fast else 1e-3

    flow = train(build_model("mlp", dim=2, hidden=args.hidden, depth=3), load_dataset(args.data), steps=args.steps,
                 batch_size=256, lr=lr, progress=not args.fast).model                         # 1-RF
    rf2 = reflow(flow, source="gaussian", shape=(2,), n_pairs=args.pairs, train_steps=args.steps, lr=lr,
                 steps=16 if args.fast else None, method="rk4" if args.fast else "dopri5", seed=0,
                 progress=not args.fast)                                                      # 2-RF
    student = distill(rf2.model, pairs=rf2.pairs, train_steps=args.steps, lr=lr, seed=0,
                      progress=not args.fast)                                                 # one step

    n = 1000 if args.fast else 2000
    x_0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    data = sample_toy(args.data, n, generator=torch.Generator().manual_seed(2))
    models = {"1-RF": flow, "2-RF": rf2.model, "distilled": student.model}
    samples = {name: {} for name in models}
    scores = {name: {} for name in models}
    for name, v in models.items():
        for steps in (1, 2, 8):
            if name == "distilled" and steps > 1:
                continue  # the student is a one-step map
            label = f"{steps} Euler step{'s' * (steps > 1)}"
            samples[name][label] = steerflow.sample(v, x_0, steps=steps, method="euler")
            scores[name][label] = energy_distance(samples[name][label], data)
    straight = {name: straightness(v, x_0[:500], steps=32) for name, v in models.items() if name != "distilled"}
    plot_nfe_grid(samples, out / "one_step.png", data=data, scores=scores, score_name="ED²")
    (out / "results.json").write_text(json.dumps({"energy_distance": scores, "straightness": straight,
                                                  "fit_steps": args.steps}, indent=1))
    for name in models:
        print(f"{name:>9}: " + ", ".join(f"{k}: ED² {s:.4f}" for k, s in scores[name].items())
              + (f"; straightness {straight[name]:.4f}" if name in straight else ""))
    print(f"wrote {out / 'one_step.png'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
