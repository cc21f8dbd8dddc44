"""Tiny random-weight diffusers pipelines (SD3, Flux dev / schnell) built from configs, with no download.

They have the real classes, the real scheduler and the real text-encoder / tokenizer stack, only small:
a few thousand parameters per component, 32 × 32 images. Tests, the CPU smoke mode of the GPU benchmark
and the diffusers example use them to exercise every code path of :class:`~steerflow.adapters.FlowPipeline`
(and the CLI on a ``save_pretrained`` folder) without network access. The outputs are noise-like images:
the weights are random.

Tokenizers are built from a vocabulary written here (printable ASCII characters), so the prompt text
really goes through tokenisation and the text encoders.
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["TINY_KINDS", "tiny_pipeline", "save_tiny_pipeline"]

TINY_KINDS = ("sd3", "flux-dev", "flux-schnell")
"""The tiny pipelines :func:`tiny_pipeline` builds."""

_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
             max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="gelu")


def _imports():
    try:
        import diffusers
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"tiny diffusers pipelines need diffusers and transformers ({e.name} is missing): "
                          "pip install 'steerflow[diffusers]'") from None
    return diffusers, transformers


def _clip_tokenizer(folder: Path):
    """A CLIP byte-level BPE tokenizer whose vocabulary is the printable ASCII characters (no merges)."""
    _, tf = _imports()
    chars = [c for c in string.printable if not c.isspace()]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return tf.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                            pad_token="<|endoftext|>"), len(vocab)


def _t5_tokenizer():
    """A T5 unigram tokenizer whose pieces are the printable ASCII characters (and the word-start mark)."""
    _, tf = _imports()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in string.printable if not c.isspace()]
    pieces += [("\u2581" + c, -4.0) for c in string.printable if not c.isspace()]
    if int(tf.__version__.split(".")[0]) >= 5:
        tok = tf.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    else:  # transformers 4: the fast tokenizer wraps a ``tokenizers`` object
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        backend = Tokenizer(models.Unigram(pieces, unk_id=2))
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        tok = tf.T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                 extra_ids=0, model_max_length=512)
    return tok, len(pieces)


def _t5_encoder(vocab_size: int):
    _, tf = _imports()
    cfg = tf.T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return tf.T5EncoderModel(cfg)


def _tiny_vae(**factors):
    """A two-block VAE (downsampling factor 2, 4 latent channels) with the given scaling / shift factors."""
    diffusers, _ = _imports()
    return diffusers.AutoencoderKL(sample_size=32, in_channels=3, out_channels=3,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                   layers_per_block=1, latent_channels=4, norm_num_groups=4, use_quant_conv=False,
                                   use_post_quant_conv=False, **factors)


def _eval(pipe):
    """Freshly built modules are in training mode (T5's dropout would make prompts random): as loaded."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe


def tiny_pipeline(kind: str = "sd3", *, seed: int = 0, work_dir: str | Path | None = None) -> Any:
    """A tiny random-weight ``StableDiffusion3Pipeline`` (``"sd3"``) or ``FluxPipeline`` (``"flux-dev"`` with a
    guidance embedding and the dynamic μ-shift, ``"flux-schnell"`` without either), float32 on the CPU.

    ``seed`` fixes the weights; ``work_dir`` holds the tokenizer's vocabulary files (a temporary folder if
    not given). Default image size 32 × 32 (latents 16 × 16: two VAE blocks).
    """
    diffusers, tf = _imports()
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; expected one of {list(TINY_KINDS)}")
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="steerflow-tiny-"))
    torch.manual_seed(seed)
    clip_tok, clip_vocab = _clip_tokenizer(work / "clip_vocab")
    t5_tok, t5_vocab = _t5_tokenizer()
    clip_cfg = tf.CLIPTextConfig(vocab_size=clip_vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1, **_TEXT)
    if kind == "sd3":
        vae = _tiny_vae(shift_factor=0.0609, scaling_factor=1.5035)
        transformer = diffusers.SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=2,
                                                      attention_head_dim=8, num_attention_heads=4,
                                                      caption_projection_dim=32, joint_attention_dim=32,
                                                      pooled_projection_dim=64, out_channels=4)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        return _eval(diffusers.StableDiffusion3Pipeline(
            scheduler=scheduler, vae=vae, transformer=transformer,
            text_encoder=tf.CLIPTextModelWithProjection(clip_cfg), tokenizer=clip_tok,
            text_encoder_2=tf.CLIPTextModelWithProjection(clip_cfg), tokenizer_2=clip_tok,
            text_encoder_3=_t5_encoder(t5_vocab), tokenizer_3=t5_tok))
    dev = kind == "flux-dev"
    vae = _tiny_vae(shift_factor=0.1159, scaling_factor=0.3611)
    transformer = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=16, num_attention_heads=2,
                                                   joint_attention_dim=32, pooled_projection_dim=32,
                                                   guidance_embeds=dev, axes_dims_rope=(4, 4, 8))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0 if dev else 1.0, use_dynamic_shifting=dev, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return _eval(diffusers.FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer,
                                        text_encoder=tf.CLIPTextModel(clip_cfg), tokenizer=clip_tok,
                                        text_encoder_2=_t5_encoder(t5_vocab), tokenizer_2=t5_tok))


def save_tiny_pipeline(kind: str, folder: str | Path, *, seed: int = 0) -> Path:
    """Build :func:`tiny_pipeline` and ``save_pretrained`` it to ``folder`` (safetensors); return the folder."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="steerflow-tiny-") as work:
        tiny_pipeline(kind, seed=seed, work_dir=work).save_pretrained(str(folder))
    return folder
