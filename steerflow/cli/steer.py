"""``steerflow steer | invert | edit``: steering, inversion and editing of a trained flow from the shell.

* ``steer``: simulate a measurement ``y = A x + σ ε`` of the input image(s) for a task (inpaint, superres,
  deblur, denoise) and reconstruct with a guidance method, or (``--task class``) generate a class with
  classifier-free guidance; writes ``input.npy``, ``measurement.npy``, ``result.npy``, ``grid.png``
  (rows: input | measurement | result) and ``metrics.json`` (PSNR/SSIM vs the input, which is the clean
  image here);
* ``invert``: RF-Inversion of the input to noise (``--gamma 0``: plain ODE inversion), one ``.npy``;
* ``edit``: invert, then regenerate with the controlled editing field toward the input (``--eta`` on
  ``--window``), optionally under a new ``--class-label``.

The inverse tasks and methods by name are library functions, :func:`steerflow.steering.tasks.build_task` and
:func:`~steerflow.steering.tasks.build_method` (re-exported here).
Images are arrays in the model's value range (``[-1, 1]`` for steerflow's image data) or PNG files
(mapped from ``[0, 255]`` to ``[-1, 1]``).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..steering.tasks import INVERSE_METHODS, INVERSE_TASKS, METHODS, build_method, build_task
from . import _common as C
from ._common import add_seed, generator, load_flow, positive_int, save_npy, write_json
from .main import CLIError, Command, register
from .pipeline import add_pipeline_args, is_pipeline_folder, run_edit, run_invert, run_steer

__all__ = ["INVERSE_TASKS", "TASKS", "INVERSE_METHODS", "METHODS", "build_task", "build_method", "image_shape"]

TASKS = ("inpaint", "superres", "deblur", "denoise", "class", "colorize")
"""``--task`` choices of ``steerflow steer``."""


# --- input / output -----------------------------------------------------------------------------------
def image_shape(event_shape: Sequence[int]) -> tuple[int, int, int]:
    """The image shape (C, H, W) a model's states are shown and measured in (flat square vectors → 1×s×s)."""
    event_shape = tuple(event_shape)
    if len(event_shape) == 3:
        return event_shape
    if len(event_shape) == 1:
        s = math.isqrt(event_shape[0])
        if s * s == event_shape[0]:
            return (1, s, s)
    raise CLIError(f"steer works on image models; this model's states have shape {event_shape}")


def _load_input(path: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """Read ``.npy`` (values in the model's range) or ``.png`` (0..255 → [-1, 1]) into (b, C, H, W)."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"--input: no file at {path!r}")
    if not p.is_file():
        raise CLIError(f"--input: expected a file, got the directory {path!r}")
    if p.suffix.lower() == ".png":
        try:
            from PIL import Image
        except ImportError:
            raise CLIError("reading PNG input needs Pillow: pip install 'steerflow[data]'") from None
        try:
            img = Image.open(p)
            img = img.convert("L" if shape[0] == 1 else "RGB")
        except Exception as e:
            raise CLIError(f"--input {path!r} is not a readable image ({type(e).__name__})") from None
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    elif p.suffix.lower() == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as e:
            raise CLIError(f"--input {path!r} is not a readable .npy array ({type(e).__name__})") from None
        if not np.issubdtype(arr.dtype, np.number):
            raise CLIError(f"--input {path!r} must hold numbers, got dtype {arr.dtype}")
    else:
        raise CLIError(f"--input must be a .npy or .png file, got {path!r}")
    arr = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise CLIError(f"--input {path!r} holds NaN or inf")
    C, H, W = shape
    n_pix = C * H * W
    accepted = {shape, (H, W) if C == 1 else None, (n_pix,)}
    if tuple(arr.shape) in accepted:
        arr = arr.reshape(1, *shape)
    elif arr.ndim >= 2 and tuple(arr.shape[1:]) in accepted:
        arr = arr.reshape(arr.shape[0], *shape)
    else:
        raise CLIError(f"--input {path!r} has shape {arr.shape}; the model expects images of shape {shape} "
                       f"(or a batch (n, {', '.join(map(str, shape))}))")
    if arr.shape[0] == 0:
        raise CLIError(f"--input {path!r} holds no images")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _load_model(ckpt: str):
    """The checkpoint's model in eval mode with frozen parameters (methods differentiate w.r.t. x only), carrying
    the affine path it was trained with as ``model.path`` (guidance reads x̂₁ from it)."""
    from ..paths import path_from_record

    loaded = load_flow(ckpt)
    model = loaded.model
    for p in model.parameters():
        p.requires_grad_(False)
    model.path = path_from_record(loaded.info.path)
    return model


def _to_model(x: torch.Tensor, model) -> torch.Tensor:
    return x.reshape(x.shape[0], *model.event_shape)


def _to_image(x: torch.Tensor, shape) -> torch.Tensor:
    return x.reshape(x.shape[0], *shape)


def _display(y: torch.Tensor, shape) -> torch.Tensor:
    """A measurement shown at the image size (nearest upsampling when it is smaller)."""
    if tuple(y.shape[1:]) == tuple(shape):
        return y
    return torch.nn.functional.interpolate(y, size=tuple(shape[1:]), mode="nearest")


def _write_grid(path: Path, rows: list[torch.Tensor], zoom: int = 8) -> None:
    """One row per image: the given panels side by side, values [-1, 1] → [0, 1], nearest zoom."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import image as mpimg

    from ..plotting import image_grid

    panels = torch.stack(rows, 1)  # (b, k, C, H, W)
    b, k = panels.shape[:2]
    grid = image_grid(panels.reshape(b * k, *panels.shape[2:]).float().numpy(), nrow=k, pad=1,
                      value_range=(-1.0, 1.0))
    grid = np.repeat(np.repeat(grid, zoom, 0), zoom, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    mpimg.imsave(str(path), np.clip(grid, 0, 1))


def _image_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict:
    from ..metrics.image import psnr, ssim

    H, W = out.shape[-2:]
    ws = min(7, H, W)
    ws = ws if ws % 2 else ws - 1
    out, ref = out.clamp(-1, 1).double(), ref.clamp(-1, 1).double()
    return {"psnr_db": psnr(out, ref, 2.0), "ssim": ssim(out, ref, 2.0, window_size=ws),
            "psnr_per_image": psnr(out, ref, 2.0, reduction="none").tolist(),
            "data_range": 2.0, "ssim_window": ws, "clipped_to": [-1, 1]}


def _labels(model, label: int | None, n: int) -> torch.Tensor | None:
    if label is None:
        return None
    table = getattr(model, "label_embed", None)
    if table is None:
        raise CLIError("--class-label needs a class-conditional model; this checkpoint's model is unconditional")
    if not 0 <= label < table.n_classes:
        raise CLIError(f"--class-label must lie in [0, {table.n_classes - 1}], got {label}")
    return torch.full((n,), int(label), dtype=torch.long)


def _window(s: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 't_start,t_end', e.g. 0,0.25; got {s!r}") from None
    if not 0 <= a <= b <= 1:
        raise argparse.ArgumentTypeError(f"expected 0 <= t_start <= t_end <= 1, got {s!r}")
    return a, b


def _configure_steer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", default=None, help="checkpoint directory of a trained image flow")
    p.add_argument("--task", required=True, choices=TASKS, help="colorize: --pipeline only")
    p.add_argument("--method", default=None, choices=METHODS + ("cfg",),
                   help="guidance method (default: 'default' for inverse tasks, 'cfg' for --task class, "
                        "'flowchef' with --pipeline)")
    p.add_argument("--input", help="clean image(s): .npy (n, C, H, W) / (C, H, W) / (H, W) / flat, or .png "
                                   "(with --pipeline: a .png/.jpg photo)")
    p.add_argument("--out", required=True, help="output directory (with --pipeline also a .png/.jpg file)")
    p.add_argument("--mask", default="box",
                   help="inpainting mask: box, random, or (with --pipeline) a mask image of the input's size, "
                        "white = region to fill, black = kept")
    p.add_argument("--noise", type=C.nonneg_float, default=0.05, help="measurement noise std σ")
    p.add_argument("--steps", type=positive_int, default=None, help="solver steps (default 100; 28 for --pipeline)")
    p.add_argument("--scale", type=float, default=None,
                   help="method strength (CFG weight for --task class; step size / scale otherwise)")
    p.add_argument("--guidance-window", type=_window, default=None, metavar="START,STOP",
                   help="times t in [0, 1] where the method acts (default 0,1: the whole solve), e.g. 0,0.7")
    p.add_argument("--class-label", type=int, default=None, help="class for --task class")
    p.add_argument("--n", type=positive_int, default=8, help="samples for --task class")
    p.add_argument("--ensemble", type=positive_int, default=8, help="EnKG particles per image")
    p.add_argument("--factor", type=positive_int, default=4, help="super-resolution factor (--pipeline)")
    p.add_argument("--blur", choices=("gaussian", "motion"), default="gaussian", help="deblur kernel (--pipeline)")
    p.add_argument("--blur-size", type=positive_int, default=9, help="blur kernel size, odd (--pipeline)")
    p.add_argument("--blur-std", type=C.positive_float, default=2.0, help="Gaussian blur std (--pipeline)")
    p.add_argument("--blur-angle", type=float, default=0.0, help="motion blur angle in degrees (--pipeline)")
    p.add_argument("--space", choices=("auto", "pixel", "latent"), default="auto",
                   help="--pipeline: measure in pixel space through the VAE decoder, or in latent space "
                        f"(auto: latent for {', '.join(('default', 'dds', 'otode'))}, which need a linear operator)")
    p.add_argument("--latent-noise", type=C.nonneg_float, default=0.1,
                   help="--pipeline --space latent: noise std assumed for the encoded measurement")
    add_seed(p)
    C.add_quiet(p)
    add_pipeline_args(p, prompt_help="text prompt of the pipeline (default '')")


def _run_steer(args: argparse.Namespace) -> int:
    import steerflow
    from ..metrics.cost import Cost
    from ..steering.cfg import ClassifierFreeGuidance

    if args.pipeline is not None or is_pipeline_folder(args.ckpt):
        return run_steer(args)
    _need_ckpt(args, "steer")
    if args.task == "colorize":
        raise CLIError("--task colorize is for --pipeline (RGB photos)")
    if args.mask not in ("box", "random"):
        raise CLIError(f"--mask {args.mask!r}: a checkpoint flow takes --mask box or random (mask images are for "
                       "--pipeline)")
    args.steps = args.steps or 100
    model = _load_model(args.ckpt)
    shape = image_shape(model.event_shape)
    out_dir = Path(args.out)
    if args.task == "class":
        method = args.method or "cfg"
        if method not in ("cfg", "unguided"):
            raise CLIError(f"--task class takes --method cfg or unguided, got {method!r}")
        if args.class_label is None:
            raise CLIError("--task class needs --class-label")
        labels = _labels(model, args.class_label, args.n)
        scale = 1.0 if args.scale is None else args.scale
        x0 = torch.randn(args.n, *model.event_shape, generator=generator(args.seed))
        cost = Cost()
        t0 = time.perf_counter()
        with torch.no_grad():
            g = ClassifierFreeGuidance(scale, labels) if method == "cfg" else None
            x = steerflow.sample(model, x0, steps=args.steps, method="euler", guidance=g, cost=cost,
                                 progress=not args.quiet)
        seconds = time.perf_counter() - t0
        result = _to_image(x, shape)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_npy(out_dir / "result.npy", result.numpy())
        _write_grid(out_dir / "grid.png", [result[i:i + 1] for i in range(args.n)])  # one row of samples
        write_json(out_dir / "metrics.json", {"task": "class", "method": method, "class_label": args.class_label,
                                              "scale": scale, "steps": args.steps, "seed": args.seed,
                                              "seconds": seconds, "nfe": cost.nfe})
        print(f"steerflow steer: {args.n} samples of class {args.class_label} -> {out_dir}")
        return 0

    if args.input is None:
        raise CLIError(f"--task {args.task} needs --input (the clean image to measure)")
    method = args.method or "default"
    if method == "cfg":
        raise CLIError("--method cfg is for --task class")
    x_true = _load_input(args.input, shape)
    name = args.mask if args.task == "inpaint" else args.task
    try:
        op = build_task(name, shape, generator=generator(args.seed + 1))
    except ValueError as e:
        raise CLIError(f"--task {args.task}: {e}") from None
    gen = generator(args.seed)
    Ax = op(x_true)
    y = Ax + args.noise * torch.randn(Ax.shape, generator=gen)
    b = x_true.shape[0]
    reps = args.ensemble if method == "enkg" else 1
    try:
        guidance = build_method(method, op, y.repeat_interleave(reps, 0), args.noise, scale=args.scale,
                                ensemble_size=reps if method == "enkg" else None, path=model.path,
                                window=args.guidance_window)
    except ValueError as e:
        raise CLIError(f"--method {method}: {e}") from None
    x0 = torch.randn(b * reps, *shape, generator=gen)
    cost = Cost()
    t0 = time.perf_counter()
    field = lambda x, t: _to_image(model(_to_model(x, model), t), shape)  # noqa: E731
    x = steerflow.sample(field, x0, steps=args.steps, method="euler", guidance=guidance, generator=gen, cost=cost,
                         progress=not args.quiet)
    seconds = time.perf_counter() - t0
    result = x.detach().reshape(b, reps, *shape).mean(1)  # EnKG: the ensemble mean per image
    out_dir.mkdir(parents=True, exist_ok=True)
    save_npy(out_dir / "input.npy", x_true.numpy())
    save_npy(out_dir / "measurement.npy", y.numpy())
    save_npy(out_dir / "result.npy", result.numpy())
    _write_grid(out_dir / "grid.png", [x_true, _display(y, shape), result.clamp(-1, 1)])
    metrics = {"task": args.task, "mask": args.mask if args.task == "inpaint" else None, "method": method,
               "noise": args.noise, "steps": args.steps, "seed": args.seed, "scale": args.scale,
               "guidance_window": list(args.guidance_window or (0.0, 1.0)), **cost.as_dict(), "seconds": seconds, "seconds_per_image": seconds / b,
               **_image_metrics(result, x_true)}
    write_json(out_dir / "metrics.json", metrics)
    print(f"steerflow steer: {args.task} with {method}: PSNR {metrics['psnr_db']:.2f} dB, SSIM {metrics['ssim']:.3f} "
          f"-> {out_dir}")
    return 0


def _need_ckpt(args: argparse.Namespace, command: str) -> None:
    if args.ckpt is None:
        raise CLIError(f"{command} needs --ckpt (a steerflow checkpoint) or --pipeline (a diffusers pipeline folder)")
    for flag, value in (("--prompt", args.prompt), ("--guidance", args.guidance)):
        if value is not None:
            raise CLIError(f"{flag} is for --pipeline; a steerflow checkpoint takes --class-label")


# --- invert / edit ---------------------------------------------------------------------------------------
def _configure_invert(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", default=None, help="checkpoint directory of a trained image flow")
    p.add_argument("--input", required=True, help="image(s) to invert (.npy or .png; .png/.jpg with --pipeline)")
    p.add_argument("--out", required=True, help="output .npy file for the noise (latents with --pipeline)")
    p.add_argument("--gamma", type=C.closed_unit_float, default=0.0, help="RF-Inversion controller strength (0: plain ODE)")
    p.add_argument("--steps", type=positive_int, default=None, help="solver steps (default 100; 28 for --pipeline)")
    p.add_argument("--class-label", type=int, default=None, help="invert under this class's field")
    add_seed(p)
    add_pipeline_args(p, prompt_help="the prompt to invert under (default '')")


def _inverse(model, x_img, shape, *, gamma, steps, labels, seed):
    from ..steering.inversion import invert

    field = lambda x, t, cond=None: model(x, t, cond)  # noqa: E731
    with torch.no_grad():
        z = invert(field, _to_model(x_img, model), steps=steps, gamma=gamma, generator=generator(seed), cond=labels)
    return z


def _run_invert(args: argparse.Namespace) -> int:
    if args.pipeline is not None or is_pipeline_folder(args.ckpt):
        return run_invert(args)
    _need_ckpt(args, "invert")
    args.steps = args.steps or 100
    model = _load_model(args.ckpt)
    shape = image_shape(model.event_shape)
    if not str(args.out).endswith(".npy"):
        raise CLIError(f"--out must end in .npy, got {args.out!r}")
    x = _load_input(args.input, shape)
    z = _inverse(model, x, shape, gamma=args.gamma, steps=args.steps,
                 labels=_labels(model, args.class_label, x.shape[0]), seed=args.seed)
    save_npy(args.out, _to_image(z, shape).numpy())
    print(f"steerflow invert: {x.shape[0]} image(s) -> {args.out}")
    return 0


def _configure_edit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", default=None, help="checkpoint directory of a trained image flow")
    p.add_argument("--input", required=True, help="image(s) to edit (.npy or .png; .png/.jpg with --pipeline)")
    p.add_argument("--out", required=True, help="output directory (with --pipeline also a .png/.jpg file)")
    p.add_argument("--eta", type=C.closed_unit_float, default=0.9, help="editing controller strength η")
    p.add_argument("--window", type=_window, default=(0.0, 0.25),
                   help="t_start,t_end (t = 0 noise) where the controller acts")
    p.add_argument("--gamma", type=C.closed_unit_float, default=0.5, help="inversion controller strength γ")
    p.add_argument("--steps", type=positive_int, default=None, help="solver steps (default 100; 28 for --pipeline)")
    p.add_argument("--class-label", type=int, default=None, help="the class to edit toward")
    p.add_argument("--source-label", type=int, default=None, help="the class to invert under (default: null)")
    p.add_argument("--source-prompt", default="", help="--pipeline: the prompt to invert under (default '')")
    add_seed(p)
    add_pipeline_args(p, prompt_help="--pipeline: the prompt to edit toward")


def _run_edit(args: argparse.Namespace) -> int:
    from ..steering.inversion import edit

    if args.pipeline is not None or is_pipeline_folder(args.ckpt):
        return run_edit(args)
    _need_ckpt(args, "edit")
    args.steps = args.steps or 100
    model = _load_model(args.ckpt)
    shape = image_shape(model.event_shape)
    x = _load_input(args.input, shape)
    b = x.shape[0]
    target = _labels(model, args.class_label, b)
    z = _inverse(model, x, shape, gamma=args.gamma, steps=args.steps, labels=_labels(model, args.source_label, b),
                 seed=args.seed)
    field = lambda x_, t, cond=None: model(x_, t, cond)  # noqa: E731
    with torch.no_grad():
        out = edit(field, z, _to_model(x, model), eta=args.eta, window=args.window, steps=args.steps, cond=target)
    result = _to_image(out, shape)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_npy(out_dir / "noise.npy", _to_image(z, shape).numpy())
    save_npy(out_dir / "result.npy", result.numpy())
    noise_view = _to_image(z, shape).clamp(-3, 3) / 3
    _write_grid(out_dir / "grid.png", [x, noise_view, result.clamp(-1, 1)])
    metrics = {"eta": args.eta, "window": list(args.window), "gamma": args.gamma, "steps": args.steps,
               "class_label": args.class_label, "source_label": args.source_label, "seed": args.seed,
               **_image_metrics(result, x)}
    write_json(out_dir / "metrics.json", metrics)
    print(f"steerflow edit: {b} image(s), PSNR to the input {metrics['psnr_db']:.2f} dB -> {out_dir}")
    return 0


register(Command("steer", "solve an inverse problem or generate a class with a steering method",
                 configure=_configure_steer, run=_run_steer))
register(Command("invert", "invert images to noise (RF-Inversion; --gamma 0 is plain ODE inversion)",
                 configure=_configure_invert, run=_run_invert))
register(Command("edit", "invert and regenerate images with RF-Inversion's controlled editing",
                 configure=_configure_edit, run=_run_edit))
