"""Minibatch OT couplings: speed, uniqueness of pairs and optimality gap.

Two sections, both on one torch thread.

``moons``: source N(0, I) in 2-D against a two-moons-like target (sklearn-style, Gaussian noise 0.05), batch 32 / 128 /
256 / 1024 / 4096; steerflow's ExactOT and torchcfm are also timed against ``steerflow.data``'s moons (torchcfm's
scaling, uniform diagonal jitter: the data of the training benchmarks), which is harder for the auction.
Compares steerflow's ExactOT (default ``solver="auto"``: the compiled auction + Jonker–Volgenant solver;
``solver="emd"``, POT's network simplex called directly and run to optimality, the default where the C
extension is not built; and ``solver="auction-lsa"``, the path with neither), scipy's cold exact assignment,
steerflow's Sinkhorn coupling, and torchcfm 1.0.7's ``OTPlanSampler(method="exact").sample_plan`` (POT's
network simplex ``ot.emd``) when importable. The optimum is scipy's ``linear_sum_assignment`` on the same
float64 cost matrix.

``pot``: ``ExactOT().indices(x_0, x_1)`` (input checks, costs and solve) against POT's ``ot.emd(a, b, M)`` run to
optimality (``numItermax = max(1e5, 1000 n)``) on a cost matrix ``M`` handed to it ready-made (float64, explicit
differences): POT's solver alone, a comparison that favours POT. Input classes: N(0, I) → moons at every size from
2 to 4096; degenerate batches (x_0 = x_1 with its duplicates; integer coordinates on the 8 × 8 grid, with many tied
costs and duplicated points; all points equal); batches far from the origin (a common offset of 1e8 in 2-D, 1e6 in
784-D); tiny and huge scales (moons × 1e-8, × 1e8). The two calls alternate in blocks of about 20 ms (or one call)
so that the shared machine's load falls on both alike; each time is the median over the blocks. The gap is against
scipy's exact assignment on the explicit-difference costs (n ≤ 1024; above, against POT's optimal plan); "POT
pipeline gap" is POT's own route, ``ot.emd`` on ``ot.dist`` (the expanded ``|a|² + |b|² − 2 a·b``), whose costs
cancel far from the origin.

    python benchmarks/bench_ot.py                    # both sections: writes benchmarks/results/ot_coupling.{json,md}
    python benchmarks/bench_ot.py --quick            # fewer sizes
    python benchmarks/bench_ot.py --section pot      # one section; the other's stored results are kept
    python benchmarks/bench_ot.py --section pot --results /tmp/before   # elsewhere (e.g. to time another checkout)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from steerflow.couplings import ExactOT, Sinkhorn, cost_matrix
from steerflow.data.toys import moons as steerflow_moons

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def moons(n: int, generator: torch.Generator) -> torch.Tensor:
    """Two interleaved half circles with Gaussian noise 0.05, centred and scaled by 2 (like sklearn's)."""
    n1 = n // 2
    t1 = torch.rand(n1, generator=generator) * math.pi
    t2 = torch.rand(n - n1, generator=generator) * math.pi
    upper = torch.stack([torch.cos(t1), torch.sin(t1)], 1)
    lower = torch.stack([1 - torch.cos(t2), 0.5 - torch.sin(t2)], 1)
    x = torch.cat([upper, lower]) + 0.05 * torch.randn(n, 2, generator=generator)
    return (x - torch.tensor([0.5, 0.25])) * 2


def _optimum(x_0: torch.Tensor, x_1: torch.Tensor) -> tuple[np.ndarray, float]:
    """The squared-Euclidean cost matrix (float64 numpy) and its exact optimal total (scipy)."""
    C = cost_matrix("sqeuclidean", x_0, x_1).numpy()
    r, c = linear_sum_assignment(C)
    return C, float(C[r, c].sum())


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, times, out


def moons_section(quick: bool) -> dict:
    """The ``moons`` section: every coupling and solver on N(0, I) → moons (see the module docstring)."""
    sizes = [32, 256, 1024] if quick else [32, 128, 256, 1024, 4096]
    repeats = {32: 101, 128: 51, 256: 7, 1024: 5, 4096: 3}
    try:
        from torchcfm.optimal_transport import OTPlanSampler
        torchcfm_note = "torchcfm.optimal_transport.OTPlanSampler(method='exact').sample_plan (POT ot.emd)"
    except Exception as e:  # noqa: BLE001 — any import failure means "not available"
        OTPlanSampler = None
        torchcfm_note = f"torchcfm not importable ({type(e).__name__}: {e}); skipped"
    rows = []
    for n in sizes:
        first = len(rows)
        g = torch.Generator().manual_seed(n)
        x_0 = torch.randn(n, 2, generator=g)
        x_1 = moons(n, g)
        C = cost_matrix("sqeuclidean", x_0, x_1)
        Cn = C.numpy()
        t0 = time.perf_counter()
        r, c = linear_sum_assignment(Cn)
        lsa_ms = (time.perf_counter() - t0) * 1e3
        opt = float(Cn[r, c].sum())

        def ours_row(name, fn, reps, C=Cn, best=opt):
            ms, times, sigma = timed(fn, reps)
            total = float(C[sigma.numpy(), np.arange(n)].sum())
            return {"n": n, "method": name, "ms_median": ms, "ms_all": [t * 1e3 for t in times],
                    "unique_pairs": len(set(sigma.tolist())) / n, "gap_rel": total / best - 1.0}

        exact = ExactOT()
        rows.append(ours_row("steerflow ExactOT() (auto: compiled auction + JV)", lambda: exact.indices(x_0, x_1),
                             repeats[n]))
        simplex = ExactOT(solver="emd")
        rows.append(ours_row("steerflow ExactOT(solver='emd') (no C extension)", lambda: simplex.indices(x_0, x_1),
                             repeats[n]))
        auction = ExactOT(solver="auction-lsa")
        rows.append(ours_row("steerflow ExactOT(solver='auction-lsa') (no C, no POT)", lambda: auction.indices(x_0, x_1),
                             repeats[n]))
        rows.append({"n": n, "method": "scipy linear_sum_assignment (cold, float64, 1 run)", "ms_median": lsa_ms,
                     "ms_all": [lsa_ms], "unique_pairs": 1.0, "gap_rel": 0.0})
        sk = Sinkhorn(reg=0.05, check_every=10)
        row = ours_row("steerflow Sinkhorn(reg=0.05), sampled", lambda: sk.indices(x_0, x_1, generator=g), repeats[n])
        row.update(iterations=int(sk.last_result.n_iter), converged=bool(sk.last_result.converged))
        rows.append(row)
        # steerflow's own moons too (the training benchmarks' data: its uniform diagonal jitter leaves thin, nearly
        # one-dimensional stretches, which cost the auction more than the Gaussian-noise moons above)
        y_1 = steerflow_moons(n, g).float()
        targets = [("", x_1, Cn, opt), (", steerflow.data moons", y_1, *_optimum(x_0, y_1))]
        exact_y = ours_row("steerflow ExactOT() (auto), steerflow.data moons", lambda: exact.indices(x_0, y_1),
                           repeats[n], C=targets[1][2], best=targets[1][3])
        rows.append(exact_y)
        if OTPlanSampler is not None:
            sampler = OTPlanSampler(method="exact")
            for tag, target, C_t, opt_t in targets:
                caught: list = []

                def run_cfm(target=target, caught=caught):
                    with warnings.catch_warnings(record=True) as w:
                        warnings.simplefilter("always")
                        pi = sampler.get_map(x_0, target)
                        i, j = sampler.sample_map(pi, n, replace=True)
                    caught.extend(str(m.message) for m in w)
                    return pi, i, j

                ms, times, (pi, i, j) = timed(run_cfm, repeats[n])
                rows.append({"n": n, "method": "torchcfm OTPlanSampler('exact').sample_plan" + tag, "ms_median": ms,
                             "ms_all": [t * 1e3 for t in times],
                             "unique_pairs": len(set(zip(i.tolist(), j.tolist()))) / n,
                             "gap_rel": float(C_t[i, j].sum()) / opt_t - 1.0,
                             "plan_gap_rel": float((pi * C_t).sum()) * n / opt_t - 1.0,
                             "warnings": sorted(set(caught))})
        for row in rows[first:]:
            print(f"n={n:5d} {row['method']:48s} {row['ms_median']:10.1f} ms  unique {row['unique_pairs']:.3f}  "
                  f"gap {row['gap_rel']:+.2e}", flush=True)
    ratios = {}
    for n in sizes:
        ours = next(r for r in rows if r["n"] == n and r["method"].startswith("steerflow ExactOT() (auto"))
        lsa = next(r for r in rows if r["n"] == n and r["method"].startswith("scipy"))
        simplex = next(r for r in rows if r["n"] == n and "solver='emd'" in r["method"])
        entry = {"scipy_lsa_over_ours": lsa["ms_median"] / ours["ms_median"],
                 "network_simplex_over_ours": simplex["ms_median"] / ours["ms_median"]}
        cfm = [r for r in rows if r["n"] == n and r["method"] == "torchcfm OTPlanSampler('exact').sample_plan"]
        if cfm:
            entry["torchcfm_over_ours"] = cfm[0]["ms_median"] / ours["ms_median"]
        ours_y = next(r for r in rows if r["n"] == n and r["method"].endswith("(auto), steerflow.data moons"))
        cfm_y = [r for r in rows if r["n"] == n and r["method"].startswith("torchcfm") and r["method"].endswith("moons")]
        if cfm_y:
            entry["torchcfm_over_ours_steerflow_moons"] = cfm_y[0]["ms_median"] / ours_y["ms_median"]
        ratios[str(n)] = entry
    return {"torchcfm": torchcfm_note, "rows": rows, "speed_ratios": ratios}


def render_moons(sec: dict) -> list[str]:
    lines = ["## N(0, I) → two moons, 2-D: every coupling and solver", "",
             "Optimality gap = (cost of the returned pairs) / (exact OT cost by scipy LSA) − 1. Unique pairs = "
             "distinct (x_0, x_1) pairs / batch; a permutation has 1.0. torchcfm's sample_plan re-draws both "
             "x_0 and x_1 from the plan with replacement, so neither batch marginal is kept and its sampled cost "
             "can fall below the OT cost (negative gap); 'plan gap' is its plan's own cost against the optimum.", "",
             "| batch | method | median ms | unique pairs | gap | notes |", "|---:|---|---:|---:|---:|---|"]
    for r in sec["rows"]:
        notes = []
        if "iterations" in r:
            notes.append(f"{r['iterations']} it, converged={r['converged']}")
        if "plan_gap_rel" in r:
            notes.append(f"plan gap {r['plan_gap_rel']:+.1e}")
        if r.get("warnings"):
            notes.append("warns: " + "; ".join(w[:60] for w in r["warnings"]))
        lines.append(f"| {r['n']} | {r['method']} | {r['ms_median']:.{2 if r['ms_median'] < 10 else 1}f} | {r['unique_pairs']:.3f} | "
                     f"{r['gap_rel']:+.1e} | {' '.join(notes)} |")
    lines += ["", "Speed ratios (time of the other / time of steerflow ExactOT; > 1 means ours is faster):", ""]
    for n, e in sec["speed_ratios"].items():
        lines.append(f"- batch {n}: " + ", ".join(f"{k} = {v:.2f}" for k, v in e.items()))
    lines += ["", f"torchcfm: {sec['torchcfm']}"]
    return lines


# --- ExactOT against POT's network simplex, by input class ------------------------------------------------------
def _pot_inputs(kind: str, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch pair of an input class (float32 like training data; float64 where float32 could not hold it)."""
    if kind == "moons":
        return torch.randn(n, 2, generator=g), moons(n, g)
    if kind == "x0 = x1":
        x = torch.randn(n, 2, generator=g)
        return x, x.clone()
    if kind == "integer grid {0..7}²":
        return (torch.randint(0, 8, (n, 2), generator=g).float(), torch.randint(0, 8, (n, 2), generator=g).float())
    if kind == "all points equal":
        return torch.ones(n, 2), torch.ones(n, 2)
    if kind == "offset 1e8, 2-D":
        return torch.randn(n, 2, generator=g, dtype=torch.float64) + 1e8, moons(n, g).double() + 1e8
    if kind == "offset 1e6, 784-D":
        x_0 = torch.randn(n, 784, generator=g, dtype=torch.float64)
        return x_0 + 1e6, 0.5 * torch.randn(n, 784, generator=g, dtype=torch.float64) + 0.3 + 1e6
    if kind.startswith("moons × "):
        scale = float(kind.split("× ")[1])
        return torch.randn(n, 2, generator=g, dtype=torch.float64) * scale, moons(n, g).double() * scale
    raise ValueError(kind)


POT_CLASSES = {  # class: (sizes, quick sizes)
    "moons": ([2, 3, 7, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096], [2, 7, 32, 64, 256, 1024]),
    "x0 = x1": ([7, 64, 256, 1024, 4096], [64, 256]),
    "integer grid {0..7}²": ([7, 64, 256, 1024, 4096], [64, 256]),
    "all points equal": ([7, 64, 256, 1024, 4096], [64, 256]),
    "offset 1e8, 2-D": ([64, 256, 1024], [256]),
    "offset 1e6, 784-D": ([64, 256], [64]),
    "moons × 1e-8": ([256, 1024], [256]),
    "moons × 1e8": ([256, 1024], [256]),
}


def interleaved(fns, block_s: float = 0.02, blocks: int = 9, budget_s: float = 20.0) -> list[list[float]]:
    """Per-call seconds of each ``fns[k]()``, one figure per block: the functions alternate block by block (the
    order flipping each round), a block being as many calls as fill ``block_s`` (at least one); ``blocks`` rounds,
    fewer (at least three) when a round takes more than ``budget_s / blocks``."""
    calls = []
    for fn in fns:
        t0 = time.perf_counter()
        fn()
        calls.append(max(1, int(block_s / max(time.perf_counter() - t0, 1e-7))))
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for r in range(blocks):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for k in order:
            t0 = time.perf_counter()
            for _ in range(calls[k]):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / calls[k])
        if r >= 2 and time.perf_counter() - start > budget_s * (r + 1) / blocks:
            break
    return times


def pot_section(quick: bool) -> dict:
    """The ``pot`` section (see the module docstring)."""
    import ot

    exact = ExactOT()
    rows = []
    for kind, (sizes, quick_sizes) in POT_CLASSES.items():
        for n in quick_sizes if quick else sizes:
            g = torch.Generator().manual_seed(n)
            x_0, x_1 = _pot_inputs(kind, n, g)
            a, b = (x.double().reshape(n, -1).numpy() for x in (x_0, x_1))
            # explicit differences (no cancellation), row by row in high dimension to bound memory
            M = np.stack([((a[i] - b) ** 2).sum(-1) for i in range(n)])
            # scaled by a power of two (exact) to a largest entry in [0.5, 1): POT's pivoting tolerances are
            # absolute, and at the scale 1e-8 its simplex stops far from the optimum on the raw costs
            M_pot = np.ldexp(M, -math.frexp(float(M.max()))[1])
            w = np.full(n, 1.0 / n)
            iters = max(100_000, 1000 * n)

            def pot(M_pot=M_pot, w=w, iters=iters):
                return ot.emd(w, w, M_pot, numItermax=iters)

            def pot_pipeline(a=a, b=b, w=w, iters=iters):
                return ot.emd(w, w, ot.dist(a, b), numItermax=iters)

            t_ours, t_pot, t_pipe = interleaved([lambda: exact.indices(x_0, x_1), pot, pot_pipeline])
            sigma = exact.indices(x_0, x_1).numpy()
            ours_total = float(M[sigma, np.arange(n)].sum())
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                P = pot()
                pipe_total = float((pot_pipeline() * M).sum()) * n
            pot_total = float((P * M).sum()) * n
            if n <= 1024:
                r, c = linear_sum_assignment(M)
                best, ref = float(M[r, c].sum()), "scipy"
            else:
                best, ref = pot_total, "POT"

            def gap(total, best=best):
                return total / best - 1.0 if best > 0 else total

            row = {"class": kind, "n": n, "ours_ms": statistics.median(t_ours) * 1e3,
                   "pot_ms": statistics.median(t_pot) * 1e3, "pot_pipeline_ms": statistics.median(t_pipe) * 1e3,
                   "ours_ms_blocks": [t * 1e3 for t in t_ours], "pot_ms_blocks": [t * 1e3 for t in t_pot],
                   "pot_pipeline_ms_blocks": [t * 1e3 for t in t_pipe], "blocks": len(t_ours), "reference": ref,
                   "ours_gap": gap(ours_total), "pot_gap": gap(pot_total), "pot_pipeline_gap": gap(pipe_total),
                   "pot_warnings": sorted({str(m.message)[:80] for m in caught})}
            row["pot_over_ours"] = row["pot_ms"] / row["ours_ms"]
            row["pot_pipeline_over_ours"] = row["pot_pipeline_ms"] / row["ours_ms"]
            rows.append(row)
            print(f"{kind:22s} n={n:5d} ours {row['ours_ms']:10.3f} ms  POT emd {row['pot_ms']:10.3f} ms "
                  f"({row['pot_over_ours']:5.2f}x)  POT dist+emd {row['pot_pipeline_ms']:10.3f} ms "
                  f"({row['pot_pipeline_over_ours']:5.2f}x)  gap ours {row['ours_gap']:+.1e} POT {row['pot_gap']:+.1e} "
                  f"POT pipeline {row['pot_pipeline_gap']:+.1e}", flush=True)
    return {"pot_version": ot.__version__, "rows": rows}


def render_pot(sec: dict) -> list[str]:
    rows = sec["rows"]
    low_dim = [r for r in rows if "784" not in r["class"]]
    optimal_route = [r for r in rows if r["pot_pipeline_gap"] <= 1e-9]
    slowest = min(rows, key=lambda r: r["pot_over_ours"])
    off_route = [r for r in rows if r["pot_pipeline_gap"] > 1e-9]
    off_note = "" if not off_route else (
        f"; elsewhere ({'; '.join(dict.fromkeys(r['class'] for r in off_route))}) it stops at plans with relative gaps "
        f"{min(r['pot_pipeline_gap'] for r in off_route):.1e} to {max(r['pot_pipeline_gap'] for r in off_route):.1e}")
    lines = ["## ExactOT against POT's network simplex, by input class", "",
             f"`ExactOT().indices(x_0, x_1)` (checks, costs and solve) against POT {sec['pot_version']}'s "
             "`ot.emd(a, b, M, numItermax=max(1e5, 1000 n))` on a ready-made float64 cost matrix (its solver alone; "
             "`M` from explicit differences, scaled by a power of two to a largest entry below 1) and against POT's "
             "own route `ot.emd(a, b, ot.dist(x_0, x_1))` (costs by the expanded form, which cancel far from the "
             "origin). Median per-call time over alternating blocks; a ratio > 1 means ExactOT is faster. Gaps are "
             "relative to the exact optimum on explicit-difference costs (scipy; above 1024 points POT's optimal "
             "plan); with a zero optimum the absolute excess is shown.", "",
             f"Slowest ratio to POT's solver alone: **{min(r['pot_over_ours'] for r in low_dim):.2f}** over the "
             f"2-D rows, {slowest['pot_over_ours']:.2f} over all rows ({slowest['class']}, batch {slowest['n']}; "
             "ExactOT's time includes forming the costs, which POT is handed); slowest ratio to POT's route where "
             f"that route is optimal: **{min(r['pot_pipeline_over_ours'] for r in optimal_route):.2f}**{off_note}.",
             "",
             "| inputs | batch | ExactOT ms | POT emd ms (ratio) | POT dist+emd ms (ratio) | ExactOT gap | POT gap | "
             "POT route gap |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        warn = " (POT warns: " + "; ".join(r["pot_warnings"]) + ")" if r["pot_warnings"] else ""
        lines.append(f"| {r['class']} | {r['n']} | {_ms(r['ours_ms'])} | {_ms(r['pot_ms'])} ({r['pot_over_ours']:.2f}) "
                     "| "
                     f"{_ms(r['pot_pipeline_ms'])} ({r['pot_pipeline_over_ours']:.2f}) | {r['ours_gap']:+.1e} | "
                     f"{r['pot_gap']:+.1e} | {r['pot_pipeline_gap']:+.1e}{warn} |")
    return lines


def _ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


SECTIONS = {"moons": (moons_section, render_moons), "pot": (pot_section, render_pot)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--section", choices=["all", *SECTIONS], default="all")
    parser.add_argument("--results", default=RESULTS, help="folder for ot_coupling.{json,md}")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite ot_coupling.md from the stored ot_coupling.json (no timing)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    path = os.path.join(args.results, "ot_coupling.json")
    if args.render:
        with open(path) as f:
            write_markdown(json.load(f), args.results)
        return
    out = {}
    if args.section != "all" and os.path.exists(path):
        with open(path) as f:
            out = json.load(f)
    out.setdefault("sections", {})
    command = "python benchmarks/bench_ot.py" + (" --quick" if args.quick else "") + (
        f" --section {args.section}" if args.section != "all" else "")
    for name, (run, _) in SECTIONS.items():
        if args.section in ("all", name):
            out["sections"][name] = run(args.quick) | {
                "command": command, "load_average_at_end": os.getloadavg(),
                "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cpus, shared)".strip()}
    out["torch_threads"] = 1
    os.makedirs(args.results, exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    write_markdown(out, args.results)


def write_markdown(out: dict, folder: str) -> None:
    """``ot_coupling.md``: each section's table, rendered from the results."""
    lines = ["# Minibatch OT couplings, one torch thread", ""]
    for name, (_, render) in SECTIONS.items():
        sec = out["sections"].get(name)
        if sec is None:
            continue
        body = render(sec)
        lines += body[:1] + ["", f"Reproduce: `{sec.get('command', 'python benchmarks/bench_ot.py')}`. Machine: "
                                 f"{sec.get('machine', '?')}, load average at end "
                                 f"{sec.get('load_average_at_end', [float('nan')])[0]:.1f} (timings shared with other "
                                 "jobs; compare within a row group)."] + body[1:] + [""]
    with open(os.path.join(folder, "ot_coupling.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {folder}/ot_coupling.md")


if __name__ == "__main__":
    main()
