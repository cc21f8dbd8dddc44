"""Train a flow on a 2-D toy, reload it from its checkpoint, and sample it with 1-8 solver steps.

    python examples/train_and_sample.py                  # 5000 steps, a 256-wide MLP (minutes on a CPU)
    python examples/train_and_sample.py --fast           # a seconds-long smoke run of the same code

Writes to ``--out`` (default ``train_and_sample_out/``): the training directory ``run/`` (checkpoints and
``log.jsonl``), ``samples.png`` (a row of scatters over the data, one per step count, with the energy distance
to fresh data in each corner) and ``results.json`` (the same numbers).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import steerflow
from steerflow.couplings import get_coupling
from steerflow.data import load_dataset, sample_toy
from steerflow.metrics import energy_distance
from steerflow.models import build_model
from steerflow.plotting import plot_nfe_grid
from steerflow.training import load_checkpoint, train


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="moons", help="a toy density (moons, 8gaussians, checkerboard, ...)")
    p.add_argument("--coupling", default="exact-ot", help="independent, exact-ot or sinkhorn")
    p.add_argument("--steps", type=int, default=5000, help="training steps")
    p.add_argument("--hidden", type=int, default=256, help="MLP width")
    p.add_argument("--fast", action="store_true", help="a tiny run (smoke test)")
    p.add_argument("--out", default="train_and_sample_out")
    args = p.parse_args(argv)
    if args.fast:
        args.steps, args.hidden = 150, 64
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    # --- train, with a checkpoint every quarter of the run --------------------------------------------
    model = build_model("mlp", dim=2, hidden=args.hidden, depth=3)
    res = train(model, load_dataset(args.data), coupling=get_coupling(args.coupling), steps=args.steps,
                batch_size=256, lr=1e-3 if not args.fast else 3e-3, ema_decay=0.999 if not args.fast else 0.99,
                out_dir=out / "run", ckpt_every=max(args.steps // 4, 1), progress=not args.fast)

    # --- reload the EMA weights from disk, as a later session would ---------------------------------
    ckpt = load_checkpoint(out / "run")
    v = ckpt.ema_model

    # --- sample with a few step counts and score against fresh data ----------------------------------
    n = 1000 if args.fast else 2000
    x_0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    data = sample_toy(args.data, n, generator=torch.Generator().manual_seed(2))
    samples, scores = {}, {}
    for steps in (1, 2, 4, 8):
        label = f"{steps} heun step{'s' * (steps > 1)} ({2 * steps} NFE)"
        samples[label] = steerflow.sample(v, x_0, steps=steps, method="heun")
        scores[label] = energy_distance(samples[label], data)
    name = f"{args.coupling}, {ckpt.step} steps"
    plot_nfe_grid({name: samples}, out / "samples.png", data=data, scores={name: scores}, score_name="ED²")
    (out / "results.json").write_text(json.dumps({"data": args.data, "coupling": args.coupling,
                                                  "train_steps": ckpt.step, "final_loss": float(res.losses[-1]),
                                                  "energy_distance": scores}, indent=1))
    for label, score in scores.items():
        print(f"{label:>22}: energy distance² to the data {score:.4f}")
    print(f"wrote {out / 'samples.png'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
