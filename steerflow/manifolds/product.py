"""Products ``M_1 × … × M_k`` with flat concatenated coordinates."""
from __future__ import annotations

import math
from typing import final

import torch
from torch import Tensor

from .base import AbstractManifold


@final
class Product(AbstractManifold):
    """``M_1 × … × M_k`` with the product metric; a point is the concatenation of its factors' flattened
    ambient coordinates, shape ``(b, Σ_j prod(M_j.shape))``.

    ``shapes`` records each factor's ambient shape and ``slices`` where it sits; :meth:`split` /
    :meth:`join` convert. Every operation acts factor by factor; ``inner`` and ``base_log_prob`` add up,
    ``dist = sqrt(Σ_j d_j²)``, the base is the product of the factors' bases.
    """

    def __init__(self, *manifolds: AbstractManifold) -> None:
        if len(manifolds) < 1:
            raise ValueError("Product needs at least one factor manifold")
        for m in manifolds:
            if not isinstance(m, AbstractManifold):
                raise TypeError(f"Product factors must be AbstractManifold instances, got {type(m).__name__}")
        self.factors = tuple(manifolds)
        self.shapes = tuple(tuple(m.shape) for m in manifolds)
        sizes = [math.prod(s) for s in self.shapes]
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        self.slices = tuple(slice(a, b) for a, b in zip(offsets[:-1], offsets[1:]))
        self.dim = sum(m.dim for m in manifolds)
        self.shape = (offsets[-1],)
        self.name = "x".join(m.name for m in manifolds)

    def split(self, x: Tensor) -> list[Tensor]:
        """(b, D) → factor tensors of shapes ``(b, *M_j.shape)``."""
        return [x[:, sl].reshape(x.shape[0], *sh) for sl, sh in zip(self.slices, self.shapes)]

    def join(self, parts: list[Tensor]) -> Tensor:
        """Inverse of :meth:`split`."""
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)

    def _map(self, fn: str, *tensors: Tensor) -> Tensor:
        split = [self.split(a) for a in tensors]
        return self.join([getattr(m, fn)(*args) for m, *args in zip(self.factors, *split)])

    def _sum(self, fn: str, *tensors: Tensor) -> Tensor:
        split = [self.split(a) for a in tensors]
        return sum(getattr(m, fn)(*args) for m, *args in zip(self.factors, *split))

    def expmap(self, x, u):
        return self._map("expmap", x, u)

    def retract(self, x, dx):
        return self._map("retract", x, dx)

    def logmap(self, x, y):
        return self._map("logmap", x, y)

    def projx(self, x):
        return self._map("projx", x)

    def proju(self, x, u):
        return self._map("proju", x, u)

    def covector(self, x, u):
        return self._map("covector", x, u)

    def inner(self, x, u, w):
        return self._sum("inner", x, u, w)

    def dist(self, x, y):
        xs, ys = self.split(x), self.split(y)
        return torch.sqrt(sum(m.dist(a, b) ** 2 for m, a, b in zip(self.factors, xs, ys)))

    def random_base(self, n, generator=None, *, dtype=torch.float32, device=None):
        return self.join([m.random_base(n, generator, dtype=dtype, device=device) for m in self.factors])

    def base_log_prob(self, x):
        return self._sum("base_log_prob", x)

    def residual(self, x):
        return torch.stack([m.residual(a) for m, a in zip(self.factors, self.split(x))], -1).amax(-1)

    def tangent_basis(self, x):
        """Block-diagonal: factor ``j``'s basis in its own rows and columns."""
        E = torch.zeros(x.shape[0], self.shape[0], self.dim, dtype=x.dtype, device=x.device)
        col = 0
        for m, sl, a in zip(self.factors, self.slices, self.split(x)):
            E[:, sl, col:col + m.dim] = m.tangent_basis(a)
            col += m.dim
        return E

    def geodesic_velocity(self, x, u, t):
        return self.join([m.geodesic_velocity(a, b, t) for m, a, b in zip(self.factors, self.split(x), self.split(u))])

    def geodesic(self, x_0, x_1, t):
        pairs = [m.geodesic(a, b, t) for m, a, b in zip(self.factors, self.split(x_0), self.split(x_1))]
        return self.join([p[0] for p in pairs]), self.join([p[1] for p in pairs])

    def periodic_features(self, x: Tensor) -> Tensor:
        """Network input features ``(b, F)``: each factor's own ``periodic_features`` where it has them (a
        torus: ``cos θ, sin θ``), its flattened coordinates otherwise; the ``embed`` for
        :class:`~steerflow.manifolds.TangentVelocity` on a product with a torus factor."""
        return torch.cat([m.periodic_features(a) if hasattr(m, "periodic_features") else a.reshape(a.shape[0], -1)
                          for m, a in zip(self.factors, self.split(x))], dim=-1)

    def __repr__(self) -> str:
        return f"Product({', '.join(repr(m) for m in self.factors)})"
