"""Steering methods against the exact Gaussian-mixture posterior (the "exact test bed").

A :class:`GaussianMixture` prior has an exact velocity ``v(x, t)`` and, under ``y = A x + N(0, σ² I)``, an exact
mixture posterior. Every method samples with ``steerflow.sample(mixture.velocity, x_0, steps=100,
guidance=...)`` (Euler) and is scored against exact posterior samples:

* ``ED``: squared energy distance ``D²`` (``steerflow.metrics.energy_distance``), 3000 samples per seed, 2 seeds;
* ``TV``: mode-weight total variation against the posterior mixture; ``trcov``: trace-covariance ratio;
* rows "exact samples" (noise floor: two independent exact sample sets) and "exact guided ODE"
  (:class:`ExactPosteriorGuidance`, the discretisation floor).

Problems (seeded, documented in the results file):

1. ``2d-bimodal``: ``w = (0.5, 0.5)``, ``μ = (−1, −1), (1, 1)``, ``Σ_k = [[0.25, 0.1], [0.1, 0.25]]``; observe
   ``x[0]`` (``Dense([[1, 0]])``), ``y = 0.4``, ``σ = 0.3`` (the posterior stays bimodal).
2. ``8d-dense``: an 8-D mixture of 5 components (seed 0: means ``N(0, I)``, covariances ``Q diag(λ) Qᵀ`` with
   ``λ ~ U(0.05, 0.4)``, weights ``∝ U(0.5, 1.5)``); ``A`` a random 3 × 8 Gaussian matrix / √8 (seed 1);
   ``y = A x* + σ ε`` with ``x*`` a prior draw (seed 2), ``σ = 0.3``.
3. ``8d-mask``: the same mixture; observe coordinates 0, 2, 4, 6 (``Mask``); ``y`` from seed 3; ``σ = 0.05``.

Each baseline's step size is tuned by a small geometric sweep on a separate tuning seed (800 samples);
the best value per problem is recorded (how the best step size moves across problems), and every method is
then evaluated at its tuned value and at its default. Wall time is measured on one thread.

Run: ``python benchmarks/bench_steering_exact.py`` (about 40 min on a busy core; ``--quick`` for a smoke run),
then ``python benchmarks/bench_steering_exact.py --timing`` (interleaved min-of-3 wall times, updates ``t×``).
Writes ``benchmarks/results/steering_exact.{json,md}``. ``--methods "steerflow default,EnKG"`` (a comma-separated
list of ``METHODS`` names; ``default`` is short for ``steerflow default``) re-runs only those methods and merges
their rows and sweeps into the existing JSON (the other rows are kept; the Markdown is rewritten from the merged
JSON); with ``--timing`` it re-times only those methods against fresh unguided runs.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from steerflow import Cost, sample
from steerflow.data.mixture import GaussianMixture
from steerflow.steering import (DDS, DPS, EnKG, ExactPosteriorGuidance, DFlow, Dreamguider, FlowChef, Lookahead,
                                OTODE, PnPFlow, SteerflowDefault)
from steerflow.steering.operators import Dense, Mask

QUICK = "--quick" in sys.argv
N_EVAL = 600 if QUICK else 3000
N_TUNE = 400 if QUICK else 800
SEEDS = (0, 1)
TUNE_SEED = 100
STEPS = 100
OUT = Path(__file__).parent / "results"


def _energy(x, y):
    try:
        from steerflow.metrics import energy_distance
    except ImportError:  # pragma: no cover - local fallback
        def energy_distance(a, b):
            return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())
    return float(energy_distance(x, y))


def _mode_tv(x, post):
    from steerflow.metrics import mode_weight_tv
    return float(mode_weight_tv(x, post))


def _trcov(x, ref):
    return float(x.var(0).sum() / ref.var(0).sum())


def problems() -> dict:
    g = torch.Generator().manual_seed(0)
    d, K = 8, 5
    means = torch.randn(K, d, generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(K, d, d, generator=g, dtype=torch.float64))[0]
    lam = 0.05 + 0.35 * torch.rand(K, d, generator=g, dtype=torch.float64)
    covs = Q @ torch.diag_embed(lam) @ Q.transpose(-1, -2)
    covs = 0.5 * (covs + covs.transpose(-1, -2))
    weights = 0.5 + torch.rand(K, generator=g, dtype=torch.float64)
    mix8 = GaussianMixture(weights, means, covs)

    mix2 = GaussianMixture([0.5, 0.5], [[-1.0, -1.0], [1.0, 1.0]], [[[0.25, 0.1], [0.1, 0.25]]] * 2)
    out = {"2d-bimodal": dict(mixture=mix2, op=Dense(torch.tensor([[1.0, 0.0]], dtype=torch.float64)),
                              y=torch.tensor([0.4], dtype=torch.float64), sigma=0.3)}
    A = torch.randn(3, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / math.sqrt(d)
    x_star = mix8.sample(1, torch.Generator().manual_seed(2))
    y = (x_star @ A.T)[0] + 0.3 * torch.randn(3, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    out["8d-dense"] = dict(mixture=mix8, op=Dense(A), y=y, sigma=0.3)
    mask = Mask.coordinates(d, [0, 2, 4, 6])
    x_star = mix8.sample(1, torch.Generator().manual_seed(3))
    y = mask(x_star)[0] + 0.05 * mask(torch.randn(1, d, generator=torch.Generator().manual_seed(13),
                                                  dtype=torch.float64))[0]
    out["8d-mask"] = dict(mixture=mix8, op=mask, y=y, sigma=0.05)
    for p in out.values():
        p["A"] = p["op"].matrix((p["mixture"].dim,))
        p["posterior"] = p["mixture"].posterior(p["A"], p["y"], p["sigma"])
    return out


# method name -> (factory(op, y, sigma, value), sweep values, default value, swept parameter)
def _geo(lo, hi, n):
    return [float(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)]


METHODS = {
    "DPS": (lambda op, y, s, a: DPS(op, y, s, scale=a), _geo(0.003, 0.3, 6), 0.05, "scale ζ"),
    "Lookahead(3)": (lambda op, y, s, a: Lookahead(op, y, s, k=3, scale=a), _geo(0.01, 0.3, 4), 0.05, "scale ζ"),
    "FlowChef": (lambda op, y, s, a: FlowChef(op, y, s, step_size=a), _geo(0.01, 1.0, 6), 0.1, "step s"),
    "Dreamguider": (lambda op, y, s, a: Dreamguider(op, y, s, scale=a), _geo(0.1, 3.0, 6), 0.5, "scale"),
    "EnKG": (lambda op, y, s, a: EnKG(op, y, s, scale=a), _geo(0.01, 1.0, 6), 0.05, "scale"),
    "DDS": (lambda op, y, s, a: DDS(op, y, s, gamma=a), [0.0, 0.1, 0.3, 1.0, 3.0, 10.0], 0.0, "γ"),
    "OT-ODE": (lambda op, y, s, a: OTODE(op, y, s, scale=a), _geo(0.25, 4.0, 5), 1.0, "scale"),
    "PnP-Flow": (lambda op, y, s, a: PnPFlow(op, y, s, step_size=a), _geo(0.1, 3.0, 6), 1.0, "γ"),
    "D-Flow": (lambda op, y, s, a: DFlow(op, y, s, reg=a, inner_steps=10, n_iter=10), [0.1, 1.0], 1.0, "λ"),
    "steerflow default": (lambda op, y, s, a: SteerflowDefault(op, y, s, scale=a), [0.5, 1.0, 1.5, 2.0, 3.0], 1.0,
                          "scale"),
}


def _selected_methods() -> list[str] | None:
    """The ``--methods a,b`` selection (names of ``METHODS``; ``default`` = ``steerflow default``), or None for all."""
    if "--methods" not in sys.argv:
        return None
    i = sys.argv.index("--methods")
    if i + 1 >= len(sys.argv):
        raise ValueError(f"--methods needs a comma-separated list of {sorted(METHODS)}")
    names = [("steerflow default" if n.strip() == "default" else n.strip()) for n in sys.argv[i + 1].split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or names!r}; expected names from {sorted(METHODS)} or 'default'")
    return names


def run(p, guidance, n, seed):
    x0 = torch.randn(n, p["mixture"].dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cost = Cost()
    with cost:
        x = sample(p["mixture"].velocity, x0, steps=STEPS, guidance=guidance,
                   generator=torch.Generator().manual_seed(seed + 7), cost=cost)
    return x.detach(), cost


def score(p, x, ref):
    return dict(ed=_energy(x, ref), tv=_mode_tv(x, p["posterior"]), trcov=_trcov(x, ref))


def evaluate(p, make, refs):
    rows, ess = [], []
    for seed in SEEDS:
        g = make()
        x, cost = run(p, g, N_EVAL, seed)
        rows.append({**score(p, x, refs[seed]), **cost.as_dict()})
        if getattr(g, "ess", None) is not None:  # methods that resample at t = 1 report their effective sample size
            ess.append(g.ess)
    out = {k: sum(r[k] for r in rows) / len(rows) for k in ("ed", "tv", "trcov", "nfe", "vjp", "operator_calls", "seconds")}
    if ess:
        out["ess"] = sum(ess) / len(ess)
    return out


def main():
    torch.set_num_threads(1)
    probs = problems()
    only = _selected_methods()
    tag = "_quick" if QUICK else ""
    if only is not None:
        return _rerun(probs, only, OUT / f"steering_exact{tag}.json")
    results = {"config": dict(n_eval=N_EVAL, n_tune=N_TUNE, seeds=list(SEEDS), tune_seed=TUNE_SEED, steps=STEPS,
                              solver="euler", metric="squared energy distance D² (steerflow.metrics.energy_distance)"),
               "problems": {}}
    for name, p in probs.items():
        t0 = time.perf_counter()
        post = p["posterior"]
        refs = {s: post.sample(N_EVAL, torch.Generator().manual_seed(1000 + s)) for s in SEEDS}
        tune_ref = post.sample(N_TUNE, torch.Generator().manual_seed(2000))
        rows = {}
        floor = [score(p, post.sample(N_EVAL, torch.Generator().manual_seed(3000 + s)), refs[s]) for s in SEEDS]
        rows["exact samples"] = {k: sum(f[k] for f in floor) / len(floor) for k in ("ed", "tv", "trcov")}
        rows["unguided"] = evaluate(p, lambda: None, refs)
        rows["exact guided ODE"] = evaluate(p, lambda: ExactPosteriorGuidance(p["mixture"], p["A"], p["y"], p["sigma"]), refs)
        sweeps = {}
        for mname in METHODS:
            _tune_and_evaluate(name, p, mname, refs, tune_ref, rows, sweeps)
        base = rows["unguided"]["seconds"]
        for r in rows.values():
            if "seconds" in r:
                r["time_ratio"] = r["seconds"] / base
        results["problems"][name] = dict(sigma=p["sigma"], rows=rows, sweeps=sweeps,
                                         y=p["y"].tolist(), A=p["A"].tolist())
        print(f"[{name}] done in {time.perf_counter() - t0:.0f}s", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"steering_exact{tag}.json").write_text(json.dumps(results, indent=1))
    (OUT / f"steering_exact{tag}.md").write_text(markdown(results))
    print(markdown(results))
    print(f"reproduce: python benchmarks/bench_steering_exact.py{' --quick' if QUICK else ''}")


def _tune_and_evaluate(name, p, mname, refs, tune_ref, rows, sweeps) -> None:
    """Sweep ``mname``'s parameter on the tuning seed, then evaluate it tuned and at its default into ``rows``."""
    factory, values, default, param = METHODS[mname]
    sw = []
    for a in values:
        try:
            x, _ = run(p, factory(p["op"], p["y"], p["sigma"], a), N_TUNE, TUNE_SEED)
            ed = _energy(x, tune_ref)
        except FloatingPointError:
            ed = float("inf")
        sw.append((a, ed))
    best = min(sw, key=lambda r: r[1])[0]
    sweeps[mname] = dict(param=param, sweep=sw, best=best, default=default)
    rows[f"{mname} (tuned)"] = {**evaluate(p, lambda: factory(p["op"], p["y"], p["sigma"], best), refs), "value": best}
    rows[f"{mname} (default)"] = (dict(rows[f"{mname} (tuned)"]) if best == default else
                                  {**evaluate(p, lambda: factory(p["op"], p["y"], p["sigma"], default), refs),
                                   "value": default})
    print(f"[{name}] {mname}: best {param}={best:.4g} ED tuned={rows[f'{mname} (tuned)']['ed']:.4f} "
          f"default={rows[f'{mname} (default)']['ed']:.4f}", flush=True)


def _rerun(probs, only, path) -> None:
    """Re-run the methods ``only`` and merge their rows and sweeps into the results at ``path``."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the full benchmark first (without --methods)")
    results = json.loads(path.read_text())
    for name, p in probs.items():
        t0 = time.perf_counter()
        post = p["posterior"]
        refs = {s: post.sample(N_EVAL, torch.Generator().manual_seed(1000 + s)) for s in SEEDS}
        tune_ref = post.sample(N_TUNE, torch.Generator().manual_seed(2000))
        res = results["problems"][name]
        rows, sweeps = res["rows"], res["sweeps"]
        for mname in only:
            _tune_and_evaluate(name, p, mname, refs, tune_ref, rows, sweeps)
            for k in ("tuned", "default"):  # single runs against the stored unguided time (noisy): re-time with --timing
                r = rows[f"{mname} ({k})"]
                r["time_ratio"] = r["seconds"] / rows["unguided"]["seconds"]
        print(f"[{name}] done in {time.perf_counter() - t0:.0f}s", flush=True)
    path.write_text(json.dumps(results, indent=1))
    path.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    print(f"reproduce: python benchmarks/bench_steering_exact.py{' --quick' if QUICK else ''} --methods "
          f"{','.join(only)!r} && python benchmarks/bench_steering_exact.py --timing --methods {','.join(only)!r}")


def markdown(results) -> str:
    names = list(results["problems"])
    lines = ["# Steering on the exact Gaussian-mixture test bed", "",
             f"Euler, {STEPS} steps; {results['config']['n_eval']} samples × {len(SEEDS)} seeds; ED = squared energy "
             "distance D² to exact posterior samples (lower is better), TV = mode-weight total variation, "
             "trcov = trace-covariance ratio (1 is right), t× = wall time / unguided wall time. Tuned = best value of "
             "a small sweep on a separate seed; default = the method's default value.", "",
             "| method | " + " | ".join(f"{n} ED / TV / trcov / t×" for n in names) + " | NFE / VJP / A-calls (8d-dense) |",
             "|---|" + "---|" * len(names) + "---|"]
    row_names = list(results["problems"][names[0]]["rows"])
    for rn in row_names:
        cells = []
        for n in names:
            r = results["problems"][n]["rows"][rn]
            tx = f"{r['time_ratio']:.2f}" if "time_ratio" in r else "–"
            cells.append(f"{r['ed']:.4f} / {r['tv']:.3f} / {r['trcov']:.2f} / {tx}")
        r = results["problems"]["8d-dense"]["rows"][rn]
        c = f"{r['nfe']:.0f} / {r['vjp']:.0f} / {r['operator_calls']:.0f}" if "nfe" in r else "–"
        lines.append(f"| {rn} | " + " | ".join(cells) + f" | {c} |")
    lines += ["", "Problems (seeded; see the module docstring): 2d-bimodal — two components at (±1, ±1), observe x[0], "
              "y = 0.4, σ = 0.3; 8d-dense — 5-component 8-D mixture, random 3×8 A, σ = 0.3; 8d-mask — same mixture, "
              "observe coordinates 0, 2, 4, 6, σ = 0.05.", ""]
    ess = {n: r["ess"] for n in names for k, r in results["problems"][n]["rows"].items()
           if k == "steerflow default (default)" and "ess" in r}
    if ess:
        lines += ["steerflow default reweights its particles and resamples them at t = 1 (the returned batch repeats "
                  "samples); mean effective sample size of the " + f"{results['config']['n_eval']} particles: "
                  + ", ".join(f"{n} {e:.0f}" for n, e in ess.items()) + ".", ""]
    lines += [f"Timing: {results['config'].get('timing', 'single runs on a shared machine (noisy)')}; a tuned row has "
              "its default's t× (same algorithm and work per step, only a coefficient differs).", "",
              "## How the best step size moves", "", "| method | param | default | " + " | ".join(names) + " |",
              "|---|---|---|" + "---|" * len(names)]
    for m in METHODS:
        sw = [results["problems"][n]["sweeps"][m] for n in names]
        lines.append(f"| {m} | {sw[0]['param']} | {sw[0]['default']:.4g} | " + " | ".join(f"{s['best']:.4g}" for s in sw) + " |")
    lines += ["", "## Best ED per problem", ""]
    for n in names:
        rows = {k: r for k, r in results["problems"][n]["rows"].items()
                if k not in ("exact samples", "exact guided ODE", "unguided")}
        order = sorted(rows, key=lambda k: rows[k]["ed"])[:4]
        lines.append(f"- {n}: " + ", ".join(f"{k} {rows[k]['ed']:.4f}" for k in order))
    return "\n".join(lines) + "\n"


def timing(repeats: int = 3):
    """Re-measure wall time: each method at its default, interleaved with unguided runs, min of ``repeats``.

    The machine is shared, so single timings are noisy; the minimum over interleaved repeats is the figure
    reported as ``t×`` (updates the JSON/Markdown written by ``main``).
    """
    torch.set_num_threads(1)
    path = OUT / "steering_exact.json"
    results = json.loads(path.read_text())
    probs = problems()
    only = _selected_methods()
    makers = {} if only else {"exact guided ODE": lambda p: ExactPosteriorGuidance(p["mixture"], p["A"], p["y"], p["sigma"])}
    for mname, (factory, _, default, _) in METHODS.items():
        if only is None or mname in only:
            makers[f"{mname} (default)"] = (lambda f, a: lambda p: f(p["op"], p["y"], p["sigma"], a))(factory, default)
    for name, p in probs.items():
        rows = results["problems"][name]["rows"]
        best = {k: float("inf") for k in ["unguided", *makers]}
        for _ in range(repeats):
            for k in best:
                _, cost = run(p, None if k == "unguided" else makers[k](p), N_EVAL, 0)
                best[k] = min(best[k], cost.seconds)
        for k, sec in best.items():
            if only is not None and k == "unguided":  # a partial re-timing leaves the reference row alone
                rows[k]["seconds_min_retimed"] = sec
                continue
            rows[k]["seconds_min"] = sec
            rows[k]["time_ratio"] = sec / best["unguided"]
            tuned = k.replace("(default)", "(tuned)")
            if tuned in rows and tuned != k:  # same algorithm and cost per step; only a coefficient differs
                rows[tuned]["time_ratio"] = rows[k]["time_ratio"]
        print(f"[{name}] " + ", ".join(f"{k}: {v / best['unguided']:.2f}x" for k, v in best.items()), flush=True)
    results["config"]["timing"] = f"t× = min over {repeats} interleaved runs / min of unguided (one thread)"
    if only is not None:
        results["config"]["timing"] += f"; rows of {', '.join(only)} re-timed later against their own unguided runs"
    path.write_text(json.dumps(results, indent=1))
    (OUT / "steering_exact.md").write_text(markdown(results))
    print("reproduce: python benchmarks/bench_steering_exact.py --timing"
          + (f" --methods {','.join(only)!r}" if only else ""))


if __name__ == "__main__":
    timing() if "--timing" in sys.argv else main()
