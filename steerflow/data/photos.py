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

32×32 crops (:func:`photo_crops`, the learned-prior bed of the image-steering benchmark) use their own
three-way split, again by whole photographs, so that validation (tuning) and test crops share no source
photograph with each other or with training (``CROP_SPLITS``):

* grayscale (``rgb=False``): train ``camera``, ``coins``, ``moon``, ``page``, ``text``, ``astronaut``,
  ``grass``, ``gravel``, ``brick``, ``clock``, ``cell``, ``motorcycle``; validation ``rocket``; test
  ``chelsea``, ``coffee``;
* RGB (``rgb=True``; colour photographs only): train ``astronaut``, ``motorcycle``, ``immunohistochemistry``,
  ``retina``, ``hubble_deep_field``; validation ``rocket``; test ``chelsea``, ``coffee``.

``motorcycle`` is the left view of ``skimage.data.stereo_motorcycle`` (the right view is the same scene and
is not offered).
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
PHOTOS: tuple[str, ...] = TRAIN_IMAGES + TEST_IMAGES + ("hubble_deep_field", "immunohistochemistry", "retina",
                                                       "motorcycle")
"""Every bundled photograph :func:`photo_patches` accepts by name (``images=``)."""
COLOUR_PHOTOS: tuple[str, ...] = ("astronaut", "rocket", "chelsea", "coffee", "hubble_deep_field",
                                  "immunohistochemistry", "retina", "motorcycle")
"""The photographs stored in colour (the ones ``rgb=True`` accepts)."""
SPLITS = {"train": TRAIN_IMAGES, "test": TEST_IMAGES}
CROP_SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "gray": {"train": ("camera", "coins", "moon", "page", "text", "astronaut", "grass", "gravel", "brick", "clock",
                       "cell", "motorcycle"),
             "val": ("rocket",),
             "test": ("chelsea", "coffee")},
    "rgb": {"train": ("astronaut", "motorcycle", "immunohistochemistry", "retina", "hubble_deep_field"),
            "val": ("rocket",),
            "test": ("chelsea", "coffee")},
}
"""Whole-photograph train / validation / test split of :func:`photo_crops`, per colour mode (disjoint splits)."""
CROP_SIZE = 32
CROP_TRAIN_STRIDE = {"gray": 8, "rgb": 16}
"""Default crop side and training-crop stride per colour mode of :func:`photo_crops` (≈ 38 k grayscale and
≈ 14 k RGB training crops, ≈ 150 MB and 170 MB as float32); validation and test crops do not overlap."""
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


def _read(name: str) -> np.ndarray:
    data = _skimage_data()
    if name == "motorcycle":
        return np.asarray(data.stereo_motorcycle()[0])
    return np.asarray(getattr(data, name)())


def load_photo(name: str, normalize: str = "global", *, rgb: bool = False) -> Tensor:
    """One bundled photograph as a grayscale image (H, W), or with ``rgb=True`` a colour image (3, H, W),
    float32 in ``[-1, 1]``.

    Without ``rgb``, colour images become luminance ``Y = 0.2125 R + 0.7154 G + 0.0721 B`` (ITU-R BT.709, as
    in ``skimage.color.rgb2gray``), computed on the 0..255 values. Then (per image, over all channels)

    * ``normalize="global"``: ``v / 127.5 − 1`` (the fixed 8-bit scale; an image keeps its own contrast);
    * ``normalize="image"``: the image's own ``[min, max]`` stretched affinely to ``[-1, 1]``.

    Raises:
        ValueError: ``name`` not in ``PHOTOS``, ``rgb=True`` for a grayscale photograph (not in
            ``COLOUR_PHOTOS``), or an unknown ``normalize``.
    """
    if name not in PHOTOS:
        raise ValueError(f"unknown photograph {name!r}; expected one of {list(PHOTOS)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; expected one of {list(NORMALIZATIONS)}")
    if rgb and name not in COLOUR_PHOTOS:
        raise ValueError(f"photograph {name!r} is grayscale; rgb=True needs one of {list(COLOUR_PHOTOS)}")
    a = _read(name)
    if a.dtype != np.uint8:  # pragma: no cover - every image in PHOTOS is 8-bit today
        raise ValueError(f"photograph {name!r} has dtype {a.dtype}; expected uint8")
    a = a.astype(np.float64)
    if rgb:
        a = np.moveaxis(a[..., :3], -1, 0)  # (3, H, W)
    elif a.ndim == 3:
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
                  generator: torch.Generator | None = None, rgb: bool = False) -> Tensor:
    """Square grayscale patches of scikit-image's bundled photographs, (N, 1, size, size) float32 in ``[-1, 1]``
    (``rgb=True``: colour patches (N, 3, size, size) of colour photographs).

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
        rgb: colour patches (every photograph must be in ``COLOUR_PHOTOS``); the pixel standard deviation of
            ``min_std`` is then taken over all ``3 · size²`` values.

    Raises:
        ValueError: a bad ``size``/``stride``/``downscale``/``max_patches``/``min_std``, an unknown split or
            photograph, a grayscale photograph with ``rgb=True``, a photograph smaller than one patch, or no
            patch left after ``min_std``.
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

    if rgb:
        for name in images:
            if name not in COLOUR_PHOTOS:
                raise ValueError(f"photograph {name!r} is grayscale; rgb=True needs one of {list(COLOUR_PHOTOS)}")

    parts = []
    for name in images:
        img = load_photo(name, normalize, rgb=rgb)
        if img.ndim == 2:
            img = img[None]  # (c, H, W)
        c = img.shape[0]
        if downscale > 1:
            H, W = (s // downscale * downscale for s in img.shape[1:])
            img = img[:, :H, :W].reshape(c, H // downscale, downscale, W // downscale, downscale).mean(dim=(2, 4))
        if min(img.shape[1:]) < size:
            raise ValueError(f"photograph {name!r} is {tuple(img.shape[1:])} after downscale={downscale}; "
                             f"expected at least {size}×{size}")
        # (c, nH, nW, size, size) windows, row-major
        tiles = img.unfold(1, size, stride).unfold(2, size, stride)
        parts.append(tiles.permute(1, 2, 0, 3, 4).reshape(-1, c, size, size))
    x = torch.cat(parts).contiguous()
    if min_std > 0.0:
        x = x[x.flatten(1).std(dim=1, correction=0) >= min_std]
        if x.shape[0] == 0:
            raise ValueError(f"no patch of {list(images)} has pixel std >= min_std={min_std}")
    if max_patches is not None and max_patches < x.shape[0]:
        x = x[torch.randperm(x.shape[0], generator=generator)[:max_patches]]
    return x.clone()


def photo_crops(size: int = CROP_SIZE, *, split: str = "train", rgb: bool = False, stride: int | None = None,
                min_std: float = 0.0, max_crops: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Crops of the bundled photographs for the 32×32 learned-prior bed, (N, c, size, size) float32 in ``[-1, 1]``.

    ``split`` picks whole photographs from ``CROP_SPLITS["rgb" if rgb else "gray"]``: ``"train"``, ``"val"``
    (for tuning) or ``"test"``; the three share no photograph. Crops are cut on a regular grid as in
    :func:`photo_patches` (``normalize="global"``: ``v / 127.5 − 1``; grayscale is BT.709 luminance, c = 1;
    ``rgb=True``: c = 3). The default ``stride`` is ``CROP_TRAIN_STRIDE`` (8 for grayscale, 16 for RGB:
    overlapping crops, shifted copies that enlarge the training set) for ``"train"`` and ``size``
    (non-overlapping tiles, no shared pixels) for ``"val"`` and ``"test"``. ``min_std`` drops crops flatter than that (pixel std in ``[-1, 1]`` units);
    ``max_crops`` keeps a random subset of that many, drawn from ``generator`` (seeded: the same crops every time).

    With ``size=32`` and non-overlapping tiles, the test split holds 342 crops (126 of ``chelsea``, 216 of
    ``coffee``) and the validation split 260 (``rocket``) before ``min_std``.

    Raises:
        ValueError: an unknown split, or any error of :func:`photo_patches`.
    """
    mode = "rgb" if rgb else "gray"
    if split not in CROP_SPLITS[mode]:
        raise ValueError(f"unknown split {split!r}; expected one of {list(CROP_SPLITS[mode])}")
    size = _positive_int("size", size, 2)
    if stride is None:
        stride = CROP_TRAIN_STRIDE[mode] if split == "train" else size
    return photo_patches(size, images=CROP_SPLITS[mode][split], stride=stride, min_std=min_std,
                         max_patches=max_crops, generator=generator, rgb=rgb)
