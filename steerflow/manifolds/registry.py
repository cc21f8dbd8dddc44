"""String registry of manifolds: ``get_manifold("sphere2")``, ``get_manifold("sphere2xtorus1")``."""
from __future__ import annotations

import re

from .base import AbstractManifold
from .euclidean import Euclidean
from .hyperbolic import Hyperbolic
from .product import Product
from .so3 import SO3
from .sphere import Sphere
from .torus import FlatTorus

MANIFOLDS: dict[str, type] = {"euclidean": Euclidean, "sphere": Sphere, "torus": FlatTorus, "so3": SO3,
                              "hyperbolic": Hyperbolic}
"""Factor names; a spec is ``name`` + intrinsic dimension (``so3`` takes none), factors joined by ``x``."""

_FACTOR = re.compile(r"([a-z]+?)(\d*)")


def _factor(spec: str) -> AbstractManifold:
    if spec == "so3":
        return SO3()
    m = _FACTOR.fullmatch(spec)
    if m is None or m.group(1) not in MANIFOLDS or m.group(1) == "so" or not m.group(2):
        raise ValueError(f"unknown manifold factor {spec!r}; expected one of "
                         f"{sorted(k + '<n>' for k in MANIFOLDS if k != 'so3') + ['so3']} (e.g. 'sphere2')")
    return MANIFOLDS[m.group(1)](int(m.group(2)))


def get_manifold(spec: str | AbstractManifold) -> AbstractManifold:
    """Build a manifold from a spec or pass one through.

    ``"sphere2"`` → ``Sphere(2)``, ``"torus2"`` → ``FlatTorus(2)``, ``"so3"`` → ``SO3()``,
    ``"hyperbolic2"`` → ``Hyperbolic(2)``, ``"euclidean3"`` → ``Euclidean(3)``, and products joined by
    ``x`` (or ``×``): ``"sphere2xtorus1"`` → ``Product(Sphere(2), FlatTorus(1))``.
    """
    if isinstance(spec, AbstractManifold):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a manifold spec must be a string or an AbstractManifold, got {type(spec).__name__}")
    parts = [p.strip() for p in spec.lower().replace("×", "x").split("x")]
    if not all(parts):
        raise ValueError(f"malformed manifold spec {spec!r}; expected e.g. 'sphere2' or 'sphere2xtorus1'")
    factors = [_factor(p) for p in parts]
    return factors[0] if len(factors) == 1 else Product(*factors)
