"""``steerflow reflow`` and ``steerflow distill``: straighten a trained flow (Liu et al. 2022)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from . import _common as C
from .main import CLIError, Command, register

PAIR_METHODS = ("euler", "midpoint", "heun", "rk4", "dopri5")
PAIRS_FILE = "pairs.safetensors"
STUDENTS = ("copy", "mlp", "mlp-endpoint")


def _common_args(p: argparse.ArgumentParser, *, default_out: str) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory of the teacher flow")
    p.add_argument("--out", default=default_out, help="output checkpoint directory")
    p.add_argument("--n-pairs", type=C.positive_int, default=20000, help="number of (x_0, x_1) pairs")
    p.add_argument("--pair-method", choices=PAIR_METHODS, default="dopri5",
                   help="ODE solver used to generate the pairs (dopri5 is adaptive)")
    p.add_argument("--pair-steps", type=C.positive_int, default=None,
                   help="steps of the pair solver (fixed-step methods; default 100)")
    p.add_argument("--steps", type=C.positive_int, default=5000, help="training steps")
    p.add_argument("--batch", type=C.positive_int, default=256, help="batch size")
    p.add_argument("--lr", type=C.positive_float, default=1e-3, help="Adam learning rate (cosine-annealed)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="load the teacher's EMA weights when present")
    C.add_seed(p)
    C.add_checkpointing(p)
    C.add_device(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def configure_reflow(p: argparse.ArgumentParser) -> None:
    _common_args(p, default_out="steerflow_reflow")
    p.add_argument("--iterations", type=C.positive_int, default=1,
                   help="rounds k of rectification (1 turns a k-RF into a (k+1)-RF)")


def configure_distill(p: argparse.ArgumentParser) -> None:
    _common_args(p, default_out="steerflow_distill")
    p.add_argument("--pairs", default=None,
                   help=f"a pairs file to regress on (e.g. a reflow run's {PAIRS_FILE}); default: new pairs "
                        "(x_0, ODE(x_0)) from the teacher, as Liu et al. distil a k-RF on its own coupling")
    p.add_argument("--match", choices=("energy", "ot-energy", "ot-energy-full", "ot-energy-nn"), default=None,
                   help="add a distribution-matching term against a fresh data batch each step: energy "
                        "(Szekely's energy distance), ot-energy (minibatch energy distance with the exact W2 "
                        "cost, the stronger one on thin 2-D structure) or ot-energy-full (the same with two "
                        "generated batches of --batch against one whole data batch of --batch: larger plans, "
                        "the same data per step) or ot-energy-nn (ot-energy-full plus a nearest-neighbour term "
                        "that pulls points left between modes onto the data)")
    p.add_argument("--data", default=None,
                   help="data for --match (a dataset name or file; default: the teacher's training data)")
    p.add_argument("--match-weight", type=C.nonneg_float, default=1.0, help="weight of the matching term")
    p.add_argument("--regression-weight", type=C.nonneg_float, default=None,
                   help="weight of the regression onto the teacher's pairs (default 1, or 0 with --match: "
                        "the teacher's own sampling error then does not cap the student)")
    p.add_argument("--student", choices=STUDENTS, default="copy",
                   help="the one-step network: a copy of the teacher, a fresh velocity MLP (one step x_0 + "
                        "v(x_0, 0)) or a fresh end-point MLP (one step = the network's output, no identity skip)")
    p.add_argument("--student-width", type=C.positive_int, default=512, help="hidden width of a fresh student")
    p.add_argument("--student-depth", type=C.positive_int, default=4, help="hidden layers of a fresh student")
    p.add_argument("--student-bounded", action="store_true",
                   help="--student mlp-endpoint: tanh last hidden layer, so samples stay in a bounded set (for "
                        "data with compact support)")
    p.add_argument("--match-memory", type=C.positive_int, default=1,
                   help="with --match: compare with the union of the last K data batches (K x larger plans, less "
                        "minibatch bias; still --batch fresh data points per step)")
    p.add_argument("--sliced-weight", type=C.nonneg_float, default=0.0,
                   help="with --match: add this weight times the sliced W2^2 against the last --sliced-memory data "
                        "batches (sorts along random directions: sees how densely thin structures are covered; "
                        "no extra data)")
    p.add_argument("--sliced-memory", type=C.positive_int, default=16,
                   help="with --sliced-weight: how many recent data batches the sliced term compares with")
    p.add_argument("--warm-steps", type=C.nonneg_int, default=0,
                   help="with --match: the first N of --steps regress onto the teacher's pairs alone (a warm "
                        "start for a fresh student), the rest use the --match loss")


def _pair_steps(args) -> int | None:
    if args.pair_method == "dopri5":
        return None
    return args.pair_steps or 100


def _checkpoints(args: argparse.Namespace, out: Path, config: dict):
    """Where and how often the fit checkpoints (``--ckpt-every``, ``--resume``); the last checkpoint is the
    command's result, with ``config`` as its settings."""
    from ..straighten._fit import FitCheckpoints

    return FitCheckpoints(out, config, every=args.ckpt_every, resume=args.resume)


def run_reflow(args: argparse.Namespace) -> int:
    from ..straighten import reflow

    device = C.device_of(args.device)
    teacher = C.load_flow(args.ckpt, ema=args.ema, device=device)
    source = C.source_sampler(teacher.info.source, tuple(teacher.model.event_shape))
    out = Path(args.out)
    C.check_out(out, args.resume)
    k = teacher.info.k + args.iterations
    info = C.RunInfo(data=teacher.info.data, source=teacher.info.source, kind="reflow", coupling=teacher.info.coupling,
                     path=teacher.info.path, k=k, parent=str(teacher.directory))
    config = {"command": "reflow", "teacher": str(teacher.directory), "n_pairs": args.n_pairs,
              "pair_method": args.pair_method, "pair_steps": _pair_steps(args), "steps": args.steps,
              "batch_size": args.batch, "lr": args.lr, "iterations": args.iterations, "seed": args.seed}
    C.begin_run(out, info, args.resume)
    res = reflow(teacher.model, source=source, n_pairs=args.n_pairs, steps=_pair_steps(args), method=args.pair_method,
                 train_steps=args.steps, batch_size=args.batch, lr=args.lr, iterations=args.iterations,
                 path=teacher.info.path, seed=args.seed, progress=not args.quiet,
                 checkpoints=_checkpoints(args, out, config))
    res.pairs.save(out / PAIRS_FILE)
    C.end_run(out, info, f"{k}-rectified flow trained on {len(res.pairs)} pairs for {args.steps} steps x "
                         f"{args.iterations}; final loss {res.fits[-1].final_loss:.4g}; checkpoint in {out}")
    return 0


def _student(args: argparse.Namespace, event_shape: tuple[int, ...], teacher):
    """A fresh student network for ``--student mlp|mlp-endpoint`` (None: ``distill`` copies the teacher)."""
    from ..models import build_model

    if args.student == "copy":
        return None
    if getattr(teacher, "label_embed", None) is not None:
        raise CLIError("a fresh --student is unconditional; the teacher is class-conditional: use --student copy")
    extra = {"bounded": args.student_bounded} if args.student == "mlp-endpoint" else {}
    with C.seeded(args.seed):  # initial weights from --seed, the caller's RNG untouched
        return build_model(args.student, dim=math.prod(event_shape), hidden=args.student_width,
                           depth=args.student_depth, **extra)


def run_distill(args: argparse.Namespace) -> int:
    from ..straighten import Pairs, distill
    from ..straighten.matching import GENERATED_PER_DATA

    device = C.device_of(args.device)
    teacher = C.load_flow(args.ckpt, ema=args.ema, device=device)
    event_shape = tuple(teacher.model.event_shape)
    pairs = None
    pairs_path = Path(args.pairs) if args.pairs else None
    if pairs_path is not None:
        try:
            pairs = Pairs.load(pairs_path)
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(f"--pairs: {e}") from None
        if tuple(pairs.x_0.shape[1:]) != event_shape:
            raise CLIError(f"--pairs {str(pairs_path)!r} holds points of shape {tuple(pairs.x_0.shape[1:])}, "
                           f"but the model expects {event_shape}")
    source = C.source_sampler(teacher.info.source, event_shape)
    data = None
    if args.match is not None:
        data_name = args.data or teacher.info.data
        if not data_name:
            raise CLIError("--match needs data: pass --data (the teacher's checkpoint names no dataset)")
        data = C.load_run_data(data_name, teacher.info)
        shape = tuple(data.event_shape)
        if shape != event_shape:
            raise CLIError(f"--data {data_name!r} holds points of shape {shape}, but the model expects {event_shape}")
    elif args.data is not None:
        raise CLIError("--data is used by --match only; add --match energy, ot-energy, ot-energy-full or "
                       "ot-energy-nn")
    reg = args.regression_weight if args.regression_weight is not None else (0.0 if args.match else 1.0)
    # --batch is the data batch; ot-energy-full/-nn draw GENERATED_PER_DATA (2) generated batches per data batch
    if args.match_memory > 1 and not args.match:
        raise CLIError("--match-memory is used by --match only; add --match ot-energy-full")
    per_data = GENERATED_PER_DATA[args.match] * args.match_memory if args.match else 1
    batch, match_batch = per_data * args.batch, (args.batch if args.match else None)
    if args.sliced_weight and not args.match:
        raise CLIError("--sliced-weight is used by --match only; add --match ot-energy-nn")
    if args.warm_steps and not args.match:
        raise CLIError("--warm-steps splits --steps into regression and matching: add --match")
    if args.warm_steps >= args.steps:
        raise CLIError(f"--warm-steps must be smaller than --steps={args.steps}, got {args.warm_steps}")
    if args.student_bounded and args.student != "mlp-endpoint":
        raise CLIError("--student-bounded needs --student mlp-endpoint")
    student = _student(args, event_shape, teacher.model)
    if student is not None:
        student = student.to(device)
    out = Path(args.out)
    C.check_out(out, args.resume)
    info = C.RunInfo(data=teacher.info.data, source=teacher.info.source, kind="distilled",
                     coupling=teacher.info.coupling, path=teacher.info.path, k=teacher.info.k,
                     parent=str(teacher.directory), default_steps=1, default_method="euler")
    config = {"command": "distill", "teacher": str(teacher.directory),
              "n_pairs": len(pairs) if pairs is not None else args.n_pairs,
              "pairs": str(pairs_path) if pairs is not None else None, "pair_method": args.pair_method,
              "steps": args.steps, "batch_size": batch, "match_batch_size": match_batch, "lr": args.lr,
              "seed": args.seed, "match": args.match, "match_weight": args.match_weight,
              "regression_weight": reg, "match_memory": args.match_memory, "student": args.student,
              "sliced_weight": args.sliced_weight, "sliced_memory": args.sliced_memory,
              "warm_steps": args.warm_steps,
              **({} if args.student == "copy" else
                 {"student_width": args.student_width, "student_depth": args.student_depth,
                  "student_bounded": args.student_bounded})}
    checkpoints = _checkpoints(args, out, config)
    C.begin_run(out, info, args.resume)
    try:
        if args.warm_steps:  # regression onto the teacher's pairs alone (fit 0), then matching on the same pairs
            warm_ck, checkpoints = checkpoints.at(0, 0), checkpoints.at(1, args.warm_steps)
            if not warm_ck.finished_before():  # (resumed in the matching phase: its checkpoint holds the pairs)
                warm = distill(teacher.model, pairs=pairs, source=source, n_pairs=args.n_pairs,
                               steps=_pair_steps(args), method=args.pair_method, train_steps=args.warm_steps,
                               batch_size=args.batch, lr=args.lr, seed=args.seed, progress=not args.quiet,
                               model=student, checkpoints=warm_ck)
                pairs, student = warm.pairs, warm.model
        res = distill(teacher.model, pairs=pairs, source=source, n_pairs=args.n_pairs, steps=_pair_steps(args),
                      method=args.pair_method, train_steps=args.steps - args.warm_steps, batch_size=batch, lr=args.lr,
                      seed=args.seed + (1 if args.warm_steps else 0), progress=not args.quiet, match=args.match,
                      data=data, match_weight=args.match_weight, regression_weight=reg, match_batch_size=match_batch,
                      match_memory=args.match_memory, sliced_weight=args.sliced_weight,
                      sliced_memory=args.sliced_memory, model=student, checkpoints=checkpoints)
    except ValueError as e:
        raise CLIError(str(e)) from None
    C.end_run(out, info, f"one-step model distilled from {teacher.directory} on {len(res.pairs)} pairs for "
                         f"{args.steps} steps; final loss {res.fit.final_loss:.4g}; checkpoint in {out} (sample "
                         "with --steps 1)")
    return 0


register(Command("reflow", "rectify a trained flow: train a (k+1)-RF on the pairs of a k-RF", configure_reflow,
                 run_reflow, description="Reflow (Liu et al. 2022): x_1 = ODE(x_0) pairs, then flow matching on them.\n"
                                         "Example:  steerflow reflow --ckpt runs/1rf --out runs/2rf\n"
                                         "A killed run continues from its last checkpoint (--ckpt-every): the same "
                                         "command with --resume"))
register(Command("distill", "distil a flow into a one-step generator x_1 = x_0 + v(x_0, 0)", configure_distill,
                 run_distill, description="One-step distillation by L2 regression on the flow's pairs.\n"
                                          "Example:  steerflow distill --ckpt runs/2rf --out runs/1step\n"
                                          "A killed run continues from its last checkpoint (--ckpt-every): the "
                                          "same command with --resume"))
