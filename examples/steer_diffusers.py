"""Steer Stable Diffusion 3 / Flux from a local folder: inpaint a photo with FlowChef, then edit it with RF-Inversion.

    python examples/steer_diffusers.py --pipeline path/to/sd3 --image photo.png --prompt "a cat on a sofa"
    python examples/steer_diffusers.py --tiny          # a tiny random-weight SD3 built here: runs in seconds, no download

The pipeline folder is what diffusers' ``save_pretrained`` writes (e.g. a snapshot of
stabilityai/stable-diffusion-3-medium-diffusers or black-forest-labs/FLUX.1-dev on your disk). FlowChef measures in
pixel space through the VAE decoder and never differentiates the transformer; the latent-space variant serves
methods that need a linear operator. Outputs go to ``--out`` (default ``steer_diffusers_out/``).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import steerflow
from steerflow.adapters import FlowPipeline
from steerflow.data import load_image, save_image
from steerflow.steering import FlowChef, Mask, SteerflowDefault


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", help="diffusers pipeline folder (SD3 or Flux)")
    p.add_argument("--image", help="a photo (PNG/JPEG); default: a synthetic test pattern")
    p.add_argument("--prompt", default="a photo of a cat")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--tiny", action="store_true", help="use a tiny random-weight SD3 pipeline (smoke run)")
    p.add_argument("--out", default="steer_diffusers_out")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.tiny:  # stands in for a real checkpoint: same classes, random weights, 32² images
        from steerflow.adapters.tiny import save_tiny_pipeline

        args.pipeline = str(save_tiny_pipeline("sd3", Path(tempfile.mkdtemp()) / "sd3"))
        args.steps = min(args.steps, 6)
    if args.pipeline is None:
        p.error("pass --pipeline DIR (or --tiny)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    # --- the five lines a user writes ---------------------------------------------------------------
    pipe = FlowPipeline.from_pretrained(args.pipeline, torch_dtype=dtype, device=device)
    size = pipe.default_size
    x = load_image(args.image, size=(size, size)).to(device) if args.image else _pattern(size).to(device)
    A = Mask.box(tuple(x.shape[1:]), size // 4, size // 4, size // 2, size // 2)   # hide the centre
    result = pipe.generate(args.prompt, steps=args.steps, guidance=FlowChef(pipe.pixel_operator(A), A(x), 0.0,
                                                                             step_size=0.5),
                           generator=torch.Generator().manual_seed(0), height=size, width=size, progress=True)
    # ------------------------------------------------------------------------------------------------
    save_image(torch.cat([x, A(x), result.to(x)]).float(), out / "inpaint_flowchef.png", nrow=3)

    # the same problem measured in latent space, for a method that needs a linear operator
    A_z, y_z = pipe.latent_measurement(A, A(x))
    latent = pipe.generate(args.prompt, steps=args.steps, guidance=SteerflowDefault(A_z, y_z, 0.1),
                           generator=torch.Generator().manual_seed(0), height=size, width=size)
    save_image(torch.cat([x, latent.to(x)]).float(), out / "inpaint_latent_default.png", nrow=2)

    # RF-Inversion: encode → controlled inversion → generation under a new prompt, pulled toward the photo
    edited = pipe.edit(x, args.prompt + ", oil painting", steps=args.steps, gamma=0.5, eta=0.9, window=(0.0, 0.25),
                       generator=torch.Generator().manual_seed(0), progress=True)
    save_image(torch.cat([x, edited.to(x)]).float(), out / "edit.png", nrow=2)
    print(f"{pipe}: wrote {sorted(f.name for f in out.iterdir())} to {out}/ "
          f"(steerflow {steerflow.__version__})")


def _pattern(size: int) -> torch.Tensor:
    """A smooth colourful test image (1, 3, size, size) in [-1, 1]."""
    u = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(u, u, indexing="ij")
    return torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), torch.sin(2 * (xx + yy))])[None] * 0.8


if __name__ == "__main__":
    main()
