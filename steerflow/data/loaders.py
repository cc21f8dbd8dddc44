"""Loaders for local data (never downloads): sklearn's bundled digits, image folders, arrays, and a registry.

Every loader returns an :class:`~steerflow.data.datasets.ArrayDataset`; images come as (N, c, h, w)
float32 in ``[-1, 1]``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .datasets import AbstractDataset, ArrayDataset, ToyDataset
from .toys import TOYS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy", ".npz", ".csv")
_X_KEYS = ("x", "data", "samples", "images", "arr_0")
_LABEL_KEYS = ("labels", "label", "y", "targets")
PHOTO_CROP_DATASETS = {"photos32": False, "photos32-rgb": True}
"""Dataset names of the 32×32 training crops of :func:`~steerflow.data.photos.photo_crops` → ``rgb``."""


def load_digits() -> ArrayDataset:
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, shipped with sklearn; no download).

    Returns:
        ``ArrayDataset`` with ``x`` (1797, 1, 8, 8) float32 in ``[-1, 1]`` (the 0..16 gray levels mapped
        by ``v / 8 - 1``) and ``labels`` (1797,) in ``0..9``.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits needs scikit-learn: pip install 'steerflow[data]'") from e
    bunch = _sk_load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return ArrayDataset(x, labels, classes=[str(i) for i in range(10)])


def _image_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size must be a positive int or an (h, w) pair, got {size!r}")
    return int(size[0]), int(size[1])


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def load_image_folder(path, size=None, grayscale: bool = False) -> ArrayDataset:
    """Images (PNG/JPEG) from a folder, as (N, c, h, w) float32 in ``[-1, 1]`` (``v / 127.5 - 1``).

    Layout: either images directly in ``path`` (no labels), or one sub-folder per class
    (``path/<class>/*.png``; labels are the sorted class names' indices, names in ``.classes``).
    Files are read in sorted order.

    Args:
        path: the folder.
        size: resize every image to ``(h, w)`` (an int means square) with bilinear filtering; without
            it all images must share one size.
        grayscale: convert to one channel (``L``); otherwise RGB, c = 3.
    """
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_image_folder needs Pillow: pip install 'steerflow[data]'") from e
    root = Path(os.fspath(path)).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"no such image folder: {str(root)!r}")
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is not a folder")
    hw = _image_size(size)

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int]] = []
    classes = None
    if class_dirs:
        loose = [p for p in root.iterdir() if _is_image(p)]
        if loose:
            raise ValueError(f"{str(root)!r} mixes images ({loose[0].name}, ...) with class sub-folders; "
                             "use one layout")
        classes = [p.name for p in class_dirs]
        for label, d in enumerate(class_dirs):
            files += [(p, label) for p in sorted(d.iterdir()) if _is_image(p)]
    else:
        files = [(p, -1) for p in sorted(root.iterdir()) if _is_image(p)]
    if not files:
        raise ValueError(f"no {'/'.join(IMAGE_SUFFIXES)} images found in {str(root)!r}")

    mode = "L" if grayscale else "RGB"
    arrays = []
    for p, _ in files:
        try:
            with Image.open(p) as im:
                im = im.convert(mode)
                if hw is not None and im.size != (hw[1], hw[0]):
                    im = im.resize((hw[1], hw[0]), Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32)
        except OSError as e:
            raise ValueError(f"cannot read image {str(p)!r}: {e}") from e
        if a.ndim == 2:
            a = a[:, :, None]
        arrays.append(a)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images in {str(root)!r} have different sizes {sorted(s[:2] for s in shapes)}; pass size=")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0
    labels = torch.tensor([lab for _, lab in files]) if classes is not None else None
    return ArrayDataset(x, labels, classes=classes)


def _load_csv(path: Path) -> np.ndarray:
    """Numeric CSV (comma, or whitespace, separated); blank lines and ``#`` comments skipped; one
    non-numeric header line allowed before the first row."""
    rows: list[list[float]] = []
    header_seen = False
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            s = line.split("#", 1)[0].strip()
            if not s:
                continue
            fields = [t.strip() for t in (s.split(",") if "," in s else s.split())]
            try:
                rows.append([float(t) for t in fields])
            except ValueError:
                if rows or header_seen:
                    raise ValueError(f"{str(path)!r} line {lineno}: non-numeric value in {line.strip()!r}") from None
                header_seen = True
                continue
            if len(rows[-1]) != len(rows[0]):
                raise ValueError(f"{str(path)!r} line {lineno}: {len(rows[-1])} columns, expected {len(rows[0])}")
    if not rows:
        raise ValueError(f"{str(path)!r} holds no numeric rows")
    return np.asarray(rows, dtype=np.float64)


def load_array(path) -> ArrayDataset:
    """A numeric array file as an :class:`ArrayDataset` (N, *d); a 1-D array becomes (N, 1).

    * ``.npy``: one array (loaded without pickle).
    * ``.npz``: the only array, or the one named ``x``/``data``/``samples``/``images``/``arr_0``; an
      array named ``labels``/``label``/``y``/``targets`` of shape (N,) becomes the labels.
    * ``.csv``: numeric rows; ``#`` comments, blank lines and one header line are skipped.

    Floating arrays keep float32/float64; integer arrays become float32.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown suffix, not numeric, NaN/inf, or a 0-d array.
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {str(p)!r}")
    suffix = p.suffix.lower()
    labels = None
    if suffix == ".npy":
        try:
            a = np.load(p, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{str(p)!r} is not a plain numeric .npy array: {e}") from e
    elif suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.keys())
            if not keys:
                raise ValueError(f"{str(p)!r} holds no arrays")
            x_key = next((k for k in _X_KEYS if k in keys), None)
            lab_key = next((k for k in _LABEL_KEYS if k in keys), None)
            if x_key is None:
                rest = [k for k in keys if k != lab_key]
                if len(rest) != 1:
                    raise ValueError(f"{str(p)!r} holds arrays {keys}; name the data one of {list(_X_KEYS)}")
                x_key = rest[0]
            a = z[x_key]
            labels = z[lab_key] if lab_key is not None else None
    elif suffix == ".csv":
        a = _load_csv(p)
    else:
        raise ValueError(f"unsupported file type {suffix!r} for {str(p)!r}; expected one of {list(ARRAY_SUFFIXES)}")
    if a.dtype.kind not in "fiub":
        raise ValueError(f"{str(p)!r} holds a non-numeric array of dtype {a.dtype}")
    if a.ndim == 0:
        raise ValueError(f"{str(p)!r} holds a scalar; expected an array of shape (N, *d)")
    if a.ndim == 1:
        a = a[:, None]
    if a.dtype.kind != "f" or a.dtype == np.float16:
        a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{str(p)!r} holds NaN or inf")
    if labels is not None and labels.shape != (a.shape[0],):
        raise ValueError(f"{str(p)!r}: labels have shape {labels.shape}, expected ({a.shape[0]},)")
    return ArrayDataset(a, labels)


def available_datasets() -> list[str]:
    """Names :func:`load_dataset` resolves without a path: the toys, ``digits``, ``photo_patches`` and the
    32×32 photo crops ``photos32`` / ``photos32-rgb``."""
    return sorted(TOYS) + ["digits", "photo_patches"] + sorted(PHOTO_CROP_DATASETS)


def load_dataset(name_or_path, *, toy_size: int = 10_000, image_size=None) -> AbstractDataset:
    """Resolve a dataset by name or path.

    * a toy name (``TOYS``: ``moons``, ``8gaussians``, ...) → :class:`ToyDataset` that samples afresh on
      every call (nominal length ``toy_size``);
    * ``"digits"`` → :func:`load_digits`;
    * ``"photo_patches"`` → the 8×8 training patches of :func:`~steerflow.data.photos.photo_patches` (no labels);
    * ``"photos32"`` / ``"photos32-rgb"`` → the 32×32 grayscale / RGB training crops of
      :func:`~steerflow.data.photos.photo_crops` (no labels; validation and test photographs held out);
    * a folder → :func:`load_image_folder` (resized on load to ``image_size``: an int for square images or
      ``(h, w)``); a ``.npy``/``.npz``/``.csv`` file → :func:`load_array`.

    Raises:
        ValueError: an unknown name (the message lists the options); ``image_size`` for data that is not an
            image folder.
        FileNotFoundError: a path (it has a suffix or a separator) that does not exist.
    """
    if image_size is not None:
        _image_size(image_size)  # checks it
        p = Path(os.fspath(name_or_path)).expanduser() if isinstance(name_or_path, (str, os.PathLike)) else None
        if p is None or not p.is_dir():
            raise ValueError(f"image_size applies to image folders only; {name_or_path!r} is not a folder")
        return load_image_folder(p, size=image_size)
    if isinstance(name_or_path, str) and name_or_path in TOYS:
        return ToyDataset(name_or_path, toy_size)
    if isinstance(name_or_path, str) and name_or_path == "digits":
        return load_digits()
    if isinstance(name_or_path, str) and name_or_path == "photo_patches":
        from .photos import photo_patches

        return ArrayDataset(photo_patches(8, split="train"))
    if isinstance(name_or_path, str) and name_or_path in PHOTO_CROP_DATASETS:
        from .photos import photo_crops

        return ArrayDataset(photo_crops(split="train", rgb=PHOTO_CROP_DATASETS[name_or_path]))
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    p = Path(os.fspath(name_or_path)).expanduser()
    if p.is_dir():
        return load_image_folder(p)
    if p.is_file():
        return load_array(p)
    text = os.fspath(name_or_path)
    if p.suffix or os.sep in text or "/" in text or isinstance(name_or_path, os.PathLike):
        raise FileNotFoundError(f"no such file or folder: {text!r}")
    raise ValueError(f"unknown dataset {text!r}; expected one of {available_datasets()} or a path to a "
                     f"{'/'.join(ARRAY_SUFFIXES)} file or an image folder")
