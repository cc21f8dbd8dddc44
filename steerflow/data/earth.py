"""Earth event catalogues on the sphere ``S²`` (volcanoes, earthquakes, floods) and lat/lon CSV loading.

The three catalogues are the density-estimation benchmarks of the Riemannian generative-modelling
literature (Mathieu & Nickel 2020; De Bortoli et al. 2022; Chen & Lipman 2024). A location
``(lat, lon)`` in degrees maps to the unit vector

    ``x = cos(lat) cos(lon)``, ``y = cos(lat) sin(lon)``, ``z = sin(lat)``.

Nothing is downloaded. ``volcano`` and ``earthquake`` (NOAA catalogues, US public domain) ship inside the
package (``steerflow/data/earth_data``, with their sources in ``SOURCE.md``); ``flood`` states no licence and
is not shipped: put ``flood.csv`` in a folder named by ``$STEERFLOW_EARTH_DATA`` (or pass ``root=``).
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import torch
from torch import Tensor

EARTH_DATASETS: dict[str, str] = {"volcano": "volerup.csv", "earthquake": "quakes_all.csv", "flood": "flood.csv"}
"""Dataset name → file name in the data folder."""

EARTH_SOURCES: dict[str, str] = {
    "volcano": "NOAA NCEI's Global Significant Volcanic Eruptions Database (doi:10.7289/V5JW8BSH)",
    "earthquake": "NOAA NCEI's Global Significant Earthquake Database (doi:10.7289/V5TD9V7K)",
    "flood": "the Dartmouth Flood Observatory (floodobservatory.colorado.edu/Archives; the catalogue used in the "
             "literature is in the data/ folder of github.com/oxcsml/riemannian-score-sde)",
}
"""Dataset name → where the catalogue comes from."""

PACKAGED_EARTH_DIR = Path(__file__).resolve().parent / "earth_data"
"""The catalogues shipped with steerflow: ``volcano`` and ``earthquake`` (US public-domain works)."""

EARTH_ENV = "STEERFLOW_EARTH_DATA"

_LAT_NAMES = ("lat", "latitude")
_LON_NAMES = ("lon", "long", "longitude", "lng")


def latlon_to_xyz(lat, lon, *, degrees: bool = True, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(lat, lon)`` (n,) each → unit vectors (n, 3): ``(cos φ cos λ, cos φ sin λ, sin φ)``."""
    lat = torch.as_tensor(lat, dtype=torch.float64)
    lon = torch.as_tensor(lon, dtype=torch.float64)
    if lat.shape != lon.shape:
        raise ValueError(f"lat and lon must have the same shape, got {tuple(lat.shape)} and {tuple(lon.shape)}")
    _check_latlon(lat, lon, degrees)
    if degrees:
        lat, lon = torch.deg2rad(lat), torch.deg2rad(lon)
    xyz = torch.stack([torch.cos(lat) * torch.cos(lon), torch.cos(lat) * torch.sin(lon), torch.sin(lat)], -1)
    return xyz.to(dtype)


def xyz_to_latlon(x: Tensor, *, degrees: bool = True) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`latlon_to_xyz`: (n, 3) → ``(lat, lon)`` with ``lat ∈ [-90, 90]``,
    ``lon ∈ (-180, 180]`` (degrees) or radians. Points need not be exactly unit length."""
    x = torch.as_tensor(x)
    if x.ndim < 1 or x.shape[-1] != 3:
        raise ValueError(f"expected points of shape (..., 3), got {tuple(x.shape)}")
    lat = torch.atan2(x[..., 2], torch.hypot(x[..., 0], x[..., 1]))
    lon = torch.atan2(x[..., 1], x[..., 0])
    if degrees:
        lat, lon = torch.rad2deg(lat), torch.rad2deg(lon)
    return lat, lon


def _check_latlon(lat: Tensor, lon: Tensor, degrees: bool) -> None:
    if not (torch.isfinite(lat).all() and torch.isfinite(lon).all()):
        raise ValueError("latitude/longitude hold NaN or inf")
    lat_max, lon_lo, lon_hi = (90.0, -180.0, 360.0) if degrees else (math.pi / 2, -math.pi, 2 * math.pi)
    if (lat.abs() > lat_max + 1e-9).any():
        raise ValueError(f"latitude out of range [-{lat_max:g}, {lat_max:g}]: found {float(lat.abs().max()):g}")
    if ((lon < lon_lo - 1e-9) | (lon > lon_hi + 1e-9)).any():
        raise ValueError(f"longitude out of range [{lon_lo:g}, {lon_hi:g}]: found values in "
                         f"[{float(lon.min()):g}, {float(lon.max()):g}]")


def _as_float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def load_latlon_csv(path: str | os.PathLike, *, lat_col: str | int | None = None,
                    lon_col: str | int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Read a CSV of latitude/longitude pairs (degrees) and return unit vectors on ``S²``, shape (n, 3).

    Lines that are blank or start with ``#`` are skipped; non-numeric lines before the first data row are
    taken as a header. Columns: ``lat_col``/``lon_col`` (name or index) if given; else header names
    ``lat``/``latitude`` and ``lon``/``long``/``longitude``; else the first two columns (lat, lon).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: no data rows, a non-numeric or NaN value (with its line number), latitude outside
            ``[-90, 90]`` or longitude outside ``[-180, 360]``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CSV file at {str(path)!r}")
    header: list[str] | None = None
    lat_idx = lon_idx = None
    lats: list[float] = []
    lons: list[float] = []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            cells = [c.strip() for c in row]
            if not any(cells) or cells[0].startswith("#"):
                continue
            if lat_idx is None:
                numeric = len(cells) >= 2 and all(_as_float(c) is not None for c in cells[:2])
                if not numeric:
                    if header is not None:
                        raise ValueError(f"{path}:{lineno}: a second non-numeric header line {row!r}")
                    header = [c.lower() for c in cells]
                    continue
                lat_idx, lon_idx = _columns(header, lat_col, lon_col, path)
            if max(lat_idx, lon_idx) >= len(cells):
                raise ValueError(f"{path}:{lineno}: expected at least {max(lat_idx, lon_idx) + 1} columns, "
                                 f"got {len(cells)}")
            la, lo = _as_float(cells[lat_idx]), _as_float(cells[lon_idx])
            if la is None or lo is None:
                raise ValueError(f"{path}:{lineno}: non-numeric latitude/longitude {row!r}")
            if math.isnan(la) or math.isnan(lo) or math.isinf(la) or math.isinf(lo):
                raise ValueError(f"{path}:{lineno}: NaN or inf latitude/longitude {row!r}")
            if abs(la) > 90:
                raise ValueError(f"{path}:{lineno}: latitude {la:g} outside [-90, 90]")
            if not -180 <= lo <= 360:
                raise ValueError(f"{path}:{lineno}: longitude {lo:g} outside [-180, 360]")
            lats.append(la)
            lons.append(lo)
    if not lats:
        raise ValueError(f"{path}: no latitude/longitude rows found")
    return latlon_to_xyz(lats, lons, dtype=dtype)


def _columns(header: list[str] | None, lat_col, lon_col, path: Path) -> tuple[int, int]:
    def resolve(col, names, what):
        if isinstance(col, int):
            return col
        if isinstance(col, str):
            if header is None or col.lower() not in header:
                raise ValueError(f"{path}: column {col!r} not in header {header}")
            return header.index(col.lower())
        if header is not None:
            for n in names:
                if n in header:
                    return header.index(n)
        return None

    lat_i = resolve(lat_col, _LAT_NAMES, "latitude")
    lon_i = resolve(lon_col, _LON_NAMES, "longitude")
    if lat_i is None and lon_i is None:
        return 0, 1
    if lat_i is None or lon_i is None:
        raise ValueError(f"{path}: found only one of the latitude/longitude columns in header {header}")
    return lat_i, lon_i


def earth_data_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the catalogues: ``root``, else ``$STEERFLOW_EARTH_DATA``, else the folder shipped
    inside the package (:data:`PACKAGED_EARTH_DIR`, which holds ``volcano`` and ``earthquake`` only)."""
    if root is not None:
        return Path(root)
    env = os.environ.get(EARTH_ENV)
    return Path(env) if env else PACKAGED_EARTH_DIR


def earth_file(name: str, root: str | os.PathLike | None = None) -> Path:
    """The CSV file of catalogue ``name``: ``<root>/<file>`` when ``root`` is given; else the copy shipped with
    steerflow (``volcano``, ``earthquake``); else ``$STEERFLOW_EARTH_DATA/<file>``.

    Raises:
        ValueError: ``name`` is not one of :data:`EARTH_DATASETS`.
        FileNotFoundError: the file is not there; the one-line message says where the catalogue comes from.
    """
    if name not in EARTH_DATASETS:
        raise ValueError(f"unknown earth dataset {name!r}; expected one of {sorted(EARTH_DATASETS)}")
    file, source = EARTH_DATASETS[name], EARTH_SOURCES[name]
    if root is not None:
        path = Path(root) / file
        if not path.is_file():
            raise FileNotFoundError(f"earth catalogue {name!r}: no {file} in {str(root)!r}; it comes from {source}")
        return path
    packaged = PACKAGED_EARTH_DIR / file
    if packaged.is_file():
        return packaged
    env = os.environ.get(EARTH_ENV)
    if env:
        path = Path(env) / file
        if not path.is_file():
            raise FileNotFoundError(f"earth catalogue {name!r}: no {file} in {env!r} (from {EARTH_ENV}); download "
                                    f"it from {source} into that folder")
        return path
    raise FileNotFoundError(f"earth catalogue {name!r} is not shipped with steerflow (its source states no "
                            f"licence): download {file} from {source} and set {EARTH_ENV} to the folder holding it")


def load_earth(name: str, root: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Load ``volcano`` (827), ``earthquake`` (6,120) or ``flood`` (4,875) as unit vectors (n, 3).

    ``name`` may also be a path to a CSV file. ``root`` is a folder holding the catalogue's file; without it
    ``volcano`` and ``earthquake`` come from the copies shipped with steerflow and ``flood`` from
    ``$STEERFLOW_EARTH_DATA`` (see :func:`earth_file`; sources in :data:`EARTH_SOURCES`).
    """
    if name not in EARTH_DATASETS:
        p = Path(name)
        if p.suffix.lower() == ".csv" or p.is_file():
            return load_latlon_csv(p, dtype=dtype)
        raise ValueError(f"unknown earth dataset {name!r}; expected one of {sorted(EARTH_DATASETS)} or a CSV path")
    return load_latlon_csv(earth_file(name, root), dtype=dtype)


def random_split(x: Tensor, fractions: tuple[float, ...] = (0.8, 0.1, 0.1),
                 generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """Shuffle the rows of ``x`` and cut them into parts of the given fractions (the last takes the rest)."""
    if not fractions or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions}")
    perm = torch.randperm(x.shape[0], generator=generator)
    sizes = [int(round(f * x.shape[0])) for f in fractions[:-1]]
    sizes.append(x.shape[0] - sum(sizes))
    return tuple(x[idx] for idx in torch.split(perm, sizes))
