"""``steerflow demo``: the whole straightening story on a 2-D problem, in a few minutes on a laptop CPU.

1. **1-RF** — flow matching with the independent coupling (I-CFM; Liu et al. 2022, Lipman et al. 2023);
2. **OT-CFM** — the same with minibatch exact-OT pairs (Tong et al. 2024; Pooladian et al. 2023);
3. **2-RF** — reflow of the 1-RF on its own ODE pairs (Liu et al. 2022, §2.2);
4. **distilled** — a one-step generator ``x_1 = x_0 + v(x_0, 0)`` regressed on the 2-RF's pairs (§2.3);
5. **matched** — the OT-CFM's one Euler step trained against fresh data batches with a minibatch-OT energy
   distance (``distill(..., match="ot-energy")``): a one-step model not capped by its teacher's error.

Each model is sampled with 1, 2, 4 and 8 Euler steps and with adaptive dopri5, and scored against fresh
data by the exact W2 distance and the energy distance. Everything is embedded (toy densities drawn in
torch), nothing is downloaded. Writes ``results.md``, ``results.json`` and PNG figures into ``--out``.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from . import _common as C
from .main import Command, register

NFE_SETTINGS = ("1", "2", "4", "8", "dopri5")
ONE_STEP = ("distilled", "matched")  # one-step generators: scored at one Euler step only


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo (``full`` by default, ``quick`` for a seconds-long smoke run)."""

    source: str = "8gaussians"
    data: str = "moons"
    width: int = 64
    train_steps: int = 5000
    reflow_steps: int = 5000
    distill_steps: int = 5000
    batch: int = 256
    lr: float = 1e-3
    n_pairs: int = 10000
    n_eval: int = 2000
    n_traj: int = 128
    pair_method: str = "dopri5"
    pair_steps: int = 32
    straightness_steps: int = 32
    tol: float = 1e-4
    seed: int = 0

    @classmethod
    def quick(cls, **kw) -> "DemoConfig":
        return cls(train_steps=100, reflow_steps=100, distill_steps=100, n_pairs=1000, n_eval=256, n_traj=48,
                   pair_method="rk4", pair_steps=16, straightness_steps=16, tol=1e-3, **kw)


def _train(model, data_name: str, source, coupling: str, cfg: DemoConfig, seed: int):
    from ..data import load_dataset
    from ..training import train

    coupling = None if coupling == "independent" else coupling
    res = train(model, load_dataset(data_name), source=source, coupling=coupling, path="linear",
                steps=cfg.train_steps, batch_size=cfg.batch, lr=cfg.lr, seed=seed, device="cpu", progress=False,
                coupling_workers=C.coupling_workers(None, coupling))
    return res.model.eval(), res.losses.tolist()


def run_demo(cfg: DemoConfig, out: Path, log: Callable[[str], None] = print) -> dict:
    """Train, straighten and evaluate the four models; write the table and figures into ``out``."""
    from ..data import sample_toy
    from ..metrics import energy_distance, straightness, transport_cost, w2
    from ..models import build_model
    from ..plotting import plot_losses, plot_metric_vs_nfe, plot_nfe_grid, plot_trajectories
    from ..solvers import sample
    from ..straighten import distill, generate_pairs, one_step, reflow
    from .evaluate import markdown_table, score_settings

    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def source(n, generator=None):
        return sample_toy(cfg.source, n, generator)

    def tick(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        log(f"  {name:<10} {timings[name]:6.1f} s")

    log(f"steerflow demo: {cfg.source} → {cfg.data}, 3×{cfg.width} SELU MLP, batch {cfg.batch}, "
        f"{cfg.train_steps} steps per model")
    torch.manual_seed(cfg.seed)
    models: dict[str, torch.nn.Module] = {}
    losses: dict[str, list[float]] = {}

    t0 = time.perf_counter()
    models["1-RF"], losses["1-RF"] = _train(build_model("mlp-selu", dim=2, width=cfg.width), cfg.data, source,
                                            "independent", cfg, cfg.seed)
    tick("1-RF", t0)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    models["OT-CFM"], losses["OT-CFM"] = _train(build_model("mlp-selu", dim=2, width=cfg.width), cfg.data, source,
                                                "exact-ot", cfg, cfg.seed + 1)
    tick("OT-CFM", t0)

    pair_steps = None if cfg.pair_method == "dopri5" else cfg.pair_steps
    t0 = time.perf_counter()
    rf = reflow(models["1-RF"], source=source, n_pairs=cfg.n_pairs, steps=pair_steps, method=cfg.pair_method,
                train_steps=cfg.reflow_steps, batch_size=cfg.batch, lr=cfg.lr, seed=cfg.seed + 2)
    models["2-RF"] = rf.model
    losses["2-RF (reflow)"] = list(rf.losses)
    tick("2-RF", t0)

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed + 3)
    pairs_2rf = generate_pairs(models["2-RF"], source, cfg.n_pairs, steps=pair_steps, method=cfg.pair_method,
                               generator=g)
    ds = distill(models["2-RF"], pairs=pairs_2rf, train_steps=cfg.distill_steps, batch_size=cfg.batch, lr=cfg.lr,
                 seed=cfg.seed + 4)
    models["distilled"] = ds.model
    losses["distilled (regression)"] = list(ds.fit.losses)
    tick("distill", t0)

    t0 = time.perf_counter()
    mt = distill(models["OT-CFM"], source=source, n_pairs=cfg.n_pairs, train_steps=cfg.distill_steps,
                 batch_size=cfg.batch, lr=3 * cfg.lr, seed=cfg.seed + 6, match="ot-energy", regression_weight=0.0,
                 data=lambda n, generator=None: sample_toy(cfg.data, n, generator))
    models["matched"] = mt.model
    losses["matched (minibatch-OT energy)"] = list(mt.fit.losses)
    tick("matched", t0)

    # --- evaluation: the same x_0 for every model, fresh data as the reference ---------------------
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed + 1000)
    x_0 = source(cfg.n_eval, g)
    reference = sample_toy(cfg.data, cfg.n_eval, g)
    fresh = sample_toy(cfg.data, cfg.n_eval, g)
    floor = {"w2": w2(fresh, reference), "energy": energy_distance(fresh, reference)}
    scores, samples, straight, cost = {}, {}, {}, {}
    x_traj = x_0[:cfg.n_traj]
    trajectories = {}
    with torch.no_grad():
        for name, m in models.items():
            settings = ("1",) if name in ONE_STEP else NFE_SETTINGS
            xs: dict = {}
            sc = score_settings(m, x_0, reference, settings, atol=cfg.tol, rtol=cfg.tol, samples_out=xs)
            scores[name] = {s.setting: s for s in sc}
            samples[name] = {("dopri5" if s == "dopri5" else f"NFE {s}"): x for s, x in xs.items()}
            if name in ONE_STEP:
                x_end = one_step(m, x_0)
                straight[name] = 0.0  # one Euler step is a straight line by construction
                traj = torch.stack([x_traj, one_step(m, x_traj)])
            else:
                x_end = xs["dopri5"]
                straight[name] = straightness(m, x_0[:500], steps=cfg.straightness_steps, method="rk4")
                traj = sample(m, x_traj, steps=32, method="rk4", return_trajectory=True).xs
            cost[name] = transport_cost(x_0, x_end)
            trajectories[name] = traj
    tick("evaluate", t0)

    # --- table ---------------------------------------------------------------------------------------
    md_w2 = markdown_table(scores, NFE_SETTINGS, "w2", straightness=straight)
    md_ed = markdown_table(scores, NFE_SETTINGS, "energy", fmt="{:.4f}")
    total = time.perf_counter() - t_start
    report = "\n".join([
        f"# steerflow demo: {cfg.source} → {cfg.data}",
        "",
        f"3×{cfg.width} SELU MLP, batch {cfg.batch}, Adam {cfg.lr:g}; {cfg.train_steps} training steps for 1-RF "
        f"and OT-CFM, {cfg.reflow_steps} reflow steps on {cfg.n_pairs} pairs, {cfg.distill_steps} distillation "
        f"steps (regression onto the 2-RF's pairs for `distilled`; a minibatch-OT energy distance to fresh data, "
        f"starting from the OT-CFM, for `matched`). Metrics on {cfg.n_eval} generated vs {cfg.n_eval} fresh data samples; columns are Euler steps "
        f"(= NFE) and adaptive dopri5 (rtol=atol={cfg.tol:g}, its NFE in brackets). Straightness "
        "S = ∫ E|(x_1 − x_0) − v(x_t, t)|² dt (0 = straight paths).",
        "",
        "## W2 (exact OT; lower is better)",
        "",
        md_w2,
        "",
        f"Noise floor (fresh vs fresh data, same n): W2 = {floor['w2']:.3f}, energy = {floor['energy']:.4f}.",
        "",
        "## Squared energy distance",
        "",
        md_ed,
        "",
        "## Transport cost E|x_1 − x_0|² of each model's coupling",
        "",
        "| model | cost |",
        "|---|---:|",
        *[f"| {k} | {v:.3f} |" for k, v in cost.items()],
        "",
        f"Seed {cfg.seed}; total time {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ").",
        "",
    ])
    (out / "results.md").write_text(report)
    result = {
        "config": asdict(cfg),
        "noise_floor": floor,
        "scores": {k: {s: asdict(v) for s, v in d.items()} for k, d in scores.items()},
        "straightness": straight,
        "transport_cost": cost,
        "timings_s": timings,
        "total_s": total,
        "torch_threads": torch.get_num_threads(),
    }
    C.write_json(out / "results.json", result)

    # --- figures --------------------------------------------------------------------------------------
    data_bg = sample_toy(cfg.data, 2000, torch.Generator().manual_seed(cfg.seed + 2000))
    grid_scores = {k: {("dopri5" if s == "dopri5" else f"NFE {s}"): v.w2 for s, v in d.items()}
                   for k, d in scores.items()}
    plot_nfe_grid(samples, out / "samples_by_nfe.png", data=data_bg, scores=grid_scores,
                  title=f"samples (colour) over data (grey): {cfg.source} → {cfg.data}")
    plot_trajectories(trajectories, out / "trajectories.png", data=data_bg, straightness=straight,
                      title="ODE trajectories from the same source points")
    plot_metric_vs_nfe({k: [(v.nfe, v.w2) for v in d.values()] for k, d in scores.items()},
                       out / "w2_vs_nfe.png", floor=floor["w2"], ylabel="W2 to data")
    plot_losses(losses, out / "losses.png", title="training losses")
    log("")
    log("W2 (exact OT) by NFE — lower is better:")
    log(md_w2)
    log(f"noise floor W2 {floor['w2']:.3f}")
    log("")
    log(f"wrote {out}/results.md, results.json, samples_by_nfe.png, trajectories.png, w2_vs_nfe.png, losses.png "
        f"({total:.0f} s)")
    return result


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="directory for the table and figures")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds")
    C.add_seed(p)
    p.add_argument("--steps", type=C.positive_int, default=None,
                   help="training steps per stage (default 5000; 300 with --quick)")
    p.add_argument("--threads", type=C.positive_int, default=1,
                   help="torch CPU threads (one is fastest for these small networks)")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    cfg = DemoConfig.quick(seed=args.seed) if args.quick else DemoConfig(seed=args.seed)
    if args.steps is not None:
        cfg = replace(cfg, train_steps=args.steps, reflow_steps=args.steps, distill_steps=args.steps)
    run_demo(cfg, Path(args.out), log=lambda s: print(s, flush=True))
    return 0


register(Command("demo", "train, straighten and compare flows on a 2-D toy (start here)", configure, run,
                 description=__doc__.split("\n\n")[0] + "\n\nExample:  steerflow demo --quick --out demo_out"))
