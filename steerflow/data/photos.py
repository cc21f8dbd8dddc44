"""Grayscale patches of scikit-image's bundled photographs (shipped inside the scikit-image wheel; no download).

A small natural-image data set for learned-prior benchmarks: square ``size × size`` patches cut on a regular
grid from whole photographs, with whole images held out for the test split so that no test patch shares
pixels with a training patch.

Source images (``skimage.data``; every one is a file in the wheel's ``skimage/data`` folder):

* train (``TRAIN_IMAGES``): ``camera``, ``coins``, ``moon``, ``page``, ``text``, ``astronaut``, ``rocket``,
  ``grass``, ``gravel``, ``brick``, ``clock``, ``cell``;
* test (``TEST_IMAGES``, held out whole): ``chelsea`` (a cat's face and fur) and ``coffee`` (a cup on a
  table).

``cat`` is the same photograph as ``chelsea`` and is not offered; binary (``horse``), RGBA (``logo``) and
non-photographic images (``checkerboard``, ``binary_blobs``, phantoms) are left out.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

TRAIN_IMAGES: tuple[str, ...] = ("camera", "coins", "moon", "page", "text", "astronaut", "rocket", "grass",
                                 "gravel", "brick", "clock", "cell")
"""Photographs of the training split."""
TEST_IMAGES: tuple[str, ...] = ("chelsea", "coffee")
"""Photographs held out whole for the test split (disjoint from ``TRAIN_IMAGES``)."""
PHOTOS: tuple[str, ...] = TRAIN_IMAGES + TEST_IMAGES + ("hubble_deep_field", "immunohistochemistry")
"""Every bundled photograph :func:`photo_patches` accepts by name (``images=``)."""
SPLITS = {"train": TRAIN_IMAGES, "test": TEST_IMAGES}
NORMALIZATIONS = ("global", "image")
LUMA_709 = (0.2125, 0.7154, 0.0721)
"""ITU-R BT.709 luminance weights of (R, G, B), the ones ``skimage.color.rgb2gray`` uses."""


def _skimage_data():
    try:
        import skimage.data as data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("photo_patches needs scikit-image: pip install 'steerflow[data]'") from e
    return data


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def load_photo(name: str, normalize: str = "global") -> Tensor:
    """One bundled photograph as a grayscale image (H, W) float32 in ``[-1, 1]``.

    Colour images become luminance ``Y = 0.2125 R + 0.7154 G + 0.0721 B`` (ITU-R BT.709, as in
    ``skimage.color.rgb2gray``), computed on the 0..255 values. Then

    * ``normalize="global"``: ``v / 127.5 − 1`` (the fixed 8-bit scale; an image keeps its own contrast);
    * ``normalize="image"``: the image's own ``[min, max]`` stretched affinely to ``[-1, 1]``.

    Raises:
        ValueError: ``name`` not in ``PHOTOS``, or an unknown ``normalize``.
    """
    if name not in PHOTOS:
        raise ValueError(f"unknown photograph {name!r}; expected one of {list(PHOTOS)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; expected one of {list(NORMALIZATIONS)}")
    a = np.asarray(getattr(_skimage_data(), name)())
    if a.dtype != np.uint8:  # pragma: no cover - every image in PHOTOS is 8-bit today
        raise ValueError(f"photograph {name!r} has dtype {a.dtype}; expected uint8")
    a = a.astype(np.float64)
    if a.ndim == 3:
        a = a[..., :3] @ np.asarray(LUMA_709)
    if normalize == "global":
        a = a / 127.5 - 1.0
    else:
        lo, hi = a.min(), a.max()
        a = 2.0 * (a - lo) / max(hi - lo, 1e-12) - 1.0
    return torch.from_numpy(a.astype(np.float32))


def photo_patches(size: int = 8, *, split: str = "train", images: Sequence[str] | None = None,
                  stride: int | None = None, downscale: int = 1, normalize: str = "global",
                  min_std: float = 0.0, max_patches: int | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """Square grayscale patches of scikit-image's bundled photographs, (N, 1, size, size) float32 in ``[-1, 1]``.

    Each photograph (:func:`load_photo`: BT.709 luminance, ``normalize``) is optionally block-averaged by
    ``downscale`` (``downscale × downscale`` means, cropping the remainder), then cut into the patches
    ``x[i·stride : i·stride + size, j·stride : j·stride + size]`` for all ``i, j`` that fit, row-major, images
    in the given order. Patches whose pixel standard deviation is below ``min_std`` (in ``[-1, 1]`` units,
    e.g. 0.1 ≈ 13 gray levels; population std over the ``size²`` pixels) are dropped — flat sky and
    background carry no texture to restore. With ``max_patches`` smaller than the number left, a uniformly
    random subset of that many is returned in random order (drawn from ``generator``; a seeded generator
    gives the same patches every time); otherwise all are returned in grid order.

    Args:
        size: patch side, ≥ 2.
        split: ``"train"`` (``TRAIN_IMAGES``) or ``"test"`` (``TEST_IMAGES``, held-out whole photographs);
            chooses the photographs when ``images`` is not given.
        images: explicit photograph names from ``PHOTOS`` (overrides ``split``).
        stride: grid step, ≥ 1; default ``size`` (non-overlapping tiles).
        downscale: integer block-average factor ≥ 1 applied before cutting (more structure per patch).
        normalize: ``"global"`` (``v / 127.5 − 1``) or ``"image"`` (each photograph's range to ``[-1, 1]``).
        min_std: drop patches with a smaller pixel standard deviation (≥ 0; 0 keeps all).
        max_patches: return at most this many (≥ 1), a random subset.
        generator: randomness for ``max_patches``.

    Raises:
        ValueError: a bad ``size``/``stride``/``downscale``/``max_patches``/``min_std``, an unknown split or
        photograph, a photograph smaller than one patch, or no patch left after ``min_std``.
        ImportError: scikit-image is missing (``pip install 'steerflow[data]'``).
    """
    size = _positive_int("size", size, 2)
    stride = size if stride is None else _positive_int("stride", stride)
    downscale = _positive_int("downscale", downscale)
    if max_patches is not None:
        max_patches = _positive_int("max_patches", max_patches)
    if not isinstance(min_std, (int, float)) or isinstance(min_std, bool) or not (min_std >= 0.0):
        raise ValueError(f"min_std must be a number >= 0, got {min_std!r}")
    if images is None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        images = SPLITS[split]
    if isinstance(images, str):
        raise ValueError(f"images must be a sequence of names, got the string {images!r} (use ({images!r},))")
    images = tuple(images)
    if not images:
        raise ValueError(f"images must name at least one of {list(PHOTOS)}")
    for name in images:
        if name not in PHOTOS:
            raise ValueError(f"unknown photograph {name!r}; expected one of {list(PHOTOS)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; expected one of {list(NORMALIZATIONS)}")

    parts = []
    for name in images:
        img = load_photo(name, normalize)
        if downscale > 1:
            H, W = (s // downscale * downscale for s in img.shape)
            img = img[:H, :W].reshape(H // downscale, downscale, W // downscale, downscale).mean(dim=(1, 3))
        if min(img.shape) < size:
            raise ValueError(f"photograph {name!r} is {tuple(img.shape)} after downscale={downscale}; "
                             f"expected at least {size}×{size}")
        # (nH, nW, size, size) windows, row-major
        tiles = img.unfold(0, size, stride).unfold(1, size, stride)
        parts.append(tiles.reshape(-1, 1, size, size))
    x = torch.cat(parts).contiguous()
    if min_std > 0.0:
        x = x[x.flatten(1).std(dim=1, correction=0) >= min_std]
        if x.shape[0] == 0:
            raise ValueError(f"no patch of {list(images)} has pixel std >= min_std={min_std}")
    if max_patches is not None and max_patches < x.shape[0]:
        x = x[torch.randperm(x.shape[0], generator=generator)[:max_patches]]
    return x.clone()
