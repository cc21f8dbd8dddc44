"""Minibatch OT couplings: speed, uniqueness of pairs and optimality gap.

Source N(0, I) in 2-D against a two-moons-like target (sklearn-style, Gaussian noise 0.05), batch 32 / 128 / 256 /
1024 / 4096, one torch thread; steerflow's ExactOT and torchcfm are also timed against ``steerflow.data``'s moons
(torchcfm's scaling, uniform diagonal jitter: the data of the training benchmarks), which is harder for the auction.
Compares steerflow's ExactOT (default ``solver="auto"``: the compiled auction + Jonker–Volgenant solver;
``solver="emd"``, POT's network simplex called directly and run to optimality, the default where the C
extension is not built; and ``solver="auction-lsa"``, the path with neither), scipy's cold exact assignment,
steerflow's Sinkhorn coupling, and torchcfm 1.0.7's ``OTPlanSampler(method="exact").sample_plan`` (POT's
network simplex ``ot.emd``) when importable. The optimum is scipy's ``linear_sum_assignment`` on the same
float64 cost matrix.

    python benchmarks/bench_ot.py            # writes benchmarks/results/ot_coupling.{json,md}
    python benchmarks/bench_ot.py --quick    # 32 / 256 / 1024 only
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
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


def main(quick: bool = False) -> None:
    torch.set_num_threads(1)
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
    out = {"command": "python benchmarks/bench_ot.py" + (" --quick" if quick else ""), "torch_threads": 1,
           "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cpus, shared)".strip(),
           "load_average_at_end": os.getloadavg(), "torchcfm": torchcfm_note, "rows": rows, "speed_ratios": ratios}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "ot_coupling.json"), "w") as f:
        json.dump(out, f, indent=2)
    lines = ["# Minibatch OT couplings: N(0, I) → two moons, 2-D, one torch thread", "",
             f"Reproduce: `{out['command']}`. Machine: {out['machine']}, load average at end "
             f"{out['load_average_at_end'][0]:.1f} (timings shared with other jobs; compare within a row group).", "",
             "Optimality gap = (cost of the returned pairs) / (exact OT cost by scipy LSA) − 1. Unique pairs = "
             "distinct (x_0, x_1) pairs / batch; a permutation has 1.0. torchcfm's sample_plan re-draws both "
             "x_0 and x_1 from the plan with replacement, so neither batch marginal is kept and its sampled cost "
             "can fall below the OT cost (negative gap); 'plan gap' is its plan's own cost against the optimum.", "",
             "| batch | method | median ms | unique pairs | gap | notes |", "|---:|---|---:|---:|---:|---|"]
    for r in rows:
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
    for n, e in ratios.items():
        lines.append(f"- batch {n}: " + ", ".join(f"{k} = {v:.2f}" for k, v in e.items()))
    lines += ["", f"torchcfm: {torchcfm_note}"]
    with open(os.path.join(RESULTS, "ot_coupling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-len(ratios) - 3:]))
    print(f"wrote {RESULTS}/ot_coupling.json and .md; reproduce with: {out['command']}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
