"""``--pipeline DIR``: the ``sample``, ``steer``, ``invert`` and ``edit`` commands on a diffusers flow pipeline.

The commands parse; :class:`steerflow.adapters.FlowPipeline` does the work. Images are PNG/JPEG files in and
out (``[0, 255]`` ↔ ``[−1, 1]``), resized to the pipeline's multiple with a warning. Examples::

    steerflow sample --pipeline sd3/ --prompt "a cat" --n 4 --steps 28 --guidance 7 --out grid.png
    steerflow steer  --pipeline sd3/ --prompt "a cat" --task inpaint --input photo.png --mask mask.png \\
                     --method flowchef --out out.png
    steerflow edit   --pipeline flux/ --input photo.png --prompt "a cat wearing a hat" --out edited.png
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from . import _common as C
from .main import CLIError

__all__ = ["add_pipeline_args", "is_pipeline_folder", "run_sample", "run_steer", "run_invert", "run_edit",
           "PIPELINE_TASKS", "LINEAR_ONLY"]

PIPELINE_TASKS = ("inpaint", "superres", "deblur", "colorize", "denoise")
"""``--task`` choices of ``steer --pipeline`` (measurements in pixel space)."""
LINEAR_ONLY = ("default", "dds", "otode")
"""Methods that need a linear operator: on a pipeline they measure in latent space (``--space latent``)."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_pipeline_folder(path: str | None) -> bool:
    """A diffusers ``save_pretrained`` folder (it holds ``model_index.json``)."""
    return path is not None and (Path(path) / "model_index.json").is_file()


def add_pipeline_args(p: argparse.ArgumentParser, *, prompt_help: str = "text prompt") -> None:
    """The options every ``--pipeline`` command shares."""
    g = p.add_argument_group("diffusers pipelines (--pipeline DIR)")
    g.add_argument("--pipeline", metavar="DIR", default=None,
                   help="a diffusers flow-matching pipeline folder (save_pretrained: SD3, Flux) instead of --ckpt")
    g.add_argument("--prompt", default=None, help=prompt_help)
    g.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (SD3: classifier-free guidance, default 7; Flux dev: distilled guidance, "
                        "default 3.5; Flux schnell: none)")
    g.add_argument("--negative-prompt", default=None, help="SD3: the unconditional branch's prompt (default '')")
    g.add_argument("--height", type=C.positive_int, default=None, help="image height in pixels")
    g.add_argument("--width", type=C.positive_int, default=None, help="image width in pixels")
    g.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                   help="the pipeline's weights dtype (latents stay float32)")
    if "--device" not in p._option_string_actions:
        C.add_device(p)


def _load(args: argparse.Namespace):
    from ..adapters import FlowPipeline

    folder = args.pipeline or args.ckpt
    device = C.device_of(args.device)
    if not Path(folder).exists():
        raise CLIError(f"--pipeline: no folder at {folder!r}")
    if not is_pipeline_folder(folder):
        raise CLIError(f"--pipeline {folder!r} is not a diffusers pipeline folder (no model_index.json); expected "
                       "the folder written by pipeline.save_pretrained(...)")
    _quiet_transformers()
    try:
        pipe = FlowPipeline.from_pretrained(folder, torch_dtype=_DTYPES[args.dtype], device=device)
    except (ImportError, CLIError):
        raise
    except (TypeError, ValueError) as e:
        raise CLIError(f"--pipeline {folder!r}: {e}") from None
    except Exception as e:  # diffusers' own loading errors (corrupt weights, missing files, ...)
        raise CLIError(f"--pipeline {folder!r} could not be loaded: {type(e).__name__}: "
                       f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    return pipe


def _quiet_transformers() -> None:
    """transformers and diffusers log advice (optional image processors, accelerate) and show loading bars; the
    CLI shows errors and its own sampling progress only."""
    for name in ("transformers", "diffusers"):
        try:
            logging = __import__(name).utils.logging
            logging.set_verbosity_error()
            logging.disable_progress_bar()
        except (ImportError, AttributeError):
            pass


def _size(pipe, args) -> tuple[int, int]:
    return pipe.check_size(args.height, args.width)


def _input(pipe, args, what: str = "--input") -> torch.Tensor:
    from ..data.images import load_image

    size = _size(pipe, args) if args.height is not None or args.width is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = load_image(args.input, size=size, multiple=pipe._multiple(), what=what)
    for w in caught:
        print(f"steerflow: warning: {w.message}", file=sys.stderr)
    pipe.check_size(x.shape[2], x.shape[3])
    return x.to(pipe.device)


def _file_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file as stored."""
    from PIL import Image

    with Image.open(path) as img:
        return img.size[1], img.size[0]


def _prompt(pipe, args, *, required: bool = True) -> str | None:
    if args.prompt is None:
        if required:
            raise CLIError("--pipeline needs --prompt (the text to generate from)")
        return None
    if not pipe.has_text_encoders:
        raise CLIError(f"--prompt: the pipeline at {args.pipeline or args.ckpt!r} has no text encoder, so it cannot "
                       "encode a prompt (save the pipeline with its text encoders)")
    return args.prompt


def _image_out(path: str) -> Path | None:
    """A file output (.png/.jpg) or ``None`` for a directory output."""
    p = Path(path)
    if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
        return p
    if p.suffix:
        raise CLIError(f"--out must be a .png/.jpg file or a directory, got {path!r}")
    return None


def run_sample(args: argparse.Namespace) -> int:
    from ..data.images import save_image

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".npy"):
        raise CLIError(f"--out for a pipeline must be a .png/.jpg image grid (or .npy latents), got {args.out!r}")
    pipe = _load(args)
    prompt = _prompt(pipe, args)
    height, width = _size(pipe, args)
    steps = args.steps or 28
    t0 = time.perf_counter()
    images = pipe.generate(prompt, n=args.n, steps=steps, guidance_scale=args.guidance,
                           negative_prompt=args.negative_prompt, height=height, width=width,
                           generator=C.generator(args.seed), method=args.method or "euler", progress=not getattr(args, "quiet", False),
                           output="latent" if out.suffix.lower() == ".npy" else "image")
    seconds = time.perf_counter() - t0
    if out.suffix.lower() == ".npy":
        C.save_npy(out, images.float().cpu().numpy())
    else:
        save_image(images, out)
    print(f"steerflow sample: {images.shape[0]} image(s) of {prompt!r}, {steps} steps, {seconds:.1f} s -> {out}",
          file=sys.stderr)
    return 0


def _pixel_task(args, shape: tuple[int, int, int], input_size: tuple[int, int]):
    """The pixel-space operator of ``--task`` (:func:`steerflow.cli.steer.build_task`; 70 % of the pixels hidden
    for ``--mask random``); a mask image must have the input file's size (it is resized with the input,
    nearest neighbour)."""
    from ..data.images import load_mask
    from ..steering.operators import Mask
    from .steer import build_task

    _, H, W = shape
    if args.mask not in (None, "box") and args.task != "inpaint":
        raise CLIError(f"--mask is for --task inpaint, not {args.task}")
    if args.task == "inpaint" and args.mask not in (None, "box", "random"):
        keep = load_mask(args.mask, size=input_size, what="--mask")
        if tuple(keep.shape) != (H, W):
            keep = torch.nn.functional.interpolate(keep[None, None].float(), size=(H, W), mode="nearest")[0, 0] > 0.5
        return Mask(keep.expand(shape).clone())
    name = "random" if args.task == "inpaint" and args.mask == "random" else args.task
    try:
        return build_task(name, shape, generator=C.generator(args.seed + 1), p_observed=0.3, factor=args.factor,
                          blur=args.blur, blur_size=args.blur_size, blur_std=args.blur_std,
                          blur_angle=args.blur_angle)
    except ValueError as e:
        raise CLIError(f"--task {args.task}: {e}") from None


def run_steer(args: argparse.Namespace) -> int:
    from ..metrics.cost import Cost
    from .steer import _image_metrics, build_method

    if args.task not in PIPELINE_TASKS:
        raise CLIError(f"--task {args.task} is not a pipeline task; expected one of {list(PIPELINE_TASKS)}")
    if args.input is None:
        raise CLIError(f"--task {args.task} needs --input (the image to measure)")
    file_out = _image_out(args.out)
    pipe = _load(args)
    prompt = _prompt(pipe, args, required=False) or ""
    x_true = _input(pipe, args)
    shape = tuple(x_true.shape[1:])
    A = _pixel_task(args, shape, _file_size(args.input))
    gen = C.generator(args.seed)
    with torch.no_grad():
        Ax = A(x_true)
        y = Ax + args.noise * torch.randn(Ax.shape, generator=gen).to(Ax)
    method = args.method or "flowchef"
    space = args.space
    if space == "auto":
        space = "latent" if method in LINEAR_ONLY else "pixel"
    reps = args.ensemble if method == "enkg" else 1
    if method == "unguided":
        guidance = None
    else:
        if space == "latent":
            op, y_m, sigma = *pipe.latent_measurement(A, y), args.latent_noise
        else:
            op, y_m, sigma = pipe.pixel_operator(A), y, args.noise
        try:
            guidance = build_method(method, op, y_m, sigma, scale=args.scale, ensemble_size=reps,
                                    window=args.guidance_window)
        except ValueError as e:
            raise CLIError(f"--method {method}: {e}") from None
    cost = Cost()
    t0 = time.perf_counter()
    z = pipe.generate(prompt, n=reps, steps=args.steps or 28, guidance_scale=args.guidance,
                      negative_prompt=args.negative_prompt, height=shape[1], width=shape[2], generator=gen,
                      guidance=guidance, method="euler", progress=not getattr(args, "quiet", False), cost=cost, output="latent")
    with torch.no_grad():
        result = pipe.decode(z.mean(0, keepdim=True))  # EnKG: the ensemble mean
    seconds = time.perf_counter() - t0
    metrics = {"task": args.task, "method": method, "space": space, "prompt": prompt, "noise": args.noise,
               "steps": args.steps or 28, "seed": args.seed, "scale": args.scale, **cost.as_dict(),
               "seconds": seconds, "ensemble": reps, **_image_metrics(result.float().cpu(), x_true.float().cpu())}
    where = _write(args.out, file_out, result, {"input": x_true, "measurement": _show(y, shape), "result": result},
                   "metrics.json", metrics)
    print(f"steerflow steer: {args.task} with {method} ({space} space): PSNR {metrics['psnr_db']:.2f} dB to the "
          f"input, {seconds:.1f} s -> {where}", file=sys.stderr)
    return 0


def _write(out: str, file_out: Path | None, result: torch.Tensor, panels: dict[str, torch.Tensor], record_name: str,
           record: dict) -> Path:
    """``--out`` a .png/.jpg: the result alone; a directory: each panel as ``<name>.png``, a ``grid.png`` of the
    panels side by side and the run's record as JSON. Returns where it wrote."""
    from ..data.images import save_image

    if file_out is not None:
        save_image(result, file_out)
        return file_out
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    for name, image in panels.items():
        save_image(image, d / f"{name}.png")
    save_image(torch.cat([p.float().cpu() for p in panels.values()]), d / "grid.png", nrow=len(panels))
    C.write_json(d / record_name, record)
    return d


def _show(y: torch.Tensor, shape) -> torch.Tensor:
    """A measurement at the image's size and channel count, for pictures."""
    y = y.float()
    if y.shape[-2:] != tuple(shape[1:]):
        y = torch.nn.functional.interpolate(y, size=tuple(shape[1:]), mode="nearest")
    if y.shape[1] != shape[0]:
        y = y.expand(-1, shape[0], -1, -1)
    return y.clamp(-1, 1)


def run_invert(args: argparse.Namespace) -> int:
    if not str(args.out).endswith(".npy"):
        raise CLIError(f"--out must end in .npy (the latent noise), got {args.out!r}")
    pipe = _load(args)
    prompt = _prompt(pipe, args, required=False) or ""
    x = _input(pipe, args)
    z = pipe.invert(x, prompt, steps=args.steps or 28, gamma=args.gamma, generator=C.generator(args.seed),
                    guidance_scale=args.guidance if pipe.kind == "flux" else None, progress=not getattr(args, "quiet", False))
    C.save_npy(args.out, z.float().cpu().numpy())
    print(f"steerflow invert: {x.shape[0]} image(s) -> latent noise {tuple(z.shape)} in {args.out}", file=sys.stderr)
    return 0


def run_edit(args: argparse.Namespace) -> int:
    file_out = _image_out(args.out)
    pipe = _load(args)
    prompt = _prompt(pipe, args)
    x = _input(pipe, args)
    t0 = time.perf_counter()
    out = pipe.edit(x, prompt, source_prompt=args.source_prompt, steps=args.steps or 28, gamma=args.gamma,
                    eta=args.eta, window=args.window, guidance_scale=args.guidance,
                    generator=C.generator(args.seed), progress=not getattr(args, "quiet", False))
    seconds = time.perf_counter() - t0
    record = {"prompt": prompt, "source_prompt": args.source_prompt, "eta": args.eta, "gamma": args.gamma,
              "window": list(args.window), "steps": args.steps or 28, "seed": args.seed, "seconds": seconds}
    where = _write(args.out, file_out, out, {"input": x, "result": out}, "edit.json", record)
    print(f"steerflow edit: {x.shape[0]} image(s) toward {prompt!r}, {seconds:.1f} s -> {where}", file=sys.stderr)
    return 0
