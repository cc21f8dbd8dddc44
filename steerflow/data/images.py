"""Image files in and out: PNG / JPEG ↔ tensors in ``[−1, 1]`` of shape (b, C, H, W).

Pillow is imported lazily (``pip install 'steerflow[data]'``). Loading can resize to a given size or to the
nearest lower multiple a model needs, with a warning that says so; saving writes one image or a grid.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGE_SUFFIXES", "load_image", "load_mask", "save_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
"""File types read and written here."""


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading and writing PNG/JPEG needs Pillow: pip install 'steerflow[data]'") from None
    return Image


def _open(path: str | Path, what: str):
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: no file at {str(path)!r}")
    if not p.is_file():
        raise ValueError(f"{what}: expected an image file, got the directory {str(path)!r}")
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{what}: expected a {'/'.join(IMAGE_SUFFIXES)} file, got {str(path)!r}")
    Image = _pil()
    try:
        img = Image.open(p)
        img.load()
    except Exception as e:
        raise ValueError(f"{what}: {str(path)!r} is not a readable image ({type(e).__name__})") from None
    return img


def _target_size(w: int, h: int, size: Sequence[int] | None, multiple: int) -> tuple[int, int]:
    if size is not None:
        th, tw = (int(s) for s in size)
    else:
        th, tw = h, w
    th, tw = max(multiple, th - th % multiple), max(multiple, tw - tw % multiple)
    return th, tw


def load_image(path: str | Path, *, size: Sequence[int] | None = None, multiple: int = 1, channels: int = 3,
               what: str = "image") -> Tensor:
    """Read a PNG/JPEG into (1, C, H, W) float32 in ``[−1, 1]`` (``channels`` 3: RGB, 1: grey).

    ``size=(H, W)`` resizes to that size; otherwise the image keeps its size rounded down to a multiple of
    ``multiple``. A resize is announced with a :class:`UserWarning` naming both sizes (bicubic, Pillow).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    img = _open(path, what).convert("RGB" if channels == 3 else "L")
    w, h = img.size
    th, tw = _target_size(w, h, size, int(multiple))
    if (th, tw) != (h, w):
        warnings.warn(f"{what} {Path(path).name} resized from {w}x{h} to {tw}x{th} (width x height)"
                      + (f" (the model needs multiples of {multiple})" if size is None else ""), stacklevel=2)
        img = img.resize((tw, th), _pil().Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))[None]


def load_mask(path: str | Path, *, size: Sequence[int], what: str = "mask") -> Tensor:
    """Read an inpainting mask as a boolean (H, W) tensor, ``True`` where the image is **kept** (observed).

    The file follows diffusers' convention: white (> 127 in grey) marks the region to fill, black the region to
    keep. A mask of another size than ``size`` is an error (it must match the image it belongs to); a mask
    that hides nothing or everything is refused.
    """
    img = _open(path, what).convert("L")
    w, h = img.size
    H, W = (int(s) for s in size)
    if (h, w) != (H, W):
        raise ValueError(f"{what} {str(path)!r} is {w}x{h} but the image is {W}x{H} (width x height); "
                         "the mask must have the image's size")
    fill = torch.from_numpy(np.asarray(img, dtype=np.uint8) > 127)
    if not fill.any():
        raise ValueError(f"{what} {str(path)!r} is all black: it hides nothing (white marks the region to fill)")
    if fill.all():
        raise ValueError(f"{what} {str(path)!r} is all white: it hides the whole image (black marks what to keep)")
    return ~fill


def save_image(images: Tensor, path: str | Path, *, nrow: int | None = None) -> Path:
    """Write images (b, C, H, W) or (C, H, W) in ``[−1, 1]`` (clipped) to a PNG/JPEG; several become a grid
    (:func:`steerflow.plotting.image_grid`: white 2-pixel gaps and border, ``nrow`` per row). Written atomically
    (temporary file, then rename)."""
    p = Path(path)
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"image output must end in {'/'.join(IMAGE_SUFFIXES)}, got {str(path)!r}")
    if not torch.is_tensor(images) or images.ndim not in (3, 4) or images.shape[-3] not in (1, 3):
        raise ValueError(f"expected images (b, C, H, W) or (C, H, W) with C = 1 or 3, got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    images = images.detach().float().cpu().clamp(-1, 1)
    if images.ndim == 4 and images.shape[0] > 1:  # steerflow.plotting's mosaic: (H, W, 3) in [0, 1]
        from ..plotting import image_grid

        arr = np.round(image_grid(images.numpy(), nrow=nrow, value_range=(-1.0, 1.0)) * 255).astype(np.uint8)
    else:
        arr = ((images.reshape(images.shape[-3:]) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image = _pil()
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr, mode="L" if arr.shape[2] == 1 else "RGB")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.stem}.tmp{p.suffix}")
    img.save(tmp, format="JPEG" if p.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    tmp.replace(p)
    return p
