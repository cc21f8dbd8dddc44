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

Distribution-matched one-step rows (``--rows matched``; :func:`steerflow.straighten.distill` with ``match=``):
the student is a copy of the OT-CFM teacher, sampled as one Euler step ``x_0 + v(x_0, 0)``, trained on
minibatches of the teacher's dopri5 pairs with the loss ``w_reg·|T(x_0) - x_1|² + λ·D²(T(x_0), y)`` against a
fresh batch ``y`` of ``--batch`` data points per step (``--match-reg`` = w_reg, λ = 1):

* ``matched[M] ← OT-CFM`` — teacher OT-CFM ``--steps`` steps, then ``--match-steps`` matching steps;
* ``[5000 total] matched[M] ← OT-CFM N`` — teacher ``--match-train`` = N steps, then ``--steps`` − N
  matching steps (the same number of optimiser steps *and* of data points as torchcfm's 5000 × 256);
* ``[5000 total] distilled → energy ← OT-CFM N`` — half the remaining steps regression only, then half
  energy distance only.

``M`` = ``energy`` (Székely's energy distance), ``ot-energy`` (OT-GAN's minibatch energy distance with the
exact W2² cost, halves of the generated and the data batch), ``ot-energy-full`` (the same with two generated
batches of ``--batch`` against one whole data batch: each matching step then draws 2 × ``--batch`` source points,
which cost no data) or ``ot-energy-nn`` (that plus a nearest-neighbour energy, ``steerflow.straighten.matching.
ot_nn_energy_loss``). ``--student-width W [--student-depth D]`` trains a fresh W×D MLP student instead of a copy
of the teacher (a third of the matching steps regress onto the teacher's pairs first); ``--student-arch
mlp-endpoint [--student-bounded]`` makes that student a :class:`steerflow.models.EndpointMLP` and
``--match-memory K`` compares with the last K data batches (``distill(match_memory=K)``). ``--rows matched``
alone computes only these rows and merges them into the existing JSON.
``--match-batch B`` (with ``--match-train 0`` for the any-budget row alone) uses B pairs and B data points
per matching step; those rows are named ``matched[M, batch B]`` and described apart (they use more data).

Every row is sampled with Euler 1 / 4 / 100 steps and adaptive dopri5 (rtol = atol = 1e-5) from the same
2000 source points. The noise floor is W2 between two fresh data sets of 2000.

Run (≈ 10 min per seed on one core)::

    python benchmarks/bench_quality.py --seeds 0 1 2 --coupling-impl hungarian --rows base
    python benchmarks/bench_quality.py --seeds 0 1 2 --coupling-impl hungarian --rows matched   # ≈ 6 min per seed and problem

writes (or, with only some ``--rows``, merges into) ``benchmarks/results/quality.json`` and rewrites
``quality.md`` from the merged JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shlex
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
from steerflow.straighten.matching import GENERATED_PER_DATA  # generated points per data point of each loss
from steerflow.training import train

PROBLEMS = {"N(0,I)→moons": ("gaussian", "moons"), "8gaussians→moons": ("8gaussians", "moons")}
SETTINGS = ("1", "4", "100", "dopri5")
TARGETS = {"N(0,I)→moons": 0.25, "8gaussians→moons": 0.40}
RESULTS = Path(__file__).resolve().parent / "results"
MATCH_ARGS = ("match_steps", "match_train", "match_lr", "match_reg", "match_losses")  # the matched rows' settings


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
                batch_size=args.batch, lr=args.lr, lr_schedule="constant", seed=seed, device="cpu", progress=False,
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
    x_0, reference, fresh = eval_sets(src, data, seed, args.n_eval)
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


def eval_sets(src: str, data: str, seed: int, n: int):
    g_eval = torch.Generator().manual_seed(10_000 + seed)
    x_0 = sample_toy(src, n, g_eval)
    reference = sample_toy(data, n, g_eval)
    fresh = sample_toy(data, n, g_eval)
    return x_0, reference, fresh


def teacher_pairs(teacher, src: str, seed: int, args):
    """The teacher's ``args.pairs`` dopri5 pairs from fresh source points (seeded by ``seed + 2``)."""
    return generate_pairs(teacher, source_of(src), args.pairs, method="dopri5",
                          generator=torch.Generator().manual_seed(seed + 2))


def student_config(args) -> dict:
    """``build_model`` arguments of the ``--student-width`` student: a velocity MLP, or with ``--student-arch
    mlp-endpoint`` an end-point-predicting MLP (one Euler step from 0 is the network's output, no identity
    skip; ``--student-bounded``: tanh last hidden layer)."""
    cfg = {"name": args.student_arch, "dim": 2, "hidden": args.student_width, "depth": args.student_depth}
    return cfg | ({"bounded": args.student_bounded} if args.student_arch == "mlp-endpoint" else {})


def student_tag(arch: str, width: int, depth: int, bounded: bool, memory: int = 1) -> str:
    """The row-name suffix of a fresh student (and of a data memory of ``memory`` batches)."""
    if arch == "mlp-endpoint":
        tag = f", end-point student {width}×{depth}" + (", bounded" if bounded else "")
    else:
        tag = f", student MLP {width}×{depth}"
    return tag + (f", memory {memory}" if memory > 1 else "")


def train_matched(teacher, pairs, data: str, loss: str, steps: int, seed: int, args, model=None,
                  regression_weight=None, sliced_weight: float = 0.0, sliced_memory: int = 16) -> torch.nn.Module:
    """One distribution-matched one-step student (the ``matched[M]`` rows): ``steps`` optimiser steps in all.

    The student is ``model``, else a fresh ``--student-width`` × ``--student-depth`` MLP (a third of the steps
    regress onto the teacher's ``pairs`` first), else a copy of the teacher; then :func:`distill` with
    ``match=loss`` against fresh batches of ``args.match_batch or args.batch`` data points per step (plus
    ``distill``'s sliced term when ``sliced_weight > 0``).
    """
    mb = args.match_batch or args.batch  # data points per matching step
    gen = GENERATED_PER_DATA.get(loss, 1) * args.match_memory
    if model is None and args.student_width:  # a fresh, wider student: regression warm start, then matching
        torch.manual_seed(seed)
        student = build_model(**student_config(args))
        warm = steps // 3
        model = distill(teacher, pairs=pairs, model=student, train_steps=warm, batch_size=mb, lr=args.match_lr,
                        seed=seed + 100).model
        steps -= warm
    return distill(teacher, pairs=pairs, model=model, train_steps=steps, batch_size=gen * mb, lr=args.match_lr,
                   seed=seed, match=loss, data=source_of(data), match_weight=1.0, match_batch_size=mb,
                   match_memory=args.match_memory, sliced_weight=sliced_weight, sliced_memory=sliced_memory,
                   regression_weight=args.match_reg if regression_weight is None else regression_weight).model


def run_matched(label: str, src: str, data: str, seed: int, args) -> dict:
    """The distribution-matched one-step rows (see the module docstring) for one problem and seed."""
    log = lambda s: print(f"[{label} seed {seed} matched] {s}", flush=True)  # noqa: E731
    x_0, reference, fresh = eval_sets(src, data, seed, args.n_eval)
    rows: dict[str, dict] = {}
    mb = args.match_batch or args.batch  # pairs and data points per matching step
    tag = "" if mb == args.batch else f", batch {mb}"
    if args.student_width:
        tag += student_tag(args.student_arch, args.student_width, args.student_depth, args.student_bounded,
                           args.match_memory)

    def add(name: str, model, seconds: float, budget: int, settings=("1",), **extra) -> None:
        sc = score(model, x_0, reference, settings)
        s_val = straightness(model, x_0[:1000], steps=64, method="rk4") if settings != ("1",) else None
        rows[name] = {"scores": sc, "train_s": seconds, "budget_steps": budget, "straightness": s_val, **extra}
        log(f"{name:<48} W2@1 {sc['1']['w2']:.4f}  ({seconds:.0f} s)")

    def matched(teacher, pairs, loss: str, steps: int, offset: int, model=None, regression_weight=None):
        return train_matched(teacher, pairs, data, loss, steps, seed + offset, args, model=model,
                             regression_weight=regression_weight)

    def pairs_of(teacher):
        return teacher_pairs(teacher, src, seed, args)

    def extra(teacher_steps: int, steps: int, loss: str) -> dict:
        return {"teacher_steps": teacher_steps, "match": loss, "match_steps": steps, "match_lr": args.match_lr,
                "match_reg": args.match_reg, "match_batch": mb, "generated_batch": GENERATED_PER_DATA.get(loss, 1) * args.match_memory * mb,
                "data_points": teacher_steps * args.batch + steps * mb}

    if args.match_steps:
        teacher, sec_t = train_ours(src, data, "exact-ot", args.steps, seed, args)
        pairs = pairs_of(teacher)
        for loss in args.match_losses:
            t0 = time.perf_counter()
            m = matched(teacher, pairs, loss, args.match_steps, 5)
            add(f"matched[{loss}{tag}] ← OT-CFM", m, sec_t + time.perf_counter() - t0, args.steps + args.match_steps,
                **extra(args.steps, args.match_steps, loss))
    if args.match_train:
        n_t, rest = args.match_train, args.steps - args.match_train
        teacher, sec_t = train_ours(src, data, "exact-ot", n_t, seed, args)
        if not args.student_width:  # (the student variants reuse this row from the main matched run)
            add(f"[{args.steps} total] OT-CFM {n_t} steps", teacher, sec_t, n_t, settings=SETTINGS,
                data_points=n_t * args.batch)
        pairs = pairs_of(teacher)
        for loss in args.match_losses:
            t0 = time.perf_counter()
            m = matched(teacher, pairs, loss, rest, 5)
            add(f"[{args.steps} total] matched[{loss}{tag}] ← OT-CFM {n_t}", m, sec_t + time.perf_counter() - t0,
                args.steps, **extra(n_t, rest, loss))
        if not args.student_width:
            t0 = time.perf_counter()
            half = rest // 2
            student = distill(teacher, pairs=pairs, train_steps=half, batch_size=mb, lr=args.match_lr,
                              seed=seed + 3).model
            m = matched(teacher, pairs, "energy", rest - half, 6, model=student, regression_weight=0.0)
            add(f"[{args.steps} total] distilled {half} → energy {rest - half}{tag} ← OT-CFM {n_t}", m,
                sec_t + time.perf_counter() - t0, args.steps,
                **{**extra(n_t, rest, "energy"), "match_reg": 0.0, "regression_steps": half})
    return {"noise_floor_w2": w2(fresh, reference), "noise_floor_energy": energy_distance(fresh, reference),
            "rows": rows}


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every (row, setting) W2."""
    out = {"noise_floor_w2": _ms([r["noise_floor_w2"] for r in per_seed]), "rows": {}}
    names = list(dict.fromkeys(n for r in per_seed for n in r["rows"]))  # first-seen order over seeds
    for name in names:
        have = [r["rows"][name] for r in per_seed if name in r["rows"]]
        out["rows"][name] = {}
        for s in have[0]["scores"]:
            out["rows"][name][s] = {"w2": _ms([h["scores"][s]["w2"] for h in have]),
                                    "nfe": float(np.mean([h["scores"][s]["nfe"] for h in have]))}
        st = [h["straightness"] for h in have if h["straightness"] is not None]
        out["rows"][name]["straightness"] = _ms(st) if st else None
        out["rows"][name]["budget_steps"] = have[0]["budget_steps"]
    return out


def _ms(v: list[float]) -> dict:
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def _perfect_generator_scores(seeds: list[int], n_eval: int) -> dict:
    """``bench_w2_noise.py``'s per-problem summary (what an exact sampler scores on the same evaluation sets),
    if it has been run with these ``seeds`` and ``n_eval``."""
    path = RESULTS / "w2_noise.json"
    if not path.exists():
        return {}
    noise = json.loads(path.read_text())
    return noise["problems"] if (noise["seeds"], noise["n_eval"]) == (list(seeds), n_eval) else {}


def target_verdict(mean: float, se: float, target: float) -> str:
    """Whether a many-draw mean meets ``W2 ≤ target``, judged at two standard errors."""
    if mean + 2 * se <= target:
        return "met"
    return "NOT met" if mean - 2 * se > target else "not resolved (within two standard errors)"


def _many_draw_scores(label: str) -> dict:
    """``bench_onestep.py``'s many-draw scores of the matched one-step rows of problem ``label``, if it has run."""
    path = RESULTS / "onestep.json"
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())["problems"].get(label, {}).get("summary")
    if summary is None:
        return {}
    return {n: {**r, "perfect": summary["perfect"]} for n, r in summary["rows"].items() if "matched" in n}


def markdown(results: dict) -> str:
    """The Markdown report, written from the (merged) results JSON alone."""
    pr = results["protocol"]
    base_cmd = results["command"] + ("" if "--rows" in results["command"] else " --rows base")
    lines = ["# Sample quality vs NFE (W2, exact OT, 2000 vs 2000; lower is better)", "",
             f"Protocol: torch threads 1, `mlp-selu` (3×64 SELU MLP), batch {pr['batch']}, Adam lr {pr['lr']:g} "
             f"(constant for I-CFM/OT-CFM/torchcfm; cosine-annealed for reflow/distillation), {pr['steps']} steps, "
             f"reflow on {pr['pairs']} dopri5 pairs for {pr['reflow_steps']} steps, distillation for "
             f"{pr['distill_steps']} steps; seeds {pr['seeds']}; exact-OT pairing: {pr['coupling_impl']}. Cells: mean ± std over seeds; dopri5 cells give the "
             "mean NFE in brackets. `budget` = total optimiser steps behind the row.", "",
             f"Reproduce: `{base_cmd}`", ""]
    mp = results.get("matched_protocol")
    if mp:
        lines += [f"Distribution-matched one-step rows (`matched[M]`): student = copy of the OT-CFM teacher, one Euler "
                  f"step `x_0 + v(x_0, 0)`, trained by `steerflow.straighten.distill(..., match=M, data=..., "
                  f"match_weight=1, regression_weight={mp['match_reg']:g})` on minibatches of {mp['pairs']} teacher "
                  f"dopri5 pairs, Adam lr {mp['match_lr']:g} cosine-annealed, each step drawing one fresh batch of "
                  f"{mp['batch']} data points for the matching term (so a row's data use is budget × {mp['batch']}, "
                  f"like torchcfm's {mp['steps']} × {pr['batch']}). `energy` = Székely's energy distance (unbiased, "
                  f"on the batch); `ot-energy` = OT-GAN's minibatch energy distance with the exact W2² cost "
                  f"(two halves of {mp['batch'] // 2}). `matched[M] ← OT-CFM`: teacher {mp['steps']} steps + "
                  f"{mp['match_steps']} matching steps; `[{mp['steps']} total] …`: teacher {mp['match_train']} + "
                  f"{mp['steps'] - mp['match_train']} steps. Seeds {mp['seeds']}.", "",
                  "Reproduce these rows: " + "; ".join(f"`{c}`" for c in
                                                      dict.fromkeys(results["matched_command"].values())), ""]
        for e in results.get("matched_extra", []):
            if e.get("student_width"):
                w, d = e["student_width"], e.get("student_depth", 3)
                arch, bounded = e.get("student_arch", "mlp"), e.get("student_bounded", False)
                memory = e.get("match_memory", 1)
                full = ""
                if {"ot-energy-full", "ot-energy-nn"} & set(e["match_losses"]):
                    b = e["match_batch"]
                    full = (f" `ot-energy-full` = `steerflow.straighten.matching.full_batch_ot_energy_loss`: each "
                            f"matching step draws {2 * b} generated points (two batches of {b}, `distill(batch_size="
                            f"{2 * b}, match_batch_size={b})`) against one whole data batch of {b}, "
                            f"`W(X_1, Y) + W(X_2, Y) − W(X_1, X_2)`, so every exact plan is between sets of {b} "
                            f"rather than {b // 2}; generated points cost no data, so the data use is unchanged.")
                    if "ot-energy-nn" in e["match_losses"]:
                        full += (" `ot-energy-nn` = `steerflow.straighten.matching.ot_nn_energy_loss`: the same plus "
                                 "the nearest-neighbour energy `½ Σ_k [h(X_k, Y) − h(X_k, sg X_other)]`, `h(A, B)` = "
                                 "mean over `a ∈ A` of the squared distance to the nearest `b ∈ B` (weight 1).")
                what = (f"a fresh MLP ({w} wide, {d} hidden layers, SiLU, sinusoidal time embedding)"
                        if arch == "mlp" else
                        "a fresh end-point MLP (`steerflow.models.EndpointMLP`: one Euler step from t = 0 is the "
                        f"network's output, no identity skip `x_0 + …`; {w} wide, {d} hidden layers"
                        + (", tanh last hidden layer" if bounded else "") + ")")
                if memory > 1:
                    full += (f" `memory {memory}`: the data side of every plan is the union of the last {memory} data "
                             f"batches (`distill(match_memory={memory})`; {memory}× larger plans and generated "
                             f"batches, the same fresh data per step).")
                lines += [f"Rows `…{student_tag(arch, w, d, bounded, memory)}`: the student is {what} instead of a copy of "
                          f"the teacher; of the matching steps a "
                          f"third regress onto the teacher's pairs (warm start), the rest use the matching term alone; "
                          f"same teacher settings, data use and budget as the rows without the suffix (the teacher is "
                          f"retrained in that run, so its draws of t may differ from the stored rows').{full} Seeds "
                          f"{e['seeds']}. "
                          f"Reproduce: `{e['command']}`", ""]
                continue
            lines += [f"Rows `matched[M, batch {e['match_batch']}]`: the same with {e['match_batch']} pairs and "
                      f"{e['match_batch']} data points per matching step (two halves of {e['match_batch'] // 2} for "
                      f"`ot-energy`), so their data use is teacher steps × {mp['batch']} + matching steps × "
                      f"{e['match_batch']} ({'more' if e['match_batch'] > mp['batch'] else 'less'} data than the same number "
                      f"of steps at batch {mp['batch']}); teacher {mp['steps']} + {e['match_steps']} matching steps; "
                      f"seeds {e['seeds']}. Reproduce: `{e['command']}`", ""]
    for label, res in results["problems"].items():
        agg = res["aggregate"]
        fl = agg["noise_floor_w2"]
        lines += [f"## {label}", "", f"Noise floor (fresh vs fresh, n={pr['n_eval']}): W2 = {fl['mean']:.4f} ± {fl['std']:.4f}. "
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
                           (f"the same budget as torchcfm (≤ {pr['steps']} steps)",
                            lambda r: r["budget_steps"] <= pr["steps"])):
            cands = [(n, r["1"]["w2"]["mean"], r["budget_steps"]) for n, r in agg["rows"].items()
                     if keep(r) and not n.startswith("torchcfm")]
            if not cands:
                continue
            n, v, b = min(cands, key=lambda p: p[1])
            line = (f"- Best steerflow W2 @ 1 step at {what}: **{v:.3f}** ({n}, {b} steps); target ≤ "
                    f"{TARGETS[label]:.2f}: {'met' if v <= TARGETS[label] else 'NOT met'} on these three sets")
            many = _many_draw_scores(label).get(n)
            if many is not None:  # the better estimate of the same quantity decides
                m, se = many["draws"]["mean"], many["draws"]["se"]
                line += (f"; on {many['draws']['n']} evaluation draws it scores {m:.3f} ± {se:.3f}: "
                         f"{target_verdict(m, se, TARGETS[label])}")
            lines.append(line + ".")
        if tc is not None:
            lines.append(f"- torchcfm OT-CFM @ 1 step: {tc:.3f} ({pr['steps']} steps).")
        noise = _perfect_generator_scores(pr["seeds"], pr["n_eval"]).get(label)
        if noise is not None:
            lines.append(f"- A *perfect* generator scores {noise['mean_of_seed_means']:.3f} ± {noise['std_of_3_seed_mean']:.3f} "
                         "(3-seed mean, spread from its own samples) on these evaluation sets "
                         "(`bench_w2_noise.py`, `w2_noise.md`); the best row above was picked among many "
                         "configurations scored on the same sets, so it is an optimistic estimate of its recipe.")
        for name, r in _many_draw_scores(label).items():
            lines.append(f"- On {r['draws']['n']} evaluation draws (`bench_onestep.py`, `onestep.md`): {name} "
                         f"{r['draws']['mean']:.3f} ± {r['draws']['se']:.3f} (standard error), a perfect sampler "
                         f"{r['perfect']['mean']:.3f} on the same references.")
        lines.append("")
    lines += [f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{results['total_s'] / 60:.1f} min in total"
              + (f" ({results['matched_total_s'] / 60:.1f} min for the matched rows)" if mp else "") + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rows", nargs="+", choices=("base", "matched"), default=["base", "matched"],
                   help="which rows to compute; rows not computed are kept from the existing --out JSON")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--reflow-steps", type=int, default=5000)
    p.add_argument("--distill-steps", type=int, default=5000)
    p.add_argument("--matched-train", type=int, default=2000,
                   help="OT-CFM steps of the budget-matched pipeline (0 disables it)")
    p.add_argument("--match-steps", type=int, default=10000,
                   help="matching steps after a --steps OT-CFM teacher (0 disables those rows)")
    p.add_argument("--match-train", type=int, default=2500,
                   help="teacher steps of the budget-matched distribution-matching rows (0 disables them)")
    p.add_argument("--match-lr", type=float, default=3e-3)
    p.add_argument("--match-reg", type=float, default=0.0, help="regression weight w_reg of the matched rows")
    p.add_argument("--match-batch", type=int, default=None,
                   help="pairs and data points per matching step (default --batch); rows get ', batch B' in the name "
                        "and their settings are kept apart from the main matched protocol")
    p.add_argument("--match-losses", nargs="+", default=["ot-energy", "energy"],
                   choices=("energy", "ot-energy", "ot-energy-full", "ot-energy-nn"))
    p.add_argument("--student-width", type=int, default=None,
                   help="instead of a copy of the teacher, a fresh MLP (W×3, sinusoidal time embedding) as the "
                        "one-step student: a third of the matching steps regress onto the teacher's pairs, the "
                        "rest match; rows get ', student MLP W×D' in the name and are described apart")
    p.add_argument("--student-depth", type=int, default=3, help="hidden layers D of the --student-width student")
    p.add_argument("--student-arch", choices=("mlp", "mlp-endpoint"), default="mlp",
                   help="the --student-width student: a velocity MLP (one step x_0 + v(x_0, 0)) or an end-point MLP "
                        "(one step = the network's output); rows get ', end-point student W×D'")
    p.add_argument("--student-bounded", action="store_true",
                   help="with --student-arch mlp-endpoint: tanh last hidden layer (bounded samples)")
    p.add_argument("--match-memory", type=int, default=1,
                   help="with --student-width: compare with the union of the last K data batches "
                        "(distill(match_memory=K)); rows get ', memory K'")
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
    if args.student_bounded and args.student_arch != "mlp-endpoint":
        p.error("--student-bounded needs --student-arch mlp-endpoint")
    if args.student_arch != "mlp" and not args.student_width:
        p.error("--student-arch needs --student-width")
    if args.match_memory != 1 and not args.student_width:
        p.error("--match-memory needs --student-width (the rows of the main matched protocol use no memory)")
    if args.match_train and not 0 < args.match_train < args.steps:
        p.error(f"--match-train must lie in (0, --steps={args.steps}), got {args.match_train}")
    torch.set_num_threads(1)
    command = "python benchmarks/bench_quality.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else None
    if "base" in args.rows or results is None:
        if "base" not in args.rows:
            p.error(f"no {out.with_suffix('.json')} to merge into: run with --rows base first")
        results = {"protocol": {k: v for k, v in vars(args).items() if k not in MATCH_ARGS}, "problems": {}}
        results["command"] = command
    t0 = time.perf_counter()
    for label in args.problems:
        src, data = PROBLEMS[label]
        prob = results["problems"].setdefault(label, {"per_seed": []})
        by_seed = {r.get("seed", s): r for s, r in zip(results["protocol"]["seeds"], prob["per_seed"])}
        for seed in args.seeds:
            if "base" in args.rows:
                by_seed[seed] = {"seed": seed, **run_problem(label, src, data, seed, args)}
            if "matched" in args.rows:
                if seed not in by_seed:
                    p.error(f"seed {seed} of {label} has no base rows in {out.with_suffix('.json')}")
                m = run_matched(label, src, data, seed, args)
                if abs(m["noise_floor_w2"] - by_seed[seed]["noise_floor_w2"]) > 1e-9:
                    raise RuntimeError(f"{label} seed {seed}: evaluation sets differ from the base run's")
                entry = copy.deepcopy(by_seed[seed])
                entry["seed"] = seed
                entry["rows"] = {n: r for n, r in entry["rows"].items() if n not in m["rows"]} | m["rows"]
                by_seed[seed] = entry
        order = list(dict.fromkeys(list(results["protocol"]["seeds"]) + list(args.seeds)))
        prob["per_seed"] = [by_seed[s] for s in order if s in by_seed]
        prob["aggregate"] = aggregate(prob["per_seed"])
    elapsed = time.perf_counter() - t0
    if "base" in args.rows:
        results["protocol"]["seeds"] = list(args.seeds)
        results["total_s"] = elapsed
    if "matched" in args.rows and (args.match_batch not in (None, args.batch) or args.student_width):
        key = (args.match_batch or args.batch, args.student_width, args.student_depth, args.student_arch,
               args.student_bounded, args.match_memory, sorted(args.match_losses))
        extra_runs = [e for e in results.get("matched_extra", [])
                      if (e["match_batch"], e.get("student_width"), e.get("student_depth", 3),
                          e.get("student_arch", "mlp"), e.get("student_bounded", False), e.get("match_memory", 1),
                          sorted(e["match_losses"])) != key]
        results["matched_extra"] = extra_runs + [{**{k: getattr(args, k) for k in MATCH_ARGS},
                                                   "match_batch": args.match_batch or args.batch,
                                                   "student_width": args.student_width,
                                                   "student_depth": args.student_depth,
                                                   "student_arch": args.student_arch,
                                                   "student_bounded": args.student_bounded,
                                                   "match_memory": args.match_memory, "problems": args.problems,
                                                   "seeds": list(args.seeds), "command": command,
                                                   "seconds": elapsed}]
    elif "matched" in args.rows:
        results["matched_protocol"] = {**{k: getattr(args, k) for k in MATCH_ARGS},
                                       "seeds": list(args.seeds), "batch": args.batch, "pairs": args.pairs,
                                       "steps": args.steps}
        # one entry per problem: the matched rows of different problems may come from separate runs
        cmds = results.get("matched_command")
        times = results.get("matched_seconds")
        if isinstance(cmds, str):  # written by an earlier version of this script: one run, its problems
            earlier = re.search(r"--problems (.+?)(?: --|$)", cmds)
            labels = shlex.split(earlier.group(1)) if earlier else list(results["problems"])
            cmds = {lb: cmds for lb in labels}
            times = {lb: results.get("matched_total_s", 0.0) / len(labels) for lb in labels}
        cmds = dict(cmds) if isinstance(cmds, dict) else {}
        times = dict(times) if isinstance(times, dict) else {}
        for label in args.problems:
            cmds[label] = command
            times[label] = elapsed / len(args.problems)
        results["matched_command"] = cmds
        results["matched_seconds"] = times
        results["matched_total_s"] = sum(times.values())
    write_results(results, out, markdown)
    print(f"reproduce: {command}")
    return 0


def write_results(results: dict, out: Path, markdown) -> None:
    """``out.json`` (atomically: a temporary file, then a rename) and ``out.md`` = ``markdown(results)``, printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out.with_suffix(".json"))
    md = markdown(results)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
