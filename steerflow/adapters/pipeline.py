"""A diffusers flow-matching pipeline (Stable Diffusion 3 / 3.5, Flux dev / schnell) as a steerflow flow.

:class:`FlowPipeline` owns, in one place, everything that sits between a diffusers pipeline and steerflow's
one sampler loop: prompt encoding (cached), classifier-free guidance (SD3's batch doubling, Flux's distilled
guidance embedding), Flux's latent packing and position ids, the scheduler's exact time grid (static shift and
the resolution-dependent μ-shift), the timestep scale (SD3 takes ``1000 σ``, Flux takes ``σ``), and the VAE
with its scaling and shift factors. After that a pipeline is an ordinary velocity field::

    pipe = FlowPipeline.from_pretrained("path/to/sd3", torch_dtype=torch.bfloat16, device="cuda")
    v = pipe.velocity("a photo of a cat", guidance_scale=7.0)        # v(z, t), steerflow's convention
    z = steerflow.sample(v, pipe.noise(4, generator=g), ts=pipe.time_grid(28))
    images = pipe.decode(z)                                            # (4, 3, H, W) in [-1, 1]

and every steerflow solver and steering method applies to it unchanged (pinned against the pipeline's own
``__call__`` by ``tests/test_pipeline.py``).

Conventions. Latents are kept *unpacked*, ``(b, C, H / f, W / f)`` with ``f`` the VAE's downsampling factor,
for SD3 and Flux alike (a latent-space mask or blur then means what it says); packing into Flux's
``(b, HW / 4, 4C)`` tokens happens inside the velocity call. Latents stay in the caller's dtype (float32 by
default) while the transformer runs in its own (bf16/fp16 pipelines): each call casts in and out. Time:
``t = 1 − σ`` as everywhere in steerflow (see :mod:`steerflow.adapters.diffusers`).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..steering.operators import AbstractLinearOperator, AbstractOperator, AvgPool, Blur, Colorize, Identity, Mask
from .diffusers import grid_from_scheduler

__all__ = ["FlowPipeline", "PipelineVelocity", "PromptEmbeds", "DecodedOperator", "PIPELINE_KINDS", "pack_latents",
           "unpack_latents"]

PIPELINE_KINDS = ("sd3", "flux")
"""The pipeline families :class:`FlowPipeline` understands (by their transformer class)."""

_TRANSFORMERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError("diffusers pipelines need the diffusers extra: pip install 'steerflow[diffusers]'") from None
    return diffusers


def _check_libraries(folder: Path) -> list[str]:
    """Name the extra to install when a component's library (transformers for text encoders) is missing;
    return the components the folder was saved without (``[null, null]`` in ``model_index.json``)."""
    import importlib.util
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(folder)!r}: model_index.json is not readable JSON ({type(e).__name__})") from None
    libraries = {v[0] for v in index.values() if isinstance(v, list) and v and isinstance(v[0], str)}
    for lib in sorted(libraries - {"diffusers"}):
        if importlib.util.find_spec(lib) is None:
            raise ImportError(f"the pipeline at {str(folder)!r} has components from {lib!r}, which is not installed: "
                              "pip install 'steerflow[diffusers]'")
    return [k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is None and v[1] is None]


def pack_latents(z: Tensor) -> Tensor:
    """Flux's tokens (b, h/2 · w/2, 4C) of unpacked latents (b, C, h, w): one token per 2 × 2 patch, row-major."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_latents`: (b, h/2 · w/2, 4C) tokens → (b, C, h, w) latents."""
    b, _, c4 = tokens.shape
    c = c4 // 4
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _check_output(output: str) -> None:
    if output not in ("image", "latent"):
        raise ValueError(f"output must be 'image' or 'latent', got {output!r}")


def _chunks(x: Tensor, size: int | None) -> tuple[Tensor, ...]:
    return x.split(size) if size else (x,)


@dataclass(frozen=True)
class PromptEmbeds:
    """Encoded prompts: token embeddings ``embeds`` (p, L, D), pooled embeddings ``pooled`` (p, P) and, for
    Flux, the text position ids ``text_ids`` (L, 3). ``p`` prompts serve a batch of ``b = k p`` latents:
    consecutive groups of ``k`` latents share a prompt."""

    embeds: Tensor
    pooled: Tensor
    text_ids: Tensor | None = None

    @property
    def batch(self) -> int:
        return self.embeds.shape[0]

    def expand_to(self, b: int) -> "PromptEmbeds":
        """The embeddings for a batch of ``b`` latents (each prompt repeated ``b / p`` times, consecutively)."""
        p = self.batch
        if b == p:
            return self
        if b % p:
            raise ValueError(f"a batch of {b} latents cannot share {p} prompts; the batch must be a multiple of the "
                             f"number of prompts (consecutive groups of latents share one prompt)")
        k = b // p
        return replace(self, embeds=self.embeds.repeat_interleave(k, 0), pooled=self.pooled.repeat_interleave(k, 0))

    def cat(self, other: "PromptEmbeds") -> "PromptEmbeds":
        """Both batches stacked (``self`` first); the text ids must agree."""
        if self.embeds.shape[1:] != other.embeds.shape[1:]:
            raise ValueError(f"prompt embeddings of shapes {tuple(self.embeds.shape)} and {tuple(other.embeds.shape)} "
                             "cannot be stacked (use the same max_sequence_length)")
        return replace(self, embeds=torch.cat([self.embeds, other.embeds]),
                       pooled=torch.cat([self.pooled, other.pooled]))

    def to(self, device=None, dtype=None) -> "PromptEmbeds":
        ids = self.text_ids.to(device=device) if self.text_ids is not None else None
        return PromptEmbeds(self.embeds.to(device=device, dtype=dtype), self.pooled.to(device=device, dtype=dtype), ids)


class FlowPipeline:
    """A diffusers flow-matching pipeline as a steerflow flow: velocity, time grid, noise, VAE, measurements.

    Args:
        pipeline: a loaded ``StableDiffusion3Pipeline`` / ``FluxPipeline`` (or any pipeline whose ``transformer``
            is an SD3 or Flux transformer and whose ``scheduler`` is a ``FlowMatchEulerDiscreteScheduler``).
        max_sequence_length: T5 tokens per prompt (default: the pipeline's own default, 256 for SD3, 512 for Flux).

    Use :meth:`from_pretrained` for a ``save_pretrained`` folder on disk.
    """

    def __init__(self, pipeline: Any, *, max_sequence_length: int | None = None) -> None:
        transformer = getattr(pipeline, "transformer", None)
        scheduler = getattr(pipeline, "scheduler", None)
        kind = _TRANSFORMERS.get(type(transformer).__name__)
        if kind is None:
            raise TypeError(f"{type(pipeline).__name__} is not a flow-matching pipeline steerflow knows: expected a "
                            f"transformer of type {sorted(_TRANSFORMERS)}, got {type(transformer).__name__}")
        if scheduler is None or not hasattr(scheduler, "sigmas") or "FlowMatch" not in type(scheduler).__name__:
            raise TypeError(f"{type(pipeline).__name__} has no flow-matching scheduler (got "
                            f"{type(scheduler).__name__}); steerflow needs FlowMatchEulerDiscreteScheduler")
        if scheduler.config.get("stochastic_sampling", False):
            raise ValueError("the scheduler is configured with stochastic_sampling=True, which is not an ODE; "
                             "steerflow integrates the deterministic flow (use RectifiedSDE for a stochastic one)")
        self.pipeline, self.kind = pipeline, kind
        self.max_sequence_length = int(max_sequence_length or (256 if kind == "sd3" else 512))
        self._prompt_cache: dict[tuple[str, int], PromptEmbeds] = {}

    # --- construction --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, max_sequence_length: int | None = None,
                        **kwargs: Any) -> "FlowPipeline":
        """Load a pipeline saved by diffusers' ``save_pretrained`` from a local folder (never the network).

        ``torch_dtype`` (e.g. ``torch.bfloat16``) and ``device`` as in diffusers; further keyword arguments go to
        ``DiffusionPipeline.from_pretrained`` (e.g. ``text_encoder_3=None`` to leave T5 out).
        """
        folder = Path(path)
        if not folder.exists():
            raise FileNotFoundError(f"no pipeline folder at {str(path)!r}")
        if not folder.is_dir():
            raise ValueError(f"{str(path)!r} is a file; expected a diffusers pipeline folder (save_pretrained)")
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"{str(path)!r} is not a diffusers pipeline folder (no model_index.json); expected the "
                             "folder written by pipeline.save_pretrained(...)")
        diffusers = _diffusers()
        for name in _check_libraries(folder):  # saved without it (e.g. no text encoders): load it as absent
            kwargs.setdefault(name, None)
        with warnings.catch_warnings():
            # newer diffusers renamed torch_dtype to dtype; the old name works in every supported version
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch_dtype,
                                                               local_files_only=True, **kwargs)
        if device is not None:
            pipe = pipe.to(device)
        return cls(pipe, max_sequence_length=max_sequence_length)

    def __repr__(self) -> str:
        return (f"FlowPipeline({type(self.pipeline).__name__}, kind={self.kind!r}, dtype={self.dtype}, "
                f"device={self.device})")

    # --- properties ----------------------------------------------------------------------------------
    @property
    def transformer(self) -> Any:
        return self.pipeline.transformer

    @property
    def vae(self) -> Any:
        return self.pipeline.vae

    @property
    def scheduler(self) -> Any:
        return self.pipeline.scheduler

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes: its execution device, which honours diffusers' CPU-offload hooks
        (without hooks, the transformer's device: diffusers' own lookup inspects every component's signature,
        ~10 ms a call)."""
        t = self.transformer
        if not any(hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook") for m in (t, self.vae)):
            param = next(t.parameters(), None)
            if param is not None and param.device.type != "meta":
                return param.device
        return torch.device(self.pipeline._execution_device)

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's dtype."""
        return self.transformer.dtype

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def default_size(self) -> int:
        """The pipeline's default image height and width in pixels."""
        return int(self.pipeline.default_sample_size * self.vae_scale_factor)

    @property
    def has_text_encoders(self) -> bool:
        """Whether prompts can be encoded (a pipeline saved or loaded without its text encoders cannot)."""
        return any(getattr(self.pipeline, n, None) is not None
                   for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))

    @property
    def guidance_embedded(self) -> bool:
        """Flux dev: the guidance scale is an input of the transformer (distilled guidance)."""
        return self.kind == "flux" and bool(self.transformer.config.get("guidance_embeds", False))

    @property
    def _patch(self) -> int:
        """Latent cells per image token along each axis (Flux packs 2 × 2; SD3 has its patch size)."""
        return 2 if self.kind == "flux" else int(self.transformer.config.get("patch_size", 1) or 1)

    def _multiple(self) -> int:
        return self.vae_scale_factor * self._patch

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """``(height, width)`` in pixels (the default size where ``None``); each must be a multiple of the
        VAE factor (× 2 for Flux's packing, × the patch size for SD3)."""
        height = int(height or self.default_size)
        width = int(width or self.default_size)
        m = self._multiple()
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(f"image height and width must be positive multiples of {m} for this pipeline, "
                             f"got {height}x{width}")
        return height, width

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """The (unpacked) latent shape ``(C, H / f, W / f)`` of an image of ``height × width`` pixels."""
        height, width = self.check_size(height, width)
        f = self.vae_scale_factor
        return (self.latent_channels, height // f, width // f)

    # --- noise and time -------------------------------------------------------------------------------
    def noise(self, n: int, *, height: int | None = None, width: int | None = None,
              generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """``n`` standard normal latents (n, C, h, w) on the pipeline's device — the same draw as the pipeline's
        ``prepare_latents`` for the same generator (drawn on the generator's device, then moved)."""
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        shape = (int(n), *self.latent_shape(height, width))
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(self.device)

    def mu(self, height: int | None = None, width: int | None = None) -> float | None:
        """The resolution-dependent shift ``μ`` of a dynamically shifted scheduler (``None`` for a static shift):
        linear in the number of image tokens between ``(base_image_seq_len, base_shift)`` and
        ``(max_image_seq_len, max_shift)``, as the pipelines compute it."""
        cfg = self.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return None
        _, h, w = self.latent_shape(height, width)
        seq = (h // self._patch) * (w // self._patch)
        base_seq, max_seq = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        base, top = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15 if self.kind == "flux" else 1.16)
        m = (top - base) / (max_seq - base_seq)
        return seq * m + base - m * base_seq

    def time_grid(self, steps: int, *, height: int | None = None, width: int | None = None,
                  mu: float | None = None) -> Tensor:
        """steerflow's increasing grid ``1 − σ`` (steps + 1,) float64 of the pipeline's scheduler for ``steps``
        steps at this image size — the scheduler's own ``set_timesteps`` on a copy (shift, μ-shift, terminal
        stretch, Karras/exponential/beta spacings included), so it is the grid the pipeline integrates."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        sched = copy.deepcopy(self.scheduler)
        kwargs: dict[str, Any] = {}
        if sched.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = self.mu(height, width) if mu is None else float(mu)
        if self.kind == "flux" and not sched.config.get("use_flow_sigmas", False):
            import numpy as np

            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)  # what FluxPipeline passes
        sched.set_timesteps(steps, device="cpu", **kwargs)
        return grid_from_scheduler(sched)

    # --- prompts --------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[str]) -> PromptEmbeds:
        """Encode one prompt or a list (cached per prompt text and sequence length; no gradients)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        parts = [self._encode_one(p) for p in prompts]
        if len(parts) == 1:
            return parts[0]
        out = parts[0]
        for p in parts[1:]:
            out = out.cat(p)
        return out

    def _encode_one(self, prompt: str) -> PromptEmbeds:
        key = (prompt, self.max_sequence_length)
        if key in self._prompt_cache:
            return self._prompt_cache[key]
        pipe = self.pipeline
        if not self.has_text_encoders:
            raise ValueError("this pipeline was loaded without text encoders, so it cannot encode a prompt; pass "
                             "prompt_embeds=PromptEmbeds(...) or load the pipeline with its text encoders")
        with torch.no_grad():
            if self.kind == "sd3":
                embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None,
                                                          device=self.device, do_classifier_free_guidance=False,
                                                          max_sequence_length=self.max_sequence_length)
                out = PromptEmbeds(embeds, pooled)
            else:
                embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=self.device,
                                                              max_sequence_length=self.max_sequence_length)
                out = PromptEmbeds(embeds, pooled, text_ids)
        self._prompt_cache[key] = out
        return out

    def velocity(self, prompt: str | Sequence[str] | None = None, *, guidance_scale: float | None = None,
                 negative_prompt: str | Sequence[str] | None = None, prompt_embeds: PromptEmbeds | None = None,
                 negative_prompt_embeds: PromptEmbeds | None = None) -> "PipelineVelocity":
        """The pipeline's velocity field ``v(z, t)`` for ``prompt`` (steerflow's convention, unpacked latents).

        ``guidance_scale``: SD3 — classifier-free guidance ``w`` on the doubled batch ``[negative, prompt]``
        (``w ≤ 1`` or ``None``: no guidance, one branch; the pipeline's default is 7.0); Flux dev — the distilled
        guidance passed to the transformer (default 3.5); Flux schnell — must be ``None`` (no guidance input).
        ``negative_prompt``: SD3's unconditional branch (default ``""``).
        """
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("velocity() needs a prompt or prompt_embeds")
            prompt_embeds = self.encode_prompt(prompt)
        elif prompt is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if self.kind == "sd3":
            cfg = guidance_scale is not None and guidance_scale > 1
            if cfg and negative_prompt_embeds is None:
                neg = negative_prompt if negative_prompt is not None else ""
                if isinstance(neg, str):
                    neg = [neg] * prompt_embeds.batch
                negative_prompt_embeds = self.encode_prompt(neg)
            return PipelineVelocity(self, prompt_embeds, guidance_scale=guidance_scale if cfg else None,
                                    negative=negative_prompt_embeds if cfg else None)
        if negative_prompt is not None or negative_prompt_embeds is not None:
            raise ValueError("Flux has no negative-prompt branch here; for true classifier-free guidance wrap the "
                             "field: ClassifierFreeGuidance(w, pipe.encode_prompt(p), pipe.encode_prompt(n))")
        if self.guidance_embedded:
            guidance_scale = 3.5 if guidance_scale is None else float(guidance_scale)
        elif guidance_scale is not None:
            raise ValueError("this Flux transformer has no guidance embedding (schnell-style); drop guidance_scale")
        return PipelineVelocity(self, prompt_embeds, guidance_scale=guidance_scale)

    # --- VAE --------------------------------------------------------------------------------------------
    def decode(self, latents: Tensor, *, chunk_size: int | None = None) -> Tensor:
        """Images (b, 3, H, W) in ``[−1, 1]`` (float32, not clipped) from unpacked latents (b, C, h, w):
        ``vae.decode(z / scaling_factor + shift_factor)``. Differentiable (FlowChef's gradients pass through
        the decoder only); ``chunk_size`` decodes that many latents at a time to bound memory."""
        self._check_latents(latents)
        scale, shift = self._vae_factors()
        out = [self.vae.decode((z / scale + shift).to(device=self.device, dtype=self.vae.dtype),
                               return_dict=False)[0].to(latents.dtype) for z in _chunks(latents, chunk_size)]
        return torch.cat(out)

    def encode(self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None,
               chunk_size: int | None = None) -> Tensor:
        """Latents (b, C, h, w) float32 of images (b, 3, H, W) in ``[−1, 1]``: the posterior mean of the VAE
        encoder (``sample=True``: a draw), then ``(z − shift_factor) · scaling_factor``."""
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode expects images (b, 3, H, W) in [-1, 1], got "
                             f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        self.check_size(images.shape[2], images.shape[3])
        scale, shift = self._vae_factors()
        out = []
        for x in _chunks(images, chunk_size):
            dist = self.vae.encode(x.to(device=self.device, dtype=self.vae.dtype)).latent_dist
            z = dist.sample(generator) if sample else dist.mode()
            out.append((z.float() - shift) * scale)
        return torch.cat(out)

    def _vae_factors(self) -> tuple[float, float]:
        """``(scaling_factor, shift_factor)``: latents are ``(z_vae − shift) · scaling``."""
        cfg = self.vae.config
        return cfg.scaling_factor, cfg.get("shift_factor", None) or 0.0

    def _check_latents(self, z: Tensor) -> None:
        if not torch.is_tensor(z) or not z.is_floating_point() or z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected unpacked latents (b, {self.latent_channels}, h, w) of a float dtype, got "
                             f"{(tuple(z.shape), z.dtype) if torch.is_tensor(z) else type(z).__name__}")

    # --- measurements -----------------------------------------------------------------------------------
    def pixel_operator(self, operator: AbstractOperator, *, chunk_size: int | None = None) -> "DecodedOperator":
        """``z ↦ A(decode(z))``: a pixel-space measurement seen from latent space (non-linear, differentiable
        through the VAE decoder only — never through the transformer)."""
        return DecodedOperator(self, operator, chunk_size=chunk_size)

    def latent_measurement(self, operator: AbstractOperator, y: Tensor) -> tuple[AbstractLinearOperator, Tensor]:
        """The latent-space variant of a pixel measurement ``y = A(x)``, for methods that need a linear operator
        (DDS, OT-ODE, the default method): ``(A_z, y_z)`` with ``y_z = encode(x̃)`` of an image ``x̃`` consistent
        with ``y`` and ``A_z`` a latent mask (inpainting: a latent cell is observed when all pixels it covers
        are) or the identity (super-resolution, deblurring, colourisation, denoising: ``x̃`` is the measurement
        brought back to the image grid). An approximation: the VAE is not linear, and ``x̃`` is blurry / grey
        where ``A`` loses information."""
        with torch.no_grad():
            return self._latent_measurement(operator, y)

    def _latent_measurement(self, operator: AbstractOperator, y: Tensor) -> tuple[AbstractLinearOperator, Tensor]:
        if isinstance(operator, DecodedOperator):
            operator = operator.pixel
        if not torch.is_tensor(y) or y.ndim != 4:
            raise ValueError(f"y must be a batch of pixel measurements (b, C, H, W), got "
                             f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}")
        if isinstance(operator, Mask):
            m = operator.mask.to(device=y.device)
            m = m.expand(y.shape[1:]) if m.shape != y.shape[1:] else m
            filled = torch.where(m.bool(), y, torch.zeros((), dtype=y.dtype, device=y.device))
            z = self.encode(filled)
            f = self.vae_scale_factor
            cell = (-torch.nn.functional.max_pool2d(-m.float().amin(0, keepdim=True)[None], f, f))[0]
            return Mask(cell.bool().expand(z.shape[1:]).clone()), z
        if isinstance(operator, AvgPool):
            x = torch.nn.functional.interpolate(y, scale_factor=operator.k, mode="bicubic", align_corners=False)
        elif isinstance(operator, Colorize):
            x = y.expand(-1, 3, -1, -1) if y.shape[1] == 1 else y
        elif isinstance(operator, (Blur, Identity)):
            x = y
        else:
            raise TypeError(f"no latent-space variant for {operator!r}; use a method that takes a non-linear "
                            "operator (FlowChef, DPS, PnP-Flow, EnKG) on pipe.pixel_operator(A)")
        z = self.encode(x.clamp(-1, 1))
        return Identity(tuple(z.shape[1:])), z

    # --- generation -------------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[str] | None = None, *, n: int = 1, steps: int = 28,
                 guidance_scale: float | None = None, negative_prompt: str | Sequence[str] | None = None,
                 height: int | None = None, width: int | None = None, generator: torch.Generator | None = None,
                 latents: Tensor | None = None, guidance: Any = None, method: str = "euler",
                 prompt_embeds: PromptEmbeds | None = None, output: str = "image", progress: bool = False,
                 cost: Any = None, decode_chunk_size: int | None = None) -> Tensor:
        """Sample ``n`` images per prompt through :func:`steerflow.sample` (any solver, any steering method).

        Returns images (b, 3, H, W) in ``[−1, 1]`` (``output="image"``) or the final latents (``"latent"``).
        ``guidance_scale`` defaults to the pipeline's own default (SD3 7.0, Flux dev 3.5, schnell none).
        """
        from ..solvers.sample import sample

        _check_output(output)
        v = self.velocity(prompt, guidance_scale=self._default_guidance(guidance_scale),
                          negative_prompt=negative_prompt, prompt_embeds=prompt_embeds)
        b = v.embeds.batch * int(n)
        if latents is None:
            latents = self.noise(b, height=height, width=width, generator=generator)
        else:
            self._check_latents(latents)
            height, width = latents.shape[2] * self.vae_scale_factor, latents.shape[3] * self.vae_scale_factor
        ts = self.time_grid(steps, height=height, width=width)
        z = sample(v, latents, ts=ts, method=method, guidance=guidance, generator=generator, progress=progress,
                   cost=cost)
        return self._finish(z, output, decode_chunk_size)

    def _default_guidance(self, guidance_scale: float | None) -> float | None:
        """Generation uses the pipeline's own default guidance for SD3 (CFG 7.0); Flux's is set in velocity()."""
        return 7.0 if self.kind == "sd3" and guidance_scale is None else guidance_scale

    def _finish(self, z: Tensor, output: str, chunk_size: int | None = None) -> Tensor:
        """Release diffusers' offload hooks, then the latents or their decoded images."""
        self.pipeline.maybe_free_model_hooks()
        if output == "latent":
            return z
        with torch.no_grad():
            return self.decode(z, chunk_size=chunk_size)

    def _invert(self, z1: Tensor, prompt, ts: Tensor, *, gamma: float, guidance_scale: float | None,
                generator: torch.Generator | None, method: str, progress: bool) -> Tensor:
        from ..steering.inversion import invert

        v = self.velocity(prompt, guidance_scale=guidance_scale)
        return invert(v, z1, ts=ts, gamma=gamma, generator=generator, method=method, progress=progress)

    def invert(self, images: Tensor, prompt: str | Sequence[str] = "", *, steps: int = 28, gamma: float = 0.0,
               guidance_scale: float | None = None, generator: torch.Generator | None = None,
               method: str = "euler", progress: bool = False) -> Tensor:
        """Latent noise (b, C, h, w) of real images (b, 3, H, W) in ``[−1, 1]``: encode, then the flow under
        ``prompt`` run backward on the scheduler's grid (``gamma > 0``: RF-Inversion's controlled inversion
        toward a fresh noise draw, :func:`steerflow.steering.invert`). SD3 inverts without CFG by default."""
        with torch.no_grad():
            z1 = self.encode(images)
        ts = self.time_grid(steps, height=images.shape[2], width=images.shape[3])
        return self._invert(z1, prompt, ts, gamma=gamma, guidance_scale=guidance_scale, generator=generator,
                            method=method, progress=progress)

    def edit(self, images: Tensor, prompt: str | Sequence[str], *, source_prompt: str = "", steps: int = 28,
             gamma: float = 0.5, eta: float = 0.9, window: tuple[float, float] = (0.0, 0.25),
             guidance_scale: float | None = None, generator: torch.Generator | None = None,
             method: str = "euler", progress: bool = False, output: str = "image") -> Tensor:
        """RF-Inversion editing of real images (Rout et al. 2024): encode → controlled inversion under
        ``source_prompt`` (strength ``gamma``) → generation under ``prompt`` with the editing controller ``eta``
        pulling toward the encoded image on ``window`` (``t`` from 0 = noise). Returns images in ``[−1, 1]``
        (or latents with ``output="latent"``)."""
        from ..steering.inversion import edit

        _check_output(output)
        with torch.no_grad():
            z1 = self.encode(images)
        ts = self.time_grid(steps, height=images.shape[2], width=images.shape[3])
        # SD3 inverts without CFG (the guided field does not invert stably); Flux dev keeps its embedded guidance
        z0 = self._invert(z1, source_prompt, ts, gamma=gamma, generator=generator, method=method, progress=progress,
                          guidance_scale=None if self.kind == "sd3" else guidance_scale)
        target = self.velocity(prompt, guidance_scale=self._default_guidance(guidance_scale))
        z = edit(target, z0, z1, eta=eta, window=window, ts=ts, method=method, generator=generator, progress=progress)
        return self._finish(z, output)


class PipelineVelocity:
    """``v(z, t[, cond])`` of a :class:`FlowPipeline` in steerflow's convention: ``−transformer(z, σ = 1 − t)``.

    ``z`` are unpacked latents (b, C, h, w) in any float dtype (cast to the transformer's dtype per call), ``t``
    (b,). ``cond``: a :class:`PromptEmbeds` to use instead of the bound prompt for this call (what
    :class:`~steerflow.steering.ClassifierFreeGuidance` passes). The bound prompts repeat over the batch in
    consecutive groups (EnKG's particles of one image share its prompt).
    """

    def __init__(self, pipe: FlowPipeline, embeds: PromptEmbeds, *, guidance_scale: float | None = None,
                 negative: PromptEmbeds | None = None) -> None:
        self.pipe, self.embeds, self.guidance_scale, self.negative = pipe, embeds, guidance_scale, negative
        self.num_train_timesteps = float(pipe.scheduler.config.num_train_timesteps)
        # the execution device and dtype are looked up once (both walk the modules in diffusers)
        self.device, self.dtype = pipe.device, pipe.dtype
        self._prepared: dict[tuple[int, bool], PromptEmbeds] = {}
        self._ids: dict[tuple[int, int], Tensor] = {}

    def _embeds(self, cond: PromptEmbeds | None, b: int, cfg: bool) -> PromptEmbeds:
        """The conditioning for a batch of ``b`` on the device in the transformer's dtype (cached for the bound
        prompt: SD3's ``[negative, prompt]`` stack is built once per batch size)."""
        if cond is not None:
            return cond.expand_to(b).to(self.device, self.dtype)
        key = (b, cfg)
        if key not in self._prepared:
            e = self.embeds.expand_to(b)
            if cfg:
                e = self.negative.expand_to(b).cat(e)
            self._prepared[key] = e.to(self.device, self.dtype)
        return self._prepared[key]

    def __repr__(self) -> str:
        return f"PipelineVelocity({self.pipe.kind}, prompts={self.embeds.batch}, guidance_scale={self.guidance_scale})"

    def __call__(self, z: Tensor, t: Tensor, cond: PromptEmbeds | None = None) -> Tensor:
        self.pipe._check_latents(z)
        if cond is not None and not isinstance(cond, PromptEmbeds):
            raise TypeError(f"cond must be PromptEmbeds (pipe.encode_prompt(...)), got {type(cond).__name__}")
        b = z.shape[0]
        t = torch.as_tensor(t, device=z.device)
        t = t.expand(b) if t.ndim == 0 else t
        # the schedulers form timesteps as float32 σ · num_train_timesteps
        timestep = ((1 - t.to(torch.float64)) * self.num_train_timesteps).to(torch.float32)
        if self.pipe.kind == "sd3":
            out = self._sd3(z, timestep, cond)
        else:
            out = self._flux(z, timestep, self._embeds(cond, b, False))
        return -out.to(z.dtype)

    def _sd3(self, z: Tensor, timestep: Tensor, cond: PromptEmbeds | None) -> Tensor:
        cfg = cond is None and self.guidance_scale is not None
        embeds = self._embeds(cond, z.shape[0], cfg)
        z_in = torch.cat([z, z]) if cfg else z
        timestep = torch.cat([timestep, timestep]) if cfg else timestep
        out = self.pipe.transformer(hidden_states=z_in.to(device=self.device, dtype=self.dtype),
                                    timestep=timestep.to(self.device), encoder_hidden_states=embeds.embeds,
                                    pooled_projections=embeds.pooled, return_dict=False)[0]
        if cfg:
            uncond, text = out.chunk(2)
            out = uncond + self.guidance_scale * (text - uncond)
        return out

    def _image_ids(self, h: int, w: int) -> Tensor:
        """Flux's position ids of the packed latent tokens: (row, column) of each 2 × 2 patch, (h/2 · w/2, 3)."""
        if (h, w) not in self._ids:
            ids = torch.zeros(h // 2, w // 2, 3)
            ids[..., 1] = torch.arange(h // 2)[:, None]
            ids[..., 2] = torch.arange(w // 2)[None, :]
            self._ids[(h, w)] = ids.reshape(-1, 3).to(device=self.device, dtype=self.dtype)
        return self._ids[(h, w)]

    def _flux(self, z: Tensor, timestep: Tensor, embeds: PromptEmbeds) -> Tensor:
        b, _, h, w = z.shape
        packed = pack_latents(z)
        guidance = None
        if self.pipe.guidance_embedded:
            guidance = torch.full((b,), float(self.guidance_scale), device=self.device, dtype=torch.float32)
        # FluxPipeline passes the timestep in the latents' dtype, divided by 1000: the transformer scales σ itself
        ts = timestep.to(device=self.device, dtype=self.dtype) / self.num_train_timesteps
        out = self.pipe.transformer(hidden_states=packed.to(device=self.device, dtype=self.dtype), timestep=ts,
                                    guidance=guidance, pooled_projections=embeds.pooled,
                                    encoder_hidden_states=embeds.embeds, txt_ids=embeds.text_ids,
                                    img_ids=self._image_ids(h, w), return_dict=False)[0]
        return unpack_latents(out, h, w)

    @property
    def model(self) -> Any:
        """The transformer (what a backward hook or a VJP count attaches to)."""
        return self.pipe.transformer


class DecodedOperator(AbstractOperator):
    """``A(decode(z))``: a pixel-space operator ``A`` seen from a pipeline's latent space.

    Non-linear and differentiable through the VAE decoder (``pixel`` is the pixel-space ``A``). Methods that need
    a linear operator take :meth:`FlowPipeline.latent_measurement` instead.
    """

    linear = False
    differentiable = True

    def __init__(self, pipe: FlowPipeline, pixel: AbstractOperator, *, chunk_size: int | None = None) -> None:
        if not isinstance(pixel, AbstractOperator):
            raise TypeError(f"expected a steerflow operator for the pixel measurement, got {type(pixel).__name__}")
        self.pipe, self.pixel, self.chunk_size = pipe, pixel, chunk_size

    def __repr__(self) -> str:
        return f"DecodedOperator({self.pixel!r})"

    def forward(self, z: Tensor) -> Tensor:
        return self.pixel(self.pipe.decode(z, chunk_size=self.chunk_size))
