"""``steerflow eval``: sample quality (W2, energy distance) against NFE, and straightness, of a checkpoint.

For a checkpoint trained with ``--manifold M`` it reports the test negative log-likelihood in nats with
respect to ``M``'s Riemannian volume, ``-log p_1(x) = -log p_base(x_0) + ∫_0^1 div_g v(x_t, t) dt``
(:func:`steerflow.manifolds.manifold_log_likelihood`; Chen & Lipman 2024, eq. 7), next to the base
distribution's NLL (``log 4π = 2.531`` for the uniform distribution on ``S²``); a run trained from a fitted base
(``train --base vmf``) is scored with that base's exact log-density as ``log p_base``, and the base row shows that
base alone. Every point of ``--split`` is scored, ``--batch`` at a time; points whose backward solve leaves ``M``'s
numeric range (the flow does not reach them: ``log p = -inf``) are counted and named, and the NLL is over the
others. ``--split val/test`` of points the checkpoint was trained on (it records its split, seed and data in
``run.json``) is refused unless ``--allow-leak``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import _common as C
from .main import CLIError, Command, register

DEFAULT_NFE = ("1", "2", "4", "8", "dopri5")
DEFAULT_N = 2000


@dataclass(frozen=True)
class NFEScore:
    """Quality of samples made with one solver setting: ``nfe`` network evaluations (per sample batch)."""

    setting: str
    nfe: int
    w2: float
    energy: float
    seconds: float


@torch.no_grad()
def score_settings(v: Callable[[Tensor, Tensor], Tensor], x_0: Tensor, reference: Tensor,
                   settings: Sequence[str], *, atol: float = 1e-5, rtol: float = 1e-5,
                   samples_out: dict | None = None, progress: bool = False) -> list[NFEScore]:
    """Solve from ``x_0`` (n, *d) with each setting and compare with ``reference`` (m, *d) samples.

    A setting is an integer ``k`` (``k`` Euler steps, ``k`` NFE) or ``dopri5`` (adaptive; its NFE counted).
    W2 is the exact empirical 2-Wasserstein distance (:func:`steerflow.metrics.w2`), ``energy`` the squared
    energy distance (:func:`steerflow.metrics.energy_distance`); both on flattened samples. When
    ``samples_out`` is a dict it receives ``{setting: x_1}``; ``progress`` shows a bar over the settings.
    """
    from ..metrics import energy_distance, w2
    from ..metrics.cost import Cost
    from ..solvers import sample

    out = []
    if progress:
        from tqdm.auto import tqdm

        settings = tqdm(settings, desc="solver settings", unit="setting", leave=False)
    for s in settings:
        cost = Cost()
        t0 = time.perf_counter()
        if s == "dopri5":
            x_1 = sample(v, x_0, method="dopri5", atol=atol, rtol=rtol, cost=cost)
        else:
            x_1 = sample(v, x_0, steps=int(s), method="euler", cost=cost)
        sec = time.perf_counter() - t0
        if samples_out is not None:
            samples_out[s] = x_1
        a, b = x_1.reshape(x_1.shape[0], -1).double().cpu(), reference.reshape(reference.shape[0], -1).double().cpu()
        out.append(NFEScore(setting=s, nfe=cost.nfe, w2=w2(a, b), energy=energy_distance(a, b), seconds=sec))
    return out


def markdown_table(rows: dict[str, dict[str, NFEScore]], settings: Sequence[str], metric: str, *,
                   straightness: dict[str, float] | None = None, fmt: str = "{:.3f}") -> str:
    """A Markdown table: one row per model, one column per NFE setting, cells ``metric``."""
    head = ["model"] + [("NFE " + s) if s != "dopri5" else "dopri5" for s in settings]
    if straightness is not None:
        head.append("straightness")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, scores in rows.items():
        cells = [name]
        for s in settings:
            sc = scores.get(s)
            if sc is None:
                cells.append("—")
            else:
                val = fmt.format(getattr(sc, metric))
                cells.append(f"{val} ({sc.nfe})" if s == "dopri5" else val)
        if straightness is not None:
            st = straightness.get(name)
            cells.append("—" if st is None else f"{st:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory")
    p.add_argument("--data", default=None, help="reference dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--nfe", nargs="+", type=C.nfe_spec, default=None,
                   help="solver settings: integers are Euler step counts, 'dopri5' is adaptive "
                        f"(default: {' '.join(DEFAULT_NFE)}; 1 for a distilled model)")
    p.add_argument("--n", type=C.positive_int, default=None,
                   help=f"generated and reference samples (default {DEFAULT_N}; W2 is O(n^3)); for a manifold "
                        "checkpoint, the most data points scored (a random subset beyond that; default: every point "
                        "of --split)")
    p.add_argument("--out", default=None, help="JSON file for the results (default: <ckpt>/eval.json)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    p.add_argument("--seed", type=C.nonneg_int, default=None,
                   help="random seed (default 0); for a manifold checkpoint it also draws the 80/10/10 split "
                        "(default: the seed the checkpoint's training split was drawn with)")
    C.add_device(p)
    C.add_quiet(p)
    man = p.add_argument_group("manifold checkpoints (test NLL)")
    man.add_argument("--split", choices=C.SPLITS, default=None,
                     help="which part of --data to score: the train/val/test part of the random 80/10/10 split "
                          "drawn with --seed, or all (default: test when the checkpoint was trained with "
                          "--split train, else all). val/test of points the checkpoint was trained on (a run "
                          "trained on all, or another seed's split) is refused unless --allow-leak")
    man.add_argument("--allow-leak", action="store_true",
                     help="score --split val/test even where the checkpoint was trained on those points (the "
                          "result is marked as such)")
    man.add_argument("--method", choices=("euler", "midpoint", "heun", "rk4", "dopri5"), default="rk4",
                     help="ODE solver of the likelihood")
    man.add_argument("--steps", type=C.positive_int, default=64, help="solver steps (not for dopri5)")
    man.add_argument("--batch", type=C.positive_int, default=1024,
                     help="points per likelihood solve (memory is that of one such solve)")


def run_manifold(args: argparse.Namespace, loaded: C.Loaded) -> int:
    """Test NLL of a flow on a manifold: ``-mean log p_1(x)`` over the points of ``--data`` (``--split``)."""
    from ..manifolds import manifold_log_likelihood
    from ..metrics.cost import Cost

    M, info = loaded.manifold, loaded.info
    if args.nfe is not None:
        raise CLIError("--nfe applies to flat checkpoints; for a manifold checkpoint choose the likelihood "
                       "solver with --method/--steps")
    data_name = args.data or info.data
    if data_name is None:
        raise CLIError(f"--data is needed: {args.ckpt!r} does not record its dataset")
    split = args.split or ("test" if info.split == "train" else "all")
    seed = args.seed if args.seed is not None else (info.split_seed if info.split_seed is not None else 0)
    points = C.load_manifold_data(data_name, M)
    leak = _leak(info, data_name, points, split, seed)
    if leak and not args.allow_leak:
        reason, hint = leak
        raise CLIError(f"--split {split}: {reason}, so its {split} points are not held out; {hint}, or pass "
                       "--allow-leak to score them anyway")
    if leak:
        print(f"note: --allow-leak: {leak[0]}; the {split} points were trained on", file=sys.stderr)
    elif split == "train" or (split == "all" and _same_data(info, data_name, points)):
        print(f"note: split {split!r} contains the training points", file=sys.stderr)
    x = C.split_points(points, split, seed)
    idx = torch.arange(x.shape[0])  # positions in the split, to name the points that cannot be scored
    if args.n is not None and x.shape[0] > args.n:  # a random subset of n points
        idx = torch.randperm(x.shape[0], generator=C.generator(seed + 1))[:args.n]
        x = x[idx]
    device = next(loaded.model.parameters()).device
    ode = {"method": args.method} if args.method == "dopri5" else {"method": args.method, "steps": args.steps}
    fitted = loaded.base  # the fitted source the flow was trained from, or None: M's base distribution
    base_log_prob = None if fitted is None else fitted.log_prob
    if fitted is not None and split == "val" and (info.base or {}).get("chosen_on") == "val":
        print("note: the run's base was chosen on these validation points (--base-components)", file=sys.stderr)
    cost = Cost()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():  # its count is reported below, with the points' positions
            warnings.filterwarnings("ignore", message="log_likelihood: ", category=RuntimeWarning)
            logp = manifold_log_likelihood(loaded.model, x.to(device), M, cost=cost, batch_size=args.batch,
                                           base_log_prob=base_log_prob, progress=not args.quiet,
                                           **ode).cpu().double()
    except RuntimeError as e:
        raise CLIError(f"the likelihood on {M.name} failed ({C._msg(e)})") from None
    sec = time.perf_counter() - t0
    sites = loaded.sites  # --repeats: the repeated sites' components around the flow
    at_sites = None
    if sites is not None:
        logp = sites.log_prob(x, logp)  # (a point the flow does not reach keeps its sites' density)
        at_sites = sites.repeats(x)
    finite = torch.isfinite(logp)
    bad = idx[~finite].tolist()
    if not finite.any():
        raise CLIError(f"the log-likelihood is not finite at any of the {logp.numel()} points: every backward "
                       f"solve left {M.name}'s numeric range (try --method dopri5 or more --steps)")
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        print(f"warning: the flow does not reach {len(bad)} of {logp.numel()} points: their backward solve left "
              f"{M.name}'s numeric range (log p = -inf; positions in the {split} split: {shown}); the NLL below is "
              f"over the other {int(finite.sum())} (more --steps or --method dopri5 tell a solver artefact from "
              "a true escape)", file=sys.stderr)
    scored = logp[finite]
    nll = float(-scored.mean())
    se = float(scored.std() / math.sqrt(scored.numel())) if scored.numel() > 1 else 0.0
    base_lp = (M.base_log_prob if fitted is None else fitted.log_prob)(x.double()).double()
    base_name = f"base distribution of {M.name}" if fitted is None else \
        f"fitted base alone (vMF mixture, {len(fitted)} components)"
    if sites is not None:
        base_lp = sites.log_prob(x, base_lp)
        base_name = (f"repeated sites ({len(sites)}, weight {sites.weight:.2f}) + fitted base alone "
                     f"({len(fitted)} components)")
    base = float(-base_lp.mean())
    trained_on = " — trained on these points" if leak else ""
    selected = (info.selection or {}).get("selected_step")  # (train --select val: the checkpoint loaded)
    kept = "" if selected is None else f", step {selected} kept on validation"
    print(f"checkpoint {args.ckpt} ({M.name}{kept}) on {x.shape[0]} points of {data_name} "
          f"(split {split}, seed {seed}{trained_on})")
    solver = args.method if args.method == "dopri5" else f"{args.method}, {args.steps} steps"
    print("\n| model | NLL (nats) |\n|---|---:|")
    print(f"| {base_name} | {base:.3f} |")
    print(f"| {'repeated sites + ' if sites is not None else ''}flow ({solver}) | {nll:.3f} ± {se:.3f} |")
    parts = {}
    if at_sites is not None:
        for name, mask in (("at a training site", at_sites & finite), ("elsewhere", ~at_sites & finite)):
            if mask.any():
                parts[name] = {"n": int(mask.sum()), "nll": float(-logp[mask].mean())}
                print(f"| — the {int(mask.sum())} points {name} | {parts[name]['nll']:.3f} |")
    if bad:
        print(f"| points the flow does not reach (log p = -inf, left out above) | {len(bad)} of {logp.numel()} |")
    out = Path(args.out) if args.out else loaded.directory / "eval.json"
    C.write_json(out, {"ckpt": str(args.ckpt), "manifold": M.name, "data": data_name, "split": split, "seed": seed,
                       "trained_split": info.split or "all", "leak": bool(leak), "selected_step": selected,
                       "n": int(x.shape[0]), "nll": nll, "nll_stderr": se, "base_nll": base,
                       "base": None if fitted is None else (info.base or {}).get("name", "vmf"),
                       "sites": None if sites is None else {**info.base["sites"], "parts": parts},
                       "n_nonfinite": len(bad), "nonfinite_points": bad,
                       "ode": ode, "nfe": cost.nfe, "seconds": sec,
                       "units": "nats, w.r.t. the Riemannian volume of the manifold; nll over the points with a "
                                "finite log-likelihood"})
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


def _same_data(info: C.RunInfo, data_name: str, points: Tensor) -> bool:
    """Whether ``points`` are the data the checkpoint was trained on: by their digest when it is recorded,
    else by name."""
    if info.data_sha256 is not None:
        return C.points_digest(points) == info.data_sha256
    return data_name == info.data


def _leak(info: C.RunInfo, data_name: str, points: Tensor, split: str, seed: int) -> tuple[str, str] | None:
    """``(why, what to do)`` when the ``split`` part (drawn with ``seed``) of ``points`` may hold points the
    checkpoint was trained on, else None. Only val/test claim to be held out; data other than the training
    data holds none of its points."""
    if split not in ("val", "test"):
        return None
    if not _same_data(info, data_name, points):
        if data_name != info.data:
            return None
        return (f"{data_name} is not the data the checkpoint was trained on ({points.shape[0]} points now, "
                f"{info.data_points} then)", "score the data it was trained on")
    trained = info.split or "all"  # (checkpoints from before the split was recorded trained on all points)
    if trained == "all":
        return (f"the checkpoint was trained on all of {data_name} (train --split all)",
                "train with --split train to hold out val/test points")
    if info.split_seed is None:
        return "the checkpoint does not record the seed of its split", "retrain it with --split train --seed S"
    if seed != info.split_seed:
        return (f"the checkpoint was trained on the train part of the split drawn with seed {info.split_seed} "
                f"and --seed {seed} draws another split", f"drop --seed (or pass --seed {info.split_seed})")
    return None


def run(args: argparse.Namespace) -> int:
    from ..metrics import straightness

    device = C.device_of(args.device)
    loaded = C.load_flow(args.ckpt, ema=args.ema, device=device, allow_manifold=True)
    if loaded.manifold is not None:
        return run_manifold(args, loaded)
    if args.split is not None or args.allow_leak:
        flag = "--split" if args.split is not None else "--allow-leak"
        raise CLIError(f"{flag} applies to manifold checkpoints only")
    if args.seed is None:
        args.seed = 0
    data_name = args.data or loaded.info.data
    if data_name is None:
        raise CLIError(f"--data is needed: {args.ckpt!r} does not record its dataset")
    if args.n is None:
        args.n = DEFAULT_N
    dataset = C.load_run_data(data_name, loaded.info)
    event_shape = tuple(loaded.model.event_shape)
    g = C.generator(args.seed)
    reference = C.data_sampler(dataset)(args.n, g)
    if tuple(reference.shape[1:]) != event_shape:
        raise CLIError(f"--data {data_name!r} has samples of shape {tuple(reference.shape[1:])}, but the model "
                       f"generates {event_shape}")
    x_0 = C.source_sampler(loaded.info.source, event_shape)(args.n, g).to(device)
    if args.nfe is None:
        settings = ["1"] if loaded.info.kind == "distilled" else list(DEFAULT_NFE)
    else:
        settings = list(dict.fromkeys(args.nfe))
    if loaded.info.kind == "distilled" and settings != ["1"]:
        print("note: a distilled model is a one-step generator; only NFE 1 is meaningful", file=sys.stderr)
    scores = score_settings(loaded.model, x_0, reference, settings, progress=not args.quiet)
    s = None  # a distilled model is a one-step map: its multi-step trajectories mean nothing
    if loaded.info.kind != "distilled":
        with torch.no_grad():
            s = straightness(loaded.model, x_0[:min(args.n, 1000)], steps=32, method="rk4")
    name = f"{loaded.info.kind}" + (f" ({loaded.info.coupling})" if loaded.info.coupling else "")
    rows = {name: {sc.setting: sc for sc in scores}}
    print(f"checkpoint {args.ckpt} vs {args.n} samples of {data_name}")
    print("\nW2 (exact OT) by NFE:\n" + markdown_table(rows, settings, "w2", straightness={name: s}))
    print("\nsquared energy distance by NFE:\n" + markdown_table(rows, settings, "energy", fmt="{:.4f}"))
    out = Path(args.out) if args.out else loaded.directory / "eval.json"
    C.write_json(out, {"ckpt": str(args.ckpt), "data": data_name, "n": args.n, "seed": args.seed,
                       "kind": loaded.info.kind, "straightness": s,
                       "scores": [asdict(sc) for sc in scores]})
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


register(Command("eval", "W2 / energy distance vs NFE and straightness; test NLL on a manifold", configure, run,
                 description="Evaluate sample quality against fresh data samples.\n"
                             "Example:  steerflow eval --ckpt runs/ot --nfe 1 4 100 dopri5\n"
                             "On the sphere (test NLL):  steerflow eval --ckpt runs/volcano --data volcano "
                             "--split test --seed 0"))
