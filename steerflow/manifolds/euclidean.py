"""Flat space ``R^d`` as a manifold: the identity geometry, standard-normal base."""
from __future__ import annotations

import math
from typing import final

import torch
from torch import Tensor

from .base import AbstractManifold


def _check_dim(d, what: str, minimum: int = 1) -> int:
    if not isinstance(d, int) or isinstance(d, bool) or d < minimum:
        raise ValueError(f"{what} must be an integer ≥ {minimum}, got {d!r}")
    return d


@final
class Euclidean(AbstractManifold):
    """``R^d`` with ``exp_x(u) = x + u``, ``log_x(y) = y - x`` and base ``N(0, I_d)``.

    Its geodesic is the rectified-flow line: :meth:`geodesic` returns exactly ``LinearPath``'s
    ``x_t = t x_1 + (1 - t) x_0``, ``u_t = x_1 - x_0`` (same floating-point expression).
    """

    def __init__(self, d: int) -> None:
        self.dim = _check_dim(d, "Euclidean dimension d")
        self.shape = (d,)
        self.name = f"euclidean{d}"

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        return x + u

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        return y - x

    def projx(self, x: Tensor) -> Tensor:
        return x

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        return u

    def inner(self, x: Tensor, u: Tensor, w: Tensor) -> Tensor:
        return (u * w).sum(-1)

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        return (y - x).norm(dim=-1)

    def retract(self, x: Tensor, dx: Tensor) -> Tensor:
        return x + dx

    def random_base(self, n, generator=None, *, dtype=torch.float32, device=None):
        return torch.randn((n, self.dim), generator=generator, dtype=dtype, device=device or "cpu")

    def base_log_prob(self, x: Tensor) -> Tensor:
        """``log N(x; 0, I) = -|x|²/2 - d/2 log 2π``."""
        return -0.5 * (x * x).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)

    def tangent_basis(self, x: Tensor) -> Tensor:
        return torch.eye(self.dim, dtype=x.dtype, device=x.device).expand(x.shape[0], self.dim, self.dim)

    def residual(self, x: Tensor) -> Tensor:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def geodesic_velocity(self, x: Tensor, u: Tensor, t: Tensor) -> Tensor:
        return u

    def geodesic(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        tt = t.reshape(-1, 1).to(x_0)
        return tt * x_1 + (1 - tt) * x_0, x_1 - x_0
