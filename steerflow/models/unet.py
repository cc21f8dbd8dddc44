"""A small class-conditional U-Net velocity field for 8x8 ... 32x32 images.

The layout follows the ADM/DDPM U-Net (Ho et al. 2020; Dhariwal & Nichol 2021), scaled down: residual
blocks ``GroupNorm → SiLU → conv → (+ embedding) → GroupNorm → SiLU → conv`` with a skip, the time
embedding (and class embedding with a null token) added inside every block, skip connections from the
down path concatenated on the up path, optional self-attention at the lowest resolution, and a
zero-initialised output convolution so that ``v_θ ≡ 0`` at initialisation.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AbstractVelocityModel, LabelEmbedding, SinusoidalTimeEmbedding, check_time


def _groups(channels: int) -> int:
    """Largest group count <= 32 dividing ``channels`` with at least 4 channels per group.

    One channel per group would normalise away the per-channel embedding added just before ``norm2``.
    """
    return max(g for g in range(1, max(1, min(32, channels // 4)) + 1) if channels % g == 0)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Single-head self-attention over the ``H·W`` positions, with a residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (b, hw, c)
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class UNetVelocity(AbstractVelocityModel):
    """``v_θ(x, t, y)`` for images ``x`` of shape (b, in_channels, image_size, image_size).

    Args:
        in_channels: image channels.
        base_channels: width ``C`` of the first level; level ``i`` has ``C · channel_mult[i]`` channels.
        channel_mult: one multiplier per resolution; ``image_size`` must be divisible by
            ``2^(len(channel_mult) - 1)``.
        num_res_blocks: residual blocks per level on the down path (the up path has one more, which
            consumes the extra skip).
        attention: self-attention at the lowest resolution and in the middle block.
        n_classes: number of classes for conditioning (``cond`` integer labels (b,)); ``None`` for an
            unconditional model. Index ``n_classes`` is the null class; ``cond=None`` means null.
        label_dropout: probability of replacing a label by the null class during training (CFG).
        image_size: the spatial size the model is built for (also its ``event_shape``).
    """

    name: ClassVar[str] = "unet"

    def __init__(self, in_channels: int = 1, base_channels: int = 32, channel_mult: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, attention: bool = False, n_classes: int | None = None,
                 label_dropout: float = 0.1, image_size: int = 32) -> None:
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult}")
        for key, val in (("in_channels", in_channels), ("base_channels", base_channels),
                         ("num_res_blocks", num_res_blocks), ("image_size", image_size)):
            if not (isinstance(val, int) and val >= 1):
                raise ValueError(f"{key} must be a positive int, got {val!r}")
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(f"image_size={image_size} must be divisible by 2^(len(channel_mult)-1)={factor}")
        self._set_config(in_channels=in_channels, base_channels=base_channels, channel_mult=list(channel_mult),
                         num_res_blocks=num_res_blocks, attention=bool(attention), n_classes=n_classes,
                         label_dropout=label_dropout, image_size=image_size)
        self.in_channels, self.image_size = in_channels, image_size
        emb_dim = 4 * base_channels
        self.time_embed = nn.Sequential(SinusoidalTimeEmbedding(base_channels), nn.Linear(base_channels, emb_dim),
                                        nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = LabelEmbedding(n_classes, emb_dim, label_dropout) if n_classes is not None else None

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [base_channels]
        c = base_channels
        for level, mult in enumerate(channel_mult):
            last = level == len(channel_mult) - 1
            for _ in range(num_res_blocks):
                block = nn.ModuleList([_ResBlock(c, base_channels * mult, emb_dim)])
                c = base_channels * mult
                if attention and last:
                    block.append(_Attention(c))
                self.down.append(block)
                skips.append(c)
            if not last:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                skips.append(c)
        self.mid = nn.ModuleList([_ResBlock(c, c, emb_dim), _Attention(c) if attention else nn.Identity(),
                                  _ResBlock(c, c, emb_dim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                block = nn.ModuleList([_ResBlock(c + skips.pop(), base_channels * mult, emb_dim)])
                c = base_channels * mult
                if attention and level == len(channel_mult) - 1:
                    block.append(_Attention(c))
                self.up.append(block)
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(c, c, 3, padding=1)]))
        self.norm_out = nn.GroupNorm(_groups(c), c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.image_size, self.image_size)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x`` (b, C, H, W) with ``(C, H, W) = event_shape``, ``t`` (b,), ``cond`` (b,) labels or None."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"UNetVelocity expects x of shape (b, {', '.join(map(str, self.event_shape))}), "
                             f"got {tuple(x.shape)}")
        t = check_time(t, x)
        emb = self.time_embed(t)
        if self.label_embed is not None:
            emb = emb + self.label_embed(cond, x.shape[0], x.device)
        elif cond is not None:
            raise ValueError("cond was given but the model was built with n_classes=None")
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, _ResBlock) else layer(h)
        for block in self.up:
            if isinstance(block[0], _ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(block, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def _run(block: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for layer in block:
            h = layer(h, emb) if isinstance(layer, _ResBlock) else layer(h)
        return h


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


