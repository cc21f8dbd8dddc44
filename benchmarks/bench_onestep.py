"""One-step W2 with an evaluation that resolves the target: many evaluation draws, a perfect sampler beside.

``bench_quality.py`` scores each trained model on one evaluation set per seed (2000 source points, 2000 data
points). On the two moons that single score is noisy: a *perfect* sampler's 3-seed mean on those sets is
0.231 ± 0.039 (``bench_w2_noise.py``) — the spread of the binomial moon counts — while the issue's target is
``W2@1 ≤ 0.25`` on N(0, I) → moons. This script trains the models that matter for that target with the same
recipes and seeds as ``quality.md`` and scores each one on the seed's stored evaluation set (the ``quality.md``
figure) **and** on ``--draws`` further independent evaluation sets per seed (fresh source points, fresh
reference data), where a perfect sampler (a fresh set of true data) is scored against the same references:

* ``OT-CFM`` — steerflow's ``train`` with exact minibatch OT, 5000 steps, one Euler step;
* ``torchcfm OT-CFM`` — torchcfm's ``ExactOptimalTransportConditionalFlowMatcher`` (same network, initial
  weights, optimiser and batches), 5000 steps, one Euler step (skipped where torchcfm is not installed);
* ``[5000 total] matched[ot-energy-full, student MLP 512×4] ← OT-CFM 2500`` — teacher OT-CFM 2500 steps, then
  a fresh 512×4 MLP student: 833 steps of regression onto the teacher's dopri5 pairs and 1667 steps of
  ``distill(match="ot-energy-full")`` against fresh data batches of 256 (``quality.md``'s row of that name);
* ``[5000 total] matched[ot-energy-full, end-point student 512×4, bounded] ← OT-CFM 2500`` — the same with a
  :class:`steerflow.models.EndpointMLP` student (one Euler step from 0 is the network's output, no identity
  skip; tanh last hidden layer), trained from the same teacher and pairs;
* ``[5000 total] matched[ot-energy-full, student MLP 512×4, memory 2] ← OT-CFM 2500`` — the first student with
  ``distill(match_memory=2)``: every plan's data side is the union of the last two data batches of 256 (plans
  of 512, generated batches of 2 × 512), still 256 fresh data points per step.
* ``[5000 total] matched[ot-energy-nn, student MLP 512×4] ← OT-CFM 2500`` and ``[…, end-point student 512×4,
  bounded] …`` — the first two students trained with ``distill(match="ot-energy-nn")``: the same OT term plus the
  nearest-neighbour energy (``steerflow.straighten.matching.ot_nn_energy_loss``), which pulls points left between
  the moons onto the data.
* ``[5000 total] matched[ot-energy-nn, end-point student 512×4, bounded, sliced 1 × 16 batches] ← OT-CFM 1000``
  — a shorter teacher (1000 OT-CFM steps; the student gets 4000: 1333 of regression, 2667 of matching) and
  ``distill(match="ot-energy-nn", sliced_weight=1.0)``: the sliced W2² against the last 16 data batches (4096
  points, no extra data) corrects how densely each stretch of the moons is covered.

``--only-matched NAME …`` trains only those matched rows (skipping OT-CFM and torchcfm) and merges them into the
stored per-seed results of that problem (or, where ``--out`` holds none for it, stores them alone).

Per row it reports the mean W2@1 over the ``3 × draws`` sets with its standard error, and the mean paired
difference to the perfect sampler on the same reference sets (the model's excess over sampling noise).

Run (≈ 45 min per problem on one core for all rows — the three commands that built the stored results took
46–48 min per problem in all; the two problems can run as two processes)::

    python benchmarks/bench_onestep.py
    python benchmarks/bench_onestep.py --problems 'N(0,I)→moons'

writes (merging by problem into) ``benchmarks/results/onestep.{json,md}``. ``--draws 40 --seeds … --out …`` runs
the finer protocol of ``onestep_draws40`` / ``onestep_heldout*``; ``--pool A.json B.json … --out X`` trains nothing
and pools stored runs over disjoint seeds into ``X.{json,md}`` (``onestep_pooled``: seeds 0–9, 400 sets;
``onestep_pooled20``: seeds 0–19, 800 sets).
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import (PROBLEMS, TARGETS, eval_sets, student_tag, target_verdict, teacher_pairs,  # noqa: E402
                           train_matched, train_ours, train_torchcfm, write_results)

from steerflow.metrics import w2  # noqa: E402
from steerflow.solvers import sample  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
class Student(NamedTuple):
    """A matched row: the student (``--student-arch``, ``--student-bounded``), ``distill``'s ``match_memory``,
    matching loss, ``sliced_weight`` and ``sliced_memory``, and the teacher's OT-CFM steps (the student gets the
    rest of 5000)."""

    arch: str
    bounded: bool
    memory: int
    loss: str
    teacher: int = 2500
    sliced: float = 0.0
    sliced_memory: int = 16


STUDENTS = {"mlp": Student("mlp", False, 1, "ot-energy-full"),
            "endpoint": Student("mlp-endpoint", True, 1, "ot-energy-full"),
            "mlp-memory2": Student("mlp", False, 2, "ot-energy-full"),
            "mlp-nn": Student("mlp", False, 1, "ot-energy-nn"),
            "endpoint-nn": Student("mlp-endpoint", True, 1, "ot-energy-nn"),
            "endpoint-nn-sliced": Student("mlp-endpoint", True, 1, "ot-energy-nn", teacher=1000, sliced=1.0)}


def matched_name(st: Student) -> str:
    sliced = f", sliced {st.sliced:g} × {st.sliced_memory} batches" if st.sliced else ""
    return (f"[5000 total] matched[{st.loss}{student_tag(st.arch, 512, 4, st.bounded, st.memory)}{sliced}] "
            f"← OT-CFM {st.teacher}")


def draw_seed(seed: int, k: int) -> int:
    """Evaluation seed of draw ``k`` of training seed ``seed`` (never the stored set's seed, ``seed`` itself)."""
    return seed + 1000 * (k + 1)


@torch.no_grad()
def one_step_w2(model, x_0: torch.Tensor, reference: torch.Tensor) -> float:
    return w2(sample(model, x_0, steps=1, method="euler"), reference)


def models_for(label: str, src: str, data: str, seed: int, args):
    """Yield ``(row name, trained model, training seconds)`` for one problem and seed."""
    if not args.only_matched:
        m, sec = train_ours(src, data, "exact-ot", args.steps, seed, args)
        yield "OT-CFM", m, sec
    if not args.no_torchcfm and not args.only_matched:
        try:
            m, sec = train_torchcfm(src, data, args.steps, seed, args)
        except ImportError:
            print("torchcfm is not installed: its row is skipped", flush=True)
        else:
            yield "torchcfm OT-CFM", m, sec
    teachers = {}  # OT-CFM steps -> (teacher, its dopri5 pairs, seconds): one teacher per length
    for key, st in STUDENTS.items():
        if args.only_matched and key not in args.only_matched:
            continue
        if st.teacher not in teachers:
            teacher, sec = train_ours(src, data, "exact-ot", st.teacher, seed, args)
            t0 = time.perf_counter()
            teachers[st.teacher] = teacher, teacher_pairs(teacher, src, seed, args), sec + time.perf_counter() - t0
        teacher, pairs, sec = teachers[st.teacher]
        t0 = time.perf_counter()
        args.student_arch, args.student_bounded, args.match_memory = st.arch, st.bounded, st.memory
        student = train_matched(teacher, pairs, data, st.loss, args.steps - st.teacher, seed + 5, args,
                                sliced_weight=st.sliced, sliced_memory=st.sliced_memory)
        yield matched_name(st), student, sec + time.perf_counter() - t0


def run(label: str, src: str, data: str, seed: int, args) -> dict:
    x_0, reference, _ = eval_sets(src, data, seed, args.n_eval)
    draws = [eval_sets(src, data, draw_seed(seed, k), args.n_eval) for k in range(args.draws)]
    perfect = [w2(fresh, ref) for _, ref, fresh in draws]
    rows = {}
    for name, model, sec in models_for(label, src, data, seed, args):
        t0 = time.perf_counter()
        rows[name] = {"stored_set": one_step_w2(model, x_0, reference),
                      "draws": [one_step_w2(model, xk, rk) for xk, rk, _ in draws], "train_s": sec}
        r = rows[name]
        print(f"[{label} seed {seed}] {name:<40} stored {r['stored_set']:.4f}  draws {np.mean(r['draws']):.4f} "
              f"(perfect {np.mean(perfect):.4f}; {sec:.0f} s + {time.perf_counter() - t0:.0f} s scoring)", flush=True)
    return {"seed": seed, "perfect_draws": perfect, "rows": rows}


def summarise(per_seed: list[dict]) -> dict:
    perfect = np.concatenate([s["perfect_draws"] for s in per_seed])
    out = {"perfect": _mse(perfect), "rows": {}}
    for name in dict.fromkeys(n for s in per_seed for n in s["rows"]):
        have = [s for s in per_seed if name in s["rows"]]
        stored = np.array([s["rows"][name]["stored_set"] for s in have])
        vals = np.concatenate([s["rows"][name]["draws"] for s in have])
        per_seed_excess = [np.array(s["rows"][name]["draws"]) - np.array(s["perfect_draws"]) for s in have]
        excess = np.concatenate(per_seed_excess)
        out["rows"][name] = {"stored_sets": {"mean": float(stored.mean()),
                                             "std": float(stored.std(ddof=1)) if stored.size > 1 else 0.0},
                             "draws": _mse(vals), "excess": _mse(excess), "seeds": [s["seed"] for s in have],
                             "excess_per_seed": [float(e.mean()) for e in per_seed_excess],
                             # each trained model counted once: the spread between training seeds
                             "seed_level": _mse(np.array([np.mean(s["rows"][name]["draws"]) for s in have]))}
    return out


def _mse(v: np.ndarray) -> dict:
    """Mean, standard error and count of a sample."""
    return {"mean": float(np.mean(v)), "se": float(np.std(v, ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0,
            "n": int(v.size)}


def markdown(results: dict) -> str:
    lines = ["# One-step W2 on many evaluation draws (exact OT, 2000 vs 2000; lower is better)", "",
             "Each trained model is scored by one Euler step on the seed's stored evaluation set (the figure "
             "`quality.md` shows) and on further independent evaluation sets per seed (fresh source points and "
             "fresh reference data); a perfect sampler — a fresh set of true data — is scored against the same "
             "references. `excess` = the model's W2 minus the perfect sampler's on the same reference set, "
             "averaged. ± = standard error of the mean over draws (the stored-set column: std over seeds); the verdicts "
             "also count each trained model once (mean of the per-seed means, ± over training seeds).", ""]
    for label, res in results["problems"].items():
        s = res["summary"]
        pr = res["protocol"]
        n = s["perfect"]["n"]
        lines += [f"## {label}", "",
                  f"Seeds {pr['seeds']}, {pr['draws']} draws per seed ({n} evaluation sets). Reproduce: "
                  + "; then ".join(f"`{c}`" for c in res["commands"]) + f" ({res['seconds'] / 60:.1f} min).", "",
                  f"| model | W2@1, stored sets ({len(pr['seeds'])}) | W2@1, {n} draws | excess over perfect | "
                  f"excess per seed ({', '.join(map(str, pr['seeds']))}) |",
                  "|---|---:|---:|---:|---|"]
        for name, r in s["rows"].items():
            by_seed = dict(zip(r["seeds"], r["excess_per_seed"]))
            per = [f"{by_seed[seed]:+.3f}" if seed in by_seed else "—" for seed in pr["seeds"]]
            # a row trained on fewer seeds than the table's (pooled runs) says its own counts
            k_of = f" ({len(r['seeds'])} seeds)" if len(r["seeds"]) != len(pr["seeds"]) else ""
            n_of = f" ({r['draws']['n']})" if r["draws"]["n"] != n else ""
            lines.append(f"| {name} | {r['stored_sets']['mean']:.3f} ± {r['stored_sets']['std']:.3f}{k_of} | "
                         f"{r['draws']['mean']:.3f} ± {r['draws']['se']:.3f}{n_of} | "
                         f"{r['excess']['mean']:+.3f} ± {r['excess']['se']:.3f} | {' / '.join(per)} |")
        p = s["perfect"]
        lines.append(f"| perfect sampler (true data) | — | {p['mean']:.3f} ± {p['se']:.3f} | 0 | |")
        lines.append("")
        for name in (matched_name(st) for st in STUDENTS.values()):
            if name not in s["rows"]:
                continue
            r = s["rows"][name]
            v, se, sl = r["draws"]["mean"], r["draws"]["se"], r["seed_level"]
            perfect = np.concatenate([q["perfect_draws"] for q in res["per_seed"] if q["seed"] in r["seeds"]])
            lines.append(f"- `{name}`: target W2@1 ≤ {TARGETS[label]:.2f} on the {r['draws']['n']} draws: {v:.3f} ± "
                         f"{se:.3f} → {target_verdict(v, se, TARGETS[label])}; counting each of the {sl['n']} trained "
                         f"models once (± over training seeds): {sl['mean']:.3f} ± {sl['se']:.3f} → "
                         f"{target_verdict(sl['mean'], sl['se'], TARGETS[label])}; a perfect sampler scores "
                         f"{perfect.mean():.3f} on the same references.")
        lines.append("")
    lines += [f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}.", ""]
    return "\n".join(lines)


def pool(paths: list[str], out: Path) -> int:
    """Pool stored runs over disjoint seeds (same draws per seed) into one result per problem."""
    pooled: dict[str, dict] = {}
    for path in paths:
        for label, res in json.loads(Path(path).read_text())["problems"].items():
            if label not in pooled:
                pooled[label] = {"protocol": dict(res["protocol"]), "per_seed": [], "commands": [], "seconds": 0.0}
            acc = pooled[label]
            if res["protocol"]["draws"] != acc["protocol"]["draws"]:
                raise SystemExit(f"{path}: {label} has {res['protocol']['draws']} draws per seed, the runs before "
                                 f"it {acc['protocol']['draws']}: pool runs of one protocol")
            seen = {s["seed"] for s in acc["per_seed"]}
            if seen & set(res["protocol"]["seeds"]):
                raise SystemExit(f"{path}: {label} repeats seeds {sorted(seen & set(res['protocol']['seeds']))}")
            acc["per_seed"] += res["per_seed"]
            acc["commands"] += res["commands"]
            acc["seconds"] += res["seconds"]
    for acc in pooled.values():
        acc["protocol"]["seeds"] = [s["seed"] for s in acc["per_seed"]]
        acc["summary"] = summarise(acc["per_seed"])
    write_results({"problems": pooled}, out, markdown)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--draws", type=int, default=10, help="further evaluation sets per seed")
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    p.add_argument("--no-torchcfm", action="store_true")
    p.add_argument("--only-matched", nargs="+", choices=list(STUDENTS), default=None,
                   help="train only these matched rows and merge them into the stored results of each problem")
    p.add_argument("--out", default=str(RESULTS / "onestep"))
    p.add_argument("--pool", nargs="+", default=None, metavar="JSON",
                   help="train nothing: pool the per-seed results of these stored runs (disjoint seeds, the same "
                        "--draws) problem by problem, and write them to --out (one file: rewrite its table)")
    args = p.parse_args(argv)
    if args.pool:
        return pool(args.pool, Path(args.out))
    if args.draws < 2:
        p.error(f"--draws must be >= 2, got {args.draws}")
    # quality.md's protocol and the settings of its 512×4 matched row
    args.steps, args.batch, args.lr, args.n_eval, args.pairs = 5000, 256, 1e-3, 2000, 20000
    args.coupling_impl, args.match_lr, args.match_reg = "hungarian", 3e-3, 0.0  # teacher steps: see STUDENTS
    args.match_batch, args.student_width, args.student_depth = None, 512, 4  # student_arch: see STUDENTS
    torch.set_num_threads(1)
    command = "python benchmarks/bench_onestep.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    path = out.with_suffix(".json")
    stored = json.loads(path.read_text())["problems"] if path.is_file() else {}
    problems = {}
    for label in args.problems:
        src, data = PROBLEMS[label]
        old = stored.get(label)
        if args.only_matched and old is not None and old["protocol"] != {"seeds": args.seeds, "draws": args.draws}:
            p.error(f"--only-matched merges into stored results of {label} with the same --seeds and --draws "
                    f"(stored: {old['protocol']}); pass those, or another --out")
        t0 = time.perf_counter()
        per_seed = [run(label, src, data, seed, args) for seed in args.seeds]
        seconds, commands = time.perf_counter() - t0, [command]
        if args.only_matched and old is not None:  # the same evaluation sets: add (or replace) these rows
            for new, prev in zip(per_seed, old["per_seed"]):
                prev["rows"].update(new["rows"])
            per_seed = old["per_seed"]
            seconds += old["seconds"]
            commands = old.get("commands", [old.get("command")]) + commands
        problems[label] = {"protocol": {"seeds": args.seeds, "draws": args.draws}, "per_seed": per_seed,
                           "summary": summarise(per_seed), "commands": commands, "seconds": seconds}
    results = json.loads(path.read_text()) if path.is_file() else {"problems": {}}  # other problems are kept
    results["problems"].update(problems)
    results["problems"] = {lb: results["problems"][lb] for lb in PROBLEMS if lb in results["problems"]}
    write_results(results, out, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
