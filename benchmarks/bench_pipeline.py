"""FlowPipeline against diffusers' own pipelines, on the CPU: parity of the outputs and the sampling loop's overhead.

1. **Parity.** For SD3 (CFG, static shift 1 and 3, dynamic μ-shift) and Flux (dev: guidance embedding, μ-shift;
   schnell: none, shift 1 and 3), tiny random-weight pipelines saved with ``save_pretrained`` and loaded back:
   ``steerflow.sample`` on ``FlowPipeline.velocity`` against the pipeline's ``__call__`` with the same noise and
   prompt, in latents (``output_type="latent"``) and decoded images. Float32; max absolute difference.
2. **Loop overhead.** The same transformer driven by the pipeline's ``__call__`` (prompt embeddings passed in,
   latents out: its loop, scheduler and bookkeeping) and by ``steerflow.sample`` (FlowPipeline's velocity,
   Euler on the scheduler's grid), interleaved, ``--repeats`` times each; ratio of medians. On a tiny model
   (per-step Python overhead dominates) and on a mid-sized SD3 / Flux configuration (the transformer dominates,
   as on real models). One CPU thread.

Run:  python benchmarks/bench_pipeline.py            (≈ 3 min; writes benchmarks/results/pipeline.{json,md})
      python benchmarks/bench_pipeline.py --quick    (fewer repeats and steps)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import steerflow  # noqa: E402
from steerflow.adapters import FlowPipeline  # noqa: E402
from steerflow.adapters.pipeline import unpack_latents  # noqa: E402
from steerflow.adapters.tiny import save_tiny_pipeline  # noqa: E402

PROMPT = "a photo of a cat"
CASES = [("sd3", {"shift": 1.0}, 7.0), ("sd3", {"shift": 3.0}, 7.0), ("sd3", {"use_dynamic_shifting": True}, 7.0),
         ("flux-dev", {}, 3.5), ("flux-dev", {"use_dynamic_shifting": False, "shift": 3.0}, 3.5),
         ("flux-schnell", {"shift": 1.0}, None), ("flux-schnell", {"shift": 3.0}, None)]
MID_SD3 = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=32, num_attention_heads=8,
               joint_attention_dim=256, caption_projection_dim=256, pooled_projection_dim=256, out_channels=16,
               pos_embed_max_size=64)
MID_FLUX = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
                num_attention_heads=8, joint_attention_dim=256, pooled_projection_dim=256, guidance_embeds=True,
                axes_dims_rope=(8, 12, 12))


def parity(folders: dict, steps: int) -> list[dict]:
    import diffusers

    rows = []
    for kind, sched, w in CASES:
        fp = FlowPipeline.from_pretrained(folders[kind])
        cfg = dict(fp.scheduler.config)
        cfg.update(sched)
        fp.pipeline.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
        fp.pipeline.set_progress_bar_config(disable=True)
        kw = {} if w is None else {"guidance_scale": w}
        ref = fp.pipeline(PROMPT, height=32, width=32, num_inference_steps=steps,
                          generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
        ref_img = fp.pipeline(PROMPT, height=32, width=32, num_inference_steps=steps,
                              generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
        if fp.kind == "flux":
            ref = unpack_latents(ref, 16, 16)
        z0 = fp.noise(1, height=32, width=32, generator=torch.Generator().manual_seed(0))
        z = steerflow.sample(fp.velocity(PROMPT, guidance_scale=w), z0, ts=fp.time_grid(steps, height=32, width=32))
        img = (fp.decode(z) / 2 + 0.5).clamp(0, 1)
        rows.append({"pipeline": kind, "scheduler": sched, "guidance_scale": w, "steps": steps,
                     "max_abs_latent": float((z - ref).abs().max()), "max_abs_image": float((img - ref_img).abs().max()),
                     "latent_scale": float(ref.abs().max())})
    return rows


def _mid_pipeline(kind: str, folder: Path):
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  layers_per_block=1, latent_channels=16, norm_num_groups=4, use_quant_conv=False,
                                  use_post_quant_conv=False, scaling_factor=1.5, shift_factor=0.06)
    if kind == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            transformer=diffusers.SD3Transformer2DModel(**MID_SD3), text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    else:
        pipe = diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
            vae=vae, transformer=diffusers.FluxTransformer2DModel(**MID_FLUX), text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None)
    for m in (pipe.transformer, pipe.vae):
        m.eval().requires_grad_(False)
    pipe.save_pretrained(str(folder))
    return FlowPipeline.from_pretrained(folder)


def overhead(fp: FlowPipeline, label: str, steps: int, repeats: int, size: int) -> dict:
    from steerflow.adapters import PromptEmbeds

    fp.pipeline.set_progress_bar_config(disable=True)
    tcfg = fp.transformer.config
    g = torch.Generator().manual_seed(0)
    seq = 64
    embeds = PromptEmbeds(torch.randn(1, seq, tcfg.joint_attention_dim, generator=g),
                          torch.randn(1, tcfg.pooled_projection_dim, generator=g),
                          torch.zeros(seq, 3) if fp.kind == "flux" else None)
    negative = PromptEmbeds(torch.randn(1, seq, tcfg.joint_attention_dim, generator=g),
                            torch.randn(1, tcfg.pooled_projection_dim, generator=g))
    w = 7.0 if fp.kind == "sd3" else 3.5

    def theirs():
        kw = dict(prompt_embeds=embeds.embeds, pooled_prompt_embeds=embeds.pooled, num_inference_steps=steps,
                  height=size, width=size, guidance_scale=w, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
        if fp.kind == "sd3":
            kw.update(negative_prompt_embeds=negative.embeds, negative_pooled_prompt_embeds=negative.pooled)
        with torch.no_grad():
            return fp.pipeline(**kw).images

    def ours():
        v = fp.velocity(prompt_embeds=embeds, guidance_scale=w, negative_prompt_embeds=negative if fp.kind == "sd3" else None)
        z0 = fp.noise(1, height=size, width=size, generator=torch.Generator().manual_seed(0))
        return steerflow.sample(v, z0, ts=fp.time_grid(steps, height=size, width=size))

    a, b = theirs(), ours()  # warm-up; also the two give the same latents
    if fp.kind == "flux":
        a = unpack_latents(a, *b.shape[2:])
    max_diff = float((a - b).abs().max())
    t_theirs, t_ours = [], []
    for _ in range(repeats):
        for fn, acc in ((theirs, t_theirs), (ours, t_ours)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    med_t, med_o = statistics.median(t_theirs), statistics.median(t_ours)
    return {"model": label, "transformer_params": sum(p.numel() for p in fp.transformer.parameters()),
            "size": size, "steps": steps, "repeats": repeats, "pipeline_seconds": med_t, "steerflow_seconds": med_o,
            "ratio": med_o / med_t, "ratio_min": min(t_ours) / min(t_theirs), "max_abs_latent": max_diff}


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["# FlowPipeline vs diffusers pipelines (CPU)", "",
             f"torch {result['torch']}, diffusers {result['diffusers']}, one CPU thread. "
             "Produced by `python benchmarks/bench_pipeline.py`.", "",
             "## Parity with the pipeline's own `__call__` (float32, same noise and prompt)", "",
             "| pipeline | scheduler | guidance | steps | max abs Δ latents | max abs Δ image [0, 1] |",
             "|---|---|---:|---:|---:|---:|"]
    for r in result["parity"]:
        lines.append(f"| {r['pipeline']} | {r['scheduler'] or 'as saved'} | {r['guidance_scale']} | {r['steps']} | "
                     f"{r['max_abs_latent']:.1e} | {r['max_abs_image']:.1e} |")
    lines += ["", "## Sampling-loop overhead (`steerflow.sample` ÷ the pipeline's `__call__`, same transformer)", "",
              "| model | transformer params | image | steps | pipeline s | steerflow s | ratio (medians) | ratio (best) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["overhead"]:
        lines.append(f"| {r['model']} | {r['transformer_params']:,} | {r['size']}² | {r['steps']} | "
                     f"{r['pipeline_seconds']:.3f} | {r['steerflow_seconds']:.3f} | {r['ratio']:.3f} | "
                     f"{r['ratio_min']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    import diffusers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    steps, repeats = (6, 3) if args.quick else (28, 7)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {k: save_tiny_pipeline(k, Path(tmp) / k) for k in ("sd3", "flux-dev", "flux-schnell")}
        result = {"torch": torch.__version__, "diffusers": diffusers.__version__, "parity": parity(folders, steps)}
        rows = [overhead(FlowPipeline.from_pretrained(folders["sd3"]), "tiny SD3", steps, repeats, 32),
                overhead(FlowPipeline.from_pretrained(folders["flux-dev"]), "tiny Flux dev", steps, repeats, 32)]
        for kind in ("sd3", "flux"):
            fp = _mid_pipeline(kind, Path(tmp) / f"mid-{kind}")
            rows.append(overhead(fp, f"mid {'SD3' if kind == 'sd3' else 'Flux dev'}", steps, repeats, 64))
        result["overhead"] = rows
    write(result, Path(args.out))
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
