"""Steering SD3-medium / Flux-sized pipelines on a GPU: wall time and peak memory of unguided sampling vs FlowChef
vs DPS inpainting (measurement in pixel space, through the VAE decoder), and the loop overhead of
``steerflow.sample`` against the diffusers pipeline's own ``__call__`` for the same transformer.

The transformers and VAEs have the real SD3-medium and Flux-dev configurations with random weights (weights do not
change cost; nothing is downloaded); prompts are random embeddings of the real shapes (the text encoders are not
part of the per-step cost). bf16 weights, float32 latents, 1024² images, 28 Euler steps.

Targets (issue 14): FlowChef ≤ 1.10× the unguided time and ≤ 1.15× its peak memory; DPS measured beside it.

Run:  python benchmarks/gpu_pipeline.py                         (CUDA, real sizes; writes $OUT/gpu_pipeline.json)
      python benchmarks/gpu_pipeline.py --device cpu --quick    (smoke test: tiny configs, 64² images, 3 steps)
Options: --models sd3 flux, --size 1024, --steps 28, --repeats 2, --decoder-checkpointing, --out PATH.
Every section is guarded: an error (e.g. out of memory for DPS through Flux) is recorded and the run continues.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import steerflow  # noqa: E402
from steerflow.adapters import FlowPipeline, PromptEmbeds  # noqa: E402
from steerflow.steering import DPS, FlowChef, Mask  # noqa: E402

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           latent_channels=16, norm_num_groups=32, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False)
TINY_SD3 = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=16,
                pos_embed_max_size=32)
TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
TINY_VAE = dict(VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64)


def build(kind: str, quick: bool, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A pipeline object with random-weight transformer and VAE of the real configuration (no text encoders) and
    random prompt embeddings of the real shapes."""
    import diffusers

    torch.manual_seed(seed)
    if kind == "sd3":
        transformer = diffusers.SD3Transformer2DModel(**(TINY_SD3 if quick else SD3_MEDIUM))
        vae = diffusers.AutoencoderKL(**(TINY_VAE if quick else VAE), scaling_factor=1.5305, shift_factor=0.0609)
        pipe = diffusers.StableDiffusion3Pipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, transformer=transformer,
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
            tokenizer_3=None)
        dim, pooled, seq = transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim, 333
    else:
        transformer = diffusers.FluxTransformer2DModel(**(TINY_FLUX if quick else FLUX_DEV))
        vae = diffusers.AutoencoderKL(**(TINY_VAE if quick else VAE), scaling_factor=0.3611, shift_factor=0.1159)
        pipe = diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                                max_shift=1.15),
            vae=vae, transformer=transformer, text_encoder=None, tokenizer=None, text_encoder_2=None,
            tokenizer_2=None)
        dim, pooled, seq = transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim, 512
    for m in (transformer, vae):
        m.eval().requires_grad_(False)
    pipe = pipe.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    embeds = PromptEmbeds(torch.randn(1, seq, dim, generator=g), torch.randn(1, pooled, generator=g),
                          torch.zeros(seq, 3) if kind == "flux" else None).to(device, dtype)
    negative = PromptEmbeds(torch.randn(1, seq, dim, generator=g), torch.randn(1, pooled, generator=g)).to(device, dtype)
    return FlowPipeline(pipe), embeds, negative


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn, device, repeats: int):
    """Best wall time over ``repeats`` runs (after one warm-up) and the peak memory of one run."""
    fn()
    _sync(device)
    times = []
    peak = None
    for _ in range(repeats):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        del out
    return min(times), peak


def run_model(kind: str, args, device, dtype) -> dict:
    fp, embeds, negative = build(kind, args.quick, device, dtype)
    if args.decoder_checkpointing:
        fp.vae.enable_gradient_checkpointing()
    size = args.size
    w = 7.0 if kind == "sd3" else 3.5
    v = fp.velocity(prompt_embeds=embeds, guidance_scale=w, negative_prompt_embeds=negative if kind == "sd3" else None)
    ts = fp.time_grid(args.steps, height=size, width=size)
    z0 = fp.noise(1, height=size, width=size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x_true = fp.decode(torch.randn_like(z0)).clamp(-1, 1)
    A = Mask.box(tuple(x_true.shape[1:]), size // 4, size // 4, size // 2, size // 2)
    y = A(x_true)
    op = fp.pixel_operator(A)
    out: dict = {"kind": kind, "size": size, "steps": args.steps, "guidance_scale": w,
                 "transformer_params": sum(p.numel() for p in fp.transformer.parameters()),
                 "vae_params": sum(p.numel() for p in fp.vae.parameters())}

    def plain():
        return steerflow.sample(v, z0, ts=ts)

    def flowchef():
        return steerflow.sample(v, z0, ts=ts, guidance=FlowChef(op, y, 0.0, step_size=args.flowchef_step))

    def dps():
        return steerflow.sample(v, z0, ts=ts, guidance=DPS(op, y, 0.0, scale=args.dps_scale))

    def pipeline_loop():  # the diffusers pipeline's own __call__ on the same transformer (latents only)
        kw = dict(prompt_embeds=embeds.embeds, pooled_prompt_embeds=embeds.pooled, num_inference_steps=args.steps,
                  height=size, width=size, guidance_scale=w, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
        if kind == "sd3":
            kw.update(negative_prompt_embeds=negative.embeds, negative_pooled_prompt_embeds=negative.pooled)
        fp.pipeline.set_progress_bar_config(disable=True)
        return fp.pipeline(**kw).images

    for name, fn in (("pipeline_call", pipeline_loop), ("unguided", plain), ("flowchef", flowchef), ("dps", dps)):
        try:
            seconds, peak = _measure(fn, device, args.repeats)
            out[name] = {"seconds": seconds, "peak_memory_bytes": peak}
        except Exception as e:  # e.g. CUDA out of memory for DPS through the transformer
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            traceback.print_exc()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = out.get("unguided", {})
    for name in ("pipeline_call", "flowchef", "dps"):
        r = out.get(name, {})
        if "seconds" in r and "seconds" in base:
            r["time_ratio_vs_unguided"] = r["seconds"] / base["seconds"]
            if r.get("peak_memory_bytes") and base.get("peak_memory_bytes"):
                r["memory_ratio_vs_unguided"] = r["peak_memory_bytes"] / base["peak_memory_bytes"]
    if "seconds" in out.get("pipeline_call", {}) and "seconds" in base:
        out["loop_overhead_steerflow_over_pipeline"] = base["seconds"] / out["pipeline_call"]["seconds"]
    fc = out.get("flowchef", {})
    out["flowchef_targets"] = {"time_le_1.10": fc.get("time_ratio_vs_unguided", float("inf")) <= 1.10,
                               "memory_le_1.15": (fc.get("memory_ratio_vs_unguided") or float("inf")) <= 1.15}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny configs, 64² images, 3 steps (CPU smoke test)")
    p.add_argument("--models", nargs="+", choices=("sd3", "flux"), default=["sd3", "flux"])
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--flowchef-step", type=float, default=0.5)
    p.add_argument("--dps-scale", type=float, default=0.5)
    p.add_argument("--decoder-checkpointing", action="store_true",
                   help="recompute the VAE decoder's activations in FlowChef's backward pass (less memory)")
    default_out = (Path(os.environ["OUT"]) / "gpu_pipeline.json" if os.environ.get("OUT")
                   else ROOT / "benchmarks" / "results" / "gpu_pipeline.json")
    p.add_argument("--out", default=str(default_out))
    args = p.parse_args(argv)
    args.size = args.size or (64 if args.quick else 1024)
    args.steps = args.steps or (3 if args.quick else 28)
    args.repeats = args.repeats or (1 if args.quick else 2)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "dtype": str(dtype), "quick": args.quick,
              "decoder_checkpointing": args.decoder_checkpointing, "models": {}}
    for kind in args.models:
        try:
            result["models"][kind] = run_model(kind, args, device, dtype)
        except Exception as e:
            traceback.print_exc()
            result["models"][kind] = {"error": f"{type(e).__name__}: {e}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    failed = [k for k, r in result["models"].items()
              if "error" in r or any("error" in r.get(s, {}) for s in ("unguided", "flowchef", "pipeline_call"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
