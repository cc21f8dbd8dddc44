"""Sample quality against NFE on 2-D problems: couplings, reflow and distillation vs torchcfm.

Protocol (torchcfm's 2-D benchmark, Tong et al. 2024): torch threads 1; torchcfm's 3×64 SELU MLP
(``mlp-selu``); batch 256; Adam, lr 1e-3, constant; 5000 steps; W2 by exact OT (Hungarian, not squared)
between 2000 generated and 2000 fresh data samples; problems N(0, I) → moons and 8 gaussians → moons.

Rows (per problem and seed):

* ``I-CFM (1-RF)`` — independent coupling; ``OT-CFM`` — minibatch exact OT (steerflow's ``train``);
* ``torchcfm OT-CFM`` — torchcfm's ``ExactOptimalTransportConditionalFlowMatcher(sigma=0)`` with the same
  network, initial weights, optimiser and batches, trained side by side in this run (parity check);
* ``2-RF ← X`` — reflow of model X on ``--pairs`` dopri5 pairs, ``--reflow-steps`` steps (warm start, cosine);
* ``distilled ← 2-RF ← X`` — one-step regression on the 2-RF's own pairs, ``--distill-steps`` steps;
* ``budget-matched`` rows: OT-CFM trained for ``--matched-train`` steps, then reflow and distillation,
  so that the three stages together use 5000 steps — the same training budget as torchcfm.

Every row is sampled with Euler 1 / 4 / 100 steps and adaptive dopri5 (rtol = atol = 1e-5) from the same
2000 source points. The noise floor is W2 between two fresh data sets of 2000.

Run (≈ 10 min per seed on one core)::

    python benchmarks/bench_quality.py --seeds 0 1 2

writes ``benchmarks/results/quality.json`` and ``quality.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from steerflow.data import load_dataset, sample_toy
from steerflow.metrics import energy_distance, straightness, w2
from steerflow.models import build_model
from steerflow.solvers import sample
from steerflow.straighten import distill, generate_pairs, reflow
from steerflow.training import train

PROBLEMS = {"N(0,I)→moons": ("gaussian", "moons"), "8gaussians→moons": ("8gaussians", "moons")}
SETTINGS = ("1", "4", "100", "dopri5")
TARGETS = {"N(0,I)→moons": 0.25, "8gaussians→moons": 0.40}
RESULTS = Path(__file__).resolve().parent / "results"


def source_of(name):
    return lambda n, generator=None: sample_toy(name, n, generator)


def fresh_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp-selu", dim=2, width=64)


def hungarian_exact_ot(x_0: torch.Tensor, x_1: torch.Tensor, labels=None, generator=None):
    """Minibatch exact OT for equal batches with uniform weights: the optimal plan is a permutation
    (Birkhoff–von Neumann), found by the Hungarian method on ``|x_0 - x_1|²``. Used with
    ``--coupling-impl hungarian`` (e.g. when :mod:`steerflow.couplings` is unavailable)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x_0.double(), x_1.double()).square().cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    return x_0[torch.as_tensor(rows)], x_1[torch.as_tensor(cols)]


def train_ours(src: str, data: str, coupling: str | None, steps: int, seed: int, args) -> tuple[torch.nn.Module, float]:
    model = fresh_model(seed)
    if coupling == "exact-ot" and args.coupling_impl == "hungarian":
        coupling = hungarian_exact_ot
    t0 = time.perf_counter()
    res = train(model, load_dataset(data), source=source_of(src), coupling=coupling, steps=steps,
                batch_size=args.batch, lr=args.lr, schedule="constant", seed=seed, device="cpu", progress=False,
                log_every=max(1, min(100, steps)))
    return res.model.eval(), time.perf_counter() - t0


def train_torchcfm(src: str, data: str, steps: int, seed: int, args) -> tuple[torch.nn.Module, float]:
    """torchcfm's OT-CFM recipe: its matcher draws t, x_t, u_t and the exact-OT pairing; our loop and network."""
    from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher

    model = fresh_model(seed)
    fm = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # torchcfm draws t and the OT plan sample from torch's / numpy's global RNGs
    np.random.seed(seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        x_0 = sample_toy(src, args.batch, g)
        x_1 = sample_toy(data, args.batch, g)
        t, x_t, u_t = fm.sample_location_and_conditional_flow(x_0, x_1)
        loss = ((model(x_t, t) - u_t) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), time.perf_counter() - t0


@torch.no_grad()
def score(model, x_0: torch.Tensor, reference: torch.Tensor, settings=SETTINGS) -> dict:
    out = {}
    for s in settings:
        t0 = time.perf_counter()
        if s == "dopri5":
            from steerflow.metrics import Cost

            cost = Cost()
            x_1 = sample(model, x_0, method="dopri5", atol=1e-5, rtol=1e-5, cost=cost)
            nfe = cost.nfe
        else:
            x_1 = sample(model, x_0, steps=int(s), method="euler")
            nfe = int(s)
        out[s] = {"w2": w2(x_1, reference), "energy": energy_distance(x_1, reference), "nfe": nfe,
                  "sample_s": time.perf_counter() - t0}
    return out


def run_problem(label: str, src: str, data: str, seed: int, args) -> dict:
    log = lambda s: print(f"[{label} seed {seed}] {s}", flush=True)  # noqa: E731
    g_eval = torch.Generator().manual_seed(10_000 + seed)
    x_0 = sample_toy(src, args.n_eval, g_eval)
    reference = sample_toy(data, args.n_eval, g_eval)
    fresh = sample_toy(data, args.n_eval, g_eval)
    floor = w2(fresh, reference)
    log(f"noise floor W2 {floor:.4f}")
    rows: dict[str, dict] = {}
    models: dict[str, torch.nn.Module] = {}

    def add(name: str, model, seconds: float, budget: int, settings=SETTINGS, **extra) -> None:
        sc = score(model, x_0, reference, settings)
        s_val = straightness(model, x_0[:1000], steps=64, method="rk4") if settings != ("1",) else None
        rows[name] = {"scores": sc, "train_s": seconds, "budget_steps": budget, "straightness": s_val, **extra}
        models[name] = model
        log(f"{name:<34} W2@1 {sc['1']['w2']:.4f}" + (f"  W2@dopri5 {sc['dopri5']['w2']:.4f}" if "dopri5" in sc else "")
            + f"  ({seconds:.0f} s)")

    m, sec = train_ours(src, data, None, args.steps, seed, args)
    add("I-CFM (1-RF)", m, sec, args.steps)
    m, sec = train_ours(src, data, "exact-ot", args.steps, seed, args)
    add("OT-CFM", m, sec, args.steps)
    if not args.no_torchcfm:
        m, sec = train_torchcfm(src, data, args.steps, seed, args)
        add("torchcfm OT-CFM", m, sec, args.steps)

    def straighten(teacher_name: str, teacher, reflow_steps: int, distill_steps: int, base_budget: int,
                   prefix: str = "") -> None:
        t0 = time.perf_counter()
        rf = reflow(teacher, source=source_of(src), n_pairs=args.pairs, method="dopri5", train_steps=reflow_steps,
                    batch_size=args.batch, lr=args.lr, seed=seed + 1)
        add(f"{prefix}2-RF ← {teacher_name}", rf.model, time.perf_counter() - t0, base_budget + reflow_steps,
            reflow_steps=reflow_steps)
        t0 = time.perf_counter()
        pairs = generate_pairs(rf.model, source_of(src), args.pairs, method="dopri5",
                               generator=torch.Generator().manual_seed(seed + 2))
        ds = distill(rf.model, pairs=pairs, train_steps=distill_steps, batch_size=args.batch, lr=args.lr,
                     seed=seed + 3)
        add(f"{prefix}distilled ← 2-RF ← {teacher_name}", ds.model, time.perf_counter() - t0,
            base_budget + reflow_steps + distill_steps, settings=("1",), distill_steps=distill_steps)

    straighten("1-RF", models["I-CFM (1-RF)"], args.reflow_steps, args.distill_steps, args.steps)
    straighten("OT-CFM", models["OT-CFM"], args.reflow_steps, args.distill_steps, args.steps)
    if args.matched_train:
        rest = args.steps - args.matched_train
        m, sec = train_ours(src, data, "exact-ot", args.matched_train, seed, args)
        add(f"[{args.steps} total] OT-CFM {args.matched_train} steps", m, sec, args.matched_train)
        straighten(f"OT-CFM {args.matched_train}", m, rest // 2, rest - rest // 2, args.matched_train,
                   prefix=f"[{args.steps} total] ")
    return {"noise_floor_w2": floor, "noise_floor_energy": energy_distance(fresh, reference), "rows": rows}


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every (row, setting) W2."""
    out = {"noise_floor_w2": _ms([r["noise_floor_w2"] for r in per_seed]), "rows": {}}
    for name in per_seed[0]["rows"]:
        out["rows"][name] = {}
        for s in per_seed[0]["rows"][name]["scores"]:
            vals = [r["rows"][name]["scores"][s]["w2"] for r in per_seed if name in r["rows"]]
            nfes = [r["rows"][name]["scores"][s]["nfe"] for r in per_seed if name in r["rows"]]
            out["rows"][name][s] = {"w2": _ms(vals), "nfe": float(np.mean(nfes))}
        st = [r["rows"][name]["straightness"] for r in per_seed if r["rows"][name]["straightness"] is not None]
        out["rows"][name]["straightness"] = _ms(st) if st else None
        out["rows"][name]["budget_steps"] = per_seed[0]["rows"][name]["budget_steps"]
    return out


def _ms(v: list[float]) -> dict:
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def markdown(results: dict, args, command: str) -> str:
    lines = ["# Sample quality vs NFE (W2, exact OT, 2000 vs 2000; lower is better)", "",
             f"Protocol: torch threads 1, `mlp-selu` (3×64 SELU MLP), batch {args.batch}, Adam lr {args.lr:g} "
             f"(constant for I-CFM/OT-CFM/torchcfm; cosine-annealed for reflow/distillation), {args.steps} steps, "
             f"reflow on {args.pairs} dopri5 pairs for {args.reflow_steps} steps, distillation for "
             f"{args.distill_steps} steps; seeds {args.seeds}; exact-OT pairing: {args.coupling_impl}. Cells: mean ± std over seeds; dopri5 cells give the "
             "mean NFE in brackets. `budget` = total optimiser steps behind the row.", "",
             f"Reproduce: `{command}`", ""]
    for label, res in results["problems"].items():
        agg = res["aggregate"]
        fl = agg["noise_floor_w2"]
        lines += [f"## {label}", "", f"Noise floor (fresh vs fresh, n={args.n_eval}): W2 = {fl['mean']:.4f} ± {fl['std']:.4f}. "
                  f"Target W2 @ 1 step ≤ {TARGETS[label]:.2f}.", "",
                  "| model | budget | Euler 1 | Euler 4 | Euler 100 | dopri5 | straightness |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, row in agg["rows"].items():
            cells = []
            for s in SETTINGS:
                if s in row:
                    c = f"{row[s]['w2']['mean']:.3f} ± {row[s]['w2']['std']:.3f}"
                    if s == "dopri5":
                        c += f" ({row[s]['nfe']:.0f})"
                else:
                    c = "—"
                cells.append(c)
            st = row["straightness"]
            cells.append("—" if st is None else f"{st['mean']:.4f}")
            lines.append(f"| {name} | {row['budget_steps']} | " + " | ".join(cells) + " |")
        tc = agg["rows"].get("torchcfm OT-CFM", {}).get("1", {}).get("w2", {}).get("mean")
        lines.append("")
        for what, keep in (("any budget", lambda r: True),
                           (f"the same budget as torchcfm (≤ {args.steps} steps)",
                            lambda r: r["budget_steps"] <= args.steps)):
            cands = [(n, r["1"]["w2"]["mean"], r["budget_steps"]) for n, r in agg["rows"].items()
                     if keep(r) and not n.startswith("torchcfm")]
            if not cands:
                continue
            n, v, b = min(cands, key=lambda p: p[1])
            lines.append(f"- Best steerflow W2 @ 1 step at {what}: **{v:.3f}** ({n}, {b} steps); target ≤ "
                         f"{TARGETS[label]:.2f}: {'met' if v <= TARGETS[label] else 'NOT met'}.")
        if tc is not None:
            lines.append(f"- torchcfm OT-CFM @ 1 step: {tc:.3f} ({args.steps} steps).")
        lines.append("")
    lines += [f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{results['total_s'] / 60:.1f} min in total.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--reflow-steps", type=int, default=5000)
    p.add_argument("--distill-steps", type=int, default=5000)
    p.add_argument("--matched-train", type=int, default=2000,
                   help="OT-CFM steps of the budget-matched pipeline (0 disables it)")
    p.add_argument("--pairs", type=int, default=20000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-eval", type=int, default=2000)
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    p.add_argument("--no-torchcfm", action="store_true")
    p.add_argument("--coupling-impl", choices=("steerflow", "hungarian"), default="steerflow",
                   help="exact-OT pairing: steerflow.couplings' exact-ot, or this script's Hungarian solver")
    p.add_argument("--out", default=str(RESULTS / "quality"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    command = "python benchmarks/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    results = {"protocol": vars(args), "problems": {}}
    for label in args.problems:
        src, data = PROBLEMS[label]
        per_seed = [run_problem(label, src, data, seed, args) for seed in args.seeds]
        results["problems"][label] = {"per_seed": per_seed, "aggregate": aggregate(per_seed)}
    results["total_s"] = time.perf_counter() - t0
    results["command"] = command
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out.with_suffix(".json"))
    md = markdown(results, args, command)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"reproduce: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
