"""``steerflow eval``: sample quality (W2, energy distance) against NFE, and straightness, of a checkpoint."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import _common as C
from .main import CLIError, Command, register

DEFAULT_NFE = ("1", "2", "4", "8", "dopri5")


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
                   samples_out: dict | None = None) -> list[NFEScore]:
    """Solve from ``x_0`` (n, *d) with each setting and compare with ``reference`` (m, *d) samples.

    A setting is an integer ``k`` (``k`` Euler steps, ``k`` NFE) or ``dopri5`` (adaptive; its NFE counted).
    W2 is the exact empirical 2-Wasserstein distance (:func:`steerflow.metrics.w2`), ``energy`` the squared
    energy distance (:func:`steerflow.metrics.energy_distance`); both on flattened samples. When
    ``samples_out`` is a dict it receives ``{setting: x_1}``.
    """
    from ..metrics import energy_distance, w2
    from ..metrics.cost import Cost
    from ..solvers import sample

    out = []
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
    p.add_argument("--n", type=C.positive_int, default=2000, help="generated and reference samples (W2 is O(n^3))")
    p.add_argument("--out", default=None, help="JSON file for the results (default: <ckpt>/eval.json)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    C.add_seed(p)
    C.add_device(p)


def run(args: argparse.Namespace) -> int:
    from ..metrics import straightness

    device = C.device_of(args.device)
    loaded = C.load_flow(args.ckpt, ema=args.ema, device=device)
    data_name = args.data or loaded.info.data
    if data_name is None:
        raise CLIError(f"--data is needed: {args.ckpt!r} does not record its dataset")
    dataset = C.load_data(data_name)
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
    scores = score_settings(loaded.model, x_0, reference, settings)
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


register(Command("eval", "W2 / energy distance vs NFE, and straightness, of a checkpoint", configure, run,
                 description="Evaluate sample quality against fresh data samples.\n"
                             "Example:  steerflow eval --ckpt runs/ot --nfe 1 4 100 dopri5"))
