"""The flat torus ``Tⁿ = (R / 2πZ)ⁿ`` in angle coordinates."""
from __future__ import annotations

import math
from typing import final

import torch
from torch import Tensor

from .base import AbstractManifold
from .euclidean import _check_dim

TWO_PI = 2 * math.pi


def wrap_angle(a: Tensor) -> Tensor:
    """Map angles to ``[-π, π)``: the representative of ``a mod 2π`` nearest 0."""
    return torch.remainder(a + math.pi, TWO_PI) - math.pi


@final
class FlatTorus(AbstractManifold):
    """``Tⁿ`` with points stored as angles in ``[0, 2π)`` (shape ``(b, n)``) and the flat metric.

    * ``exp_x(u) = (x + u) mod 2π``; ``log_x(y) = wrap(y - x)`` with ``wrap`` into ``[-π, π)``, so the
      geodesic between two points crosses the seam at ``0 ≡ 2π`` when that is shorter;
    * tangent vectors are plain vectors in ``Rⁿ`` (``proju`` is the identity);
    * base: uniform, ``log p = -n log 2π``.

    Networks should see the angles through periodic features: :meth:`periodic_features` (``cos, sin``)
    is the ``embed`` to give :class:`~steerflow.manifolds.TangentVelocity`.
    """

    def __init__(self, n: int = 2) -> None:
        self.dim = _check_dim(n, "torus dimension n")
        self.shape = (n,)
        self.name = f"torus{n}"

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        return self.projx(x + u)

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        return wrap_angle(y - x)

    def projx(self, x: Tensor) -> Tensor:
        """Reduce angles to ``[0, 2π)`` (a value that rounds up to ``2π`` becomes 0)."""
        r = torch.remainder(x, TWO_PI)
        return torch.where(r >= TWO_PI, torch.zeros_like(r), r)

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        return u

    def inner(self, x: Tensor, u: Tensor, w: Tensor) -> Tensor:
        return (u * w).sum(-1)

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        return wrap_angle(y - x).norm(dim=-1)

    def random_base(self, n, generator=None, *, dtype=torch.float32, device=None):
        u = torch.rand((n, self.dim), generator=generator, dtype=dtype, device=device or "cpu")
        return self.projx(TWO_PI * u)

    def base_log_prob(self, x: Tensor) -> Tensor:
        return torch.full(x.shape[:1], -self.dim * math.log(TWO_PI), dtype=x.dtype, device=x.device)

    def tangent_basis(self, x: Tensor) -> Tensor:
        return torch.eye(self.dim, dtype=x.dtype, device=x.device).expand(x.shape[0], self.dim, self.dim)

    def residual(self, x: Tensor) -> Tensor:
        below = torch.clamp_min(-x, 0.0)
        above = torch.clamp_min(x - TWO_PI, 0.0) + (x == TWO_PI).to(x)  # 2π itself is outside [0, 2π)
        return (below + above).amax(-1)

    def geodesic_velocity(self, x: Tensor, u: Tensor, t: Tensor) -> Tensor:
        return u

    def wrap(self, x: Tensor) -> Tensor:
        """Angles in radians in ``[-π, 2π]`` — the ``[-π, π)`` convention as well as ``[0, 2π)`` — as points of
        the torus, in ``[0, 2π)`` (``x mod 2π``).

        Raises:
            ValueError: a value outside ``[-π, 2π]`` or NaN (degrees, or another convention), with the range found.
        """
        x = torch.as_tensor(x)
        if not _wrappable(x):
            raise ValueError(f"cannot wrap onto {self.name}: expected angles in radians in [-π, 2π], "
                             f"{_found(x)}{_degrees_hint(x)}")
        return self.projx(x)

    def describe_points(self, x: Tensor) -> str:
        """The expected range ``[0, 2π)`` next to the values found, and how to map what was found there."""
        how = "; angles in [-π, π) map there with FlatTorus.wrap (x mod 2π)" if _wrappable(x) else _degrees_hint(x)
        return f"expected angles in radians in [0, 2π) = [0, {TWO_PI:.4f}), {_found(x)}{how}"

    def periodic_features(self, x: Tensor) -> Tensor:
        """``(cos x, sin x)``: shape ``(b, 2n)``, a continuous embedding of ``Tⁿ`` for network inputs."""
        return torch.cat([torch.cos(x), torch.sin(x)], dim=-1)


_SLACK = 1e-6  # float32 rounds ±π and 2π outward by up to 2.4e-7


def _wrappable(x: Tensor) -> bool:
    """Every value in ``[-π, 2π]`` (NaN is not)."""
    return bool(((x >= -math.pi - _SLACK) & (x <= TWO_PI + _SLACK)).all())


def _found(x: Tensor) -> str:
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return "got no finite values"
    nonfinite = x.numel() - finite.numel()
    return (f"got values in [{float(finite.min()):.4g}, {float(finite.max()):.4g}]"
            + (f" and {nonfinite} NaN/inf" if nonfinite else ""))


def _degrees_hint(x: Tensor) -> str:
    finite = x[torch.isfinite(x)]
    if finite.numel() and float(finite.abs().max()) > TWO_PI and float(finite.abs().max()) <= 360.0:
        return " (degrees? radians = degrees · π/180)"
    return ""
