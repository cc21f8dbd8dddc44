"""Training-loop throughput: steerflow.training.train against a bare PyTorch loop and the reference
libraries, on torchcfm's 3×64 SELU MLP (N(0, I) → moons, Adam/AdamW 1e-3, one torch thread).

Loops timed (it/s, one optimiser step per iteration, batches drawn from a fixed 100k-point moons set):
  bare           ten lines of PyTorch (the floor)
  steerflow      steerflow.training.train(SeluMLP, data tensor, lr_schedule="constant", progress=False)
  flow_matching  flow_matching.path.AffineProbPath(CondOTScheduler()) + the same network
  torchcfm       torchcfm ConditionalFlowMatcher(sigma=0) + the same network
and, with an exact OT coupling at batch 256, steerflow (train with steerflow's ExactOT coupling) against
torchcfm's ExactOptimalTransportConditionalFlowMatcher, plus the bare loop calling steerflow's ExactOT
(to separate the coupling's cost from train()'s). Runs are interleaved (order rotated every round) and
repeated; medians and ratios to the bare loop are reported (the machine is shared, so single runs are
noisy). Writes benchmarks/results/train_throughput.{json,md}.

Run:  python benchmarks/bench_train.py            (full: 12 rounds)
      python benchmarks/bench_train.py --quick    (2 rounds, fewer steps)
      python benchmarks/bench_train.py --ot-only  (only the exact-OT group, merged into the saved results)
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

QUICK = "--quick" in sys.argv
OT_ONLY = "--ot-only" in sys.argv  # only the exact-OT group; merged into the existing results
ROUNDS = 2 if QUICK else 12
STEPS = {256: 300 if QUICK else 400, 4096: 40 if QUICK else 60}
OT_STEPS = 60 if QUICK else 150
WARMUP = 20
N_DATA = 100_000
OUT = Path(__file__).resolve().parent / "results"


def moons_data() -> torch.Tensor:
    from steerflow.data.toys import moons

    return moons(N_DATA, torch.Generator().manual_seed(0)).float()


DATA = moons_data()


def fresh_net():
    from steerflow.models import SeluMLP

    torch.manual_seed(0)
    return SeluMLP(2, width=64)


class Rate(tuple):
    """``(wall it/s, cpu it/s)``: CPU time (time.process_time, one torch thread) excludes the time this
    process waits for a core on a shared machine, so it is the steadier of the two."""


def timed(loop, steps: int) -> Rate:
    loop(WARMUP)
    w0, c0 = time.perf_counter(), time.process_time()
    loop(steps)
    return Rate((steps / (time.perf_counter() - w0), steps / (time.process_time() - c0)))


def bare(b: int, steps: int, coupling=None) -> Rate:
    """Ten lines of PyTorch; with ``coupling``, the same loop calling it (separates its cost from train()'s)."""
    net = fresh_net().net  # the plain nn.Sequential: no wrapper, no checks
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)

    def loop(n):
        for _ in range(n):
            x_1 = DATA[torch.randint(N_DATA, (b,), generator=g)]
            x_0 = torch.randn(x_1.shape, generator=g)
            if coupling is not None:
                x_0, x_1 = coupling(x_0, x_1)
            t = torch.rand(b, generator=g)
            x_t = t[:, None] * x_1 + (1 - t[:, None]) * x_0
            loss = ((net(torch.cat([x_t, t[:, None]], -1)) - (x_1 - x_0)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    return timed(loop, steps)


def steerflow_train(b: int, steps: int, coupling=None, workers: int = 0) -> Rate:
    from steerflow.training import train

    kw = dict(batch_size=b, lr=1e-3, lr_schedule="constant", progress=False, device="cpu", coupling=coupling,
              coupling_workers=workers)
    train(fresh_net(), DATA, steps=WARMUP, **kw)
    model = fresh_net()
    w0, c0 = time.perf_counter(), time.process_time()  # the whole call: setup, loop, log-step syncs
    train(model, DATA, steps=steps, **kw)
    return Rate((steps / (time.perf_counter() - w0), steps / (time.process_time() - c0)))


def flow_matching_loop(b: int, steps: int) -> Rate:
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler

    net = fresh_net().net
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    path = AffineProbPath(scheduler=CondOTScheduler())

    def loop(n):
        for _ in range(n):
            x_1 = DATA[torch.randint(N_DATA, (b,), generator=g)]
            x_0 = torch.randn(x_1.shape, generator=g)
            t = torch.rand(b, generator=g)
            ps = path.sample(t=t, x_0=x_0, x_1=x_1)
            loss = ((net(torch.cat([ps.x_t, t[:, None]], -1)) - ps.dx_t) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    return timed(loop, steps)


def torchcfm_loop(b: int, steps: int, exact_ot: bool = False) -> Rate:
    from torchcfm.conditional_flow_matching import (ConditionalFlowMatcher,
                                                    ExactOptimalTransportConditionalFlowMatcher)

    net = fresh_net().net
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    fm = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0) if exact_ot else ConditionalFlowMatcher(sigma=0.0)

    def loop(n):
        for _ in range(n):
            x_1 = DATA[torch.randint(N_DATA, (b,), generator=g)]
            x_0 = torch.randn(x_1.shape, generator=g)
            t, x_t, u_t = fm.sample_location_and_conditional_flow(x_0, x_1)
            loss = ((net(torch.cat([x_t, t[:, None]], -1)) - u_t) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    return timed(loop, steps)


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    runs: dict[str, dict[str, list]] = {str(b): {} for b in STEPS}
    methods = {"bare": bare, "steerflow": steerflow_train, "flow_matching": flow_matching_loop,
               "torchcfm": torchcfm_loop}
    from steerflow.couplings import ExactOT

    ot = ExactOT()
    ot_methods = {
        "torchcfm_exact_ot": lambda b, s: torchcfm_loop(b, s, exact_ot=True),
        "steerflow_exact_ot": lambda b, s: steerflow_train(b, s, coupling=ot),
        "bare_steerflow_exact_ot": lambda b, s: bare(b, s, coupling=ot),
        # the coupling of the next batch(es) in background threads while this step trains (uses a 2nd core)
        "steerflow_exact_ot_workers1": lambda b, s: steerflow_train(b, s, coupling=ot, workers=1),
        "steerflow_exact_ot_workers2": lambda b, s: steerflow_train(b, s, coupling=ot, workers=2),
    }
    runs["256_exact_ot"] = {}
    t_start = time.time()
    for r in range(ROUNDS):
        for b, steps in ({} if OT_ONLY else STEPS).items():
            names = list(methods)
            names = names[r % len(names):] + names[: r % len(names)]  # rotate the order every round
            for name in names:
                runs[str(b)].setdefault(name, []).append(methods[name](b, steps))
        names = list(ot_methods)
        names = names[r % len(names):] + names[: r % len(names)]
        for name in names:
            runs["256_exact_ot"].setdefault(name, []).append(ot_methods[name](256, OT_STEPS))
        print(f"round {r + 1}/{ROUNDS} done ({time.time() - t_start:.0f} s)", file=sys.stderr)

    old_path = OUT / "train_throughput.json"
    if OT_ONLY:
        if not old_path.exists():
            raise SystemExit("--ot-only merges into benchmarks/results/train_throughput.json: run the full benchmark first")
        old = json.loads(old_path.read_text())
        for key in STEPS:
            runs[str(key)] = {n: [Rate(v) for v in vals] for n, vals in old["runs"][str(key)].items()}
        runs["256_bare_for_ot"] = {"bare": [bare(256, STEPS[256]) for _ in range(ROUNDS)]}
    # ratio to the bare loop of the same round (same machine load), then the median over rounds
    summary: dict[str, dict[str, dict[str, float]]] = {}
    tcfm = runs["256_exact_ot"]["torchcfm_exact_ot"]
    for key, per in runs.items():
        summary[key] = {}
        bare_key = ("256_bare_for_ot" if OT_ONLY else "256") if key == "256_exact_ot" else key
        bare_runs = runs[bare_key]["bare"]
        for name, vals in per.items():
            summary[key][name] = {
                "median_it_s_wall": statistics.median(v[0] for v in vals),
                "median_it_s_cpu": statistics.median(v[1] for v in vals),
                "ratio_vs_bare_wall": statistics.median(v[0] / b_[0] for v, b_ in zip(vals, bare_runs)),
                "ratio_vs_bare_cpu": statistics.median(v[1] / b_[1] for v, b_ in zip(vals, bare_runs)),
                "min_it_s_wall": min(v[0] for v in vals), "max_it_s_wall": max(v[0] for v in vals)}
            if key == "256_exact_ot":  # wall clock: CPU time sums the coupling threads
                summary[key][name]["ratio_vs_torchcfm_ot_wall"] = statistics.median(
                    v[0] / c_[0] for v, c_ in zip(vals, tcfm))
    result = {
        "benchmark": "training-loop throughput, torchcfm 3x64 SELU MLP, N(0,I) -> moons",
        "command": "python benchmarks/bench_train.py" + (" --quick" if QUICK else "") + (" --ot-only" if OT_ONLY else ""),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "load_average": list(os.getloadavg()), "cpu_count": os.cpu_count(),
        "rounds": ROUNDS, "steps": STEPS, "ot_steps": OT_STEPS, "warmup_steps": WARMUP,
        "summary": summary, "runs": {k: {n: [list(v) for v in vals] for n, vals in per.items()} for k, per in runs.items()},
        "note": "each run: (wall it/s, CPU-time it/s). Ratios: per round against the bare loop of that round, "
                "median over rounds. Exact-OT rows are relative to the bare loop at batch 256 without OT. "
                "The machine is shared: CPU-time rates exclude waiting for a core and are the steadier figure.",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train_throughput.json").write_text(json.dumps(result, indent=1))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = ["# Training-loop throughput", "",
             f"torchcfm's 3×64 SELU MLP, N(0, I) → moons, Adam 1e-3, torch {torch.__version__}, 1 thread, "
             f"{ROUNDS} interleaved rounds; medians. it/s from CPU time (wall-clock in brackets); × bare = median "
             f"over rounds of the ratio to that round's bare loop (CPU time). Shared {os.cpu_count()}-core machine, "
             f"load average at the end: {load}.", "",
             "| loop | batch 256 it/s | × bare | batch 4096 it/s | × bare |", "|---|---|---|---|---|"]
    for name in methods:
        a, c = summary["256"][name], summary["4096"][name]
        lines.append(f"| {name} | {a['median_it_s_cpu']:.0f} ({a['median_it_s_wall']:.0f}) | {a['ratio_vs_bare_cpu']:.3f} | "
                     f"{c['median_it_s_cpu']:.0f} ({c['median_it_s_wall']:.0f}) | {c['ratio_vs_bare_cpu']:.3f} |")
    lines += ["", "Exact OT coupling, batch 256 (wall-clock it/s: the `workers` rows couple the next batches in "
              "background threads, so they use a second core and their CPU time sums both; × torchcfm = median "
              "over rounds of the wall-clock ratio to that round's torchcfm exact-OT run):", "",
              "| loop | it/s (wall) | it/s (CPU time) | × torchcfm exact-OT |", "|---|---|---|---|"]
    for name, s in summary["256_exact_ot"].items():
        lines.append(f"| {name} | {s['median_it_s_wall']:.0f} | {s['median_it_s_cpu']:.0f} | "
                     f"{s['ratio_vs_torchcfm_ot_wall']:.2f} |")
    lines += ["", f"Reproduce: `{result['command']}`", ""]
    (OUT / "train_throughput.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
