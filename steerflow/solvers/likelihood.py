"""Log-likelihood of a flow by the instantaneous change of variables (Chen et al. 2018, FFJORD).

``d/dt log p_t(x_t) = -div v(x_t, t)``, so with the data at ``t = 1``:
``log p_1(x_1) = log p_0(x_0) - ∫_0^1 div v(x_t, t) dt`` where ``x_0`` is ``x_1`` integrated back to
``t = 0``. The divergence is exact (one vector-Jacobian product per dimension) or Hutchinson's
estimate ``E[εᵀ (∂v/∂x) ε]`` with one probe ``ε`` per sample held for the whole solve. Under
``torch.enable_grad`` (the default) the result carries gradients with respect to the field's parameters.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .._types import VelocityField
from ..metrics.cost import Cost
from .grids import uniform_grid
from .sample import sample
from .steps import FLAT, Geometry


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """``log N(x; 0, I)`` summed over all but the batch dimension; shape (b,)."""
    d = x[0].numel()
    return -0.5 * x.reshape(x.shape[0], -1).pow(2).sum(-1) - 0.5 * d * math.log(2 * math.pi)


class _Augmented:
    """Geometry of the state ``[x, ℓ]``: ``x`` moves on ``geometry``, the log-density ``ℓ`` in flat space."""

    def __init__(self, geometry: Geometry, shape: tuple[int, ...]) -> None:
        self.geometry, self.shape = geometry, shape
        self.projection_stages = bool(getattr(geometry, "projection_stages", False))

    def projx(self, z: Tensor) -> Tensor:
        x, l = self._split(z)
        return torch.cat([self.geometry.projx(x).reshape(z.shape[0], -1), l], dim=1)

    def _split(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z[:, :-1].reshape(z.shape[0], *self.shape), z[:, -1:]

    def retract(self, z: Tensor, dz: Tensor) -> Tensor:
        x, l = self._split(z)
        dx, dl = self._split(dz)
        return torch.cat([self.geometry.retract(x, dx).reshape(z.shape[0], -1), l + dl], dim=1)

    def proju(self, z: Tensor, dz: Tensor) -> Tensor:
        x, _ = self._split(z)
        dx, dl = self._split(dz)
        return torch.cat([self.geometry.proju(x, dx).reshape(z.shape[0], -1), dl], dim=1)


def divergence_exact(v_out: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    """``Σ_i ∂v_i/∂x_i`` by one vector-Jacobian product per dimension; shape (b,)."""
    flat = v_out.reshape(v_out.shape[0], -1)
    div = torch.zeros(flat.shape[0], dtype=flat.dtype, device=flat.device)
    for i in range(flat.shape[1]):
        (g,) = torch.autograd.grad(flat[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
        div = div + g.reshape(g.shape[0], -1)[:, i]
    return div


def divergence_hutchinson(v_out: Tensor, x: Tensor, eps: Tensor, create_graph: bool) -> Tensor:
    """Hutchinson's unbiased estimate ``εᵀ (∂v/∂x) ε`` with a given probe ``ε`` (b, *d)."""
    (g,) = torch.autograd.grad(v_out, x, grad_outputs=eps, create_graph=create_graph, retain_graph=True)
    return (g * eps).reshape(x.shape[0], -1).sum(-1)


def log_likelihood(
    v: VelocityField,
    x_1: Tensor,
    *,
    steps: int | None = None,
    ts: Tensor | None = None,
    method: str = "rk4",
    divergence: str | Callable[[Tensor, Tensor, Tensor, bool], Tensor] = "auto",
    base_log_prob: Callable[[Tensor], Tensor] = standard_normal_log_prob,
    geometry: Geometry | None = None,
    generator: torch.Generator | None = None,
    hutchinson_noise: str = "rademacher",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    cost: Cost | None = None,
) -> Tensor:
    """Return ``log p_1(x_1)`` (b,) of the flow ``v`` whose source density is ``base_log_prob``.

    Args:
        divergence: ``exact``, ``hutchinson``, ``auto`` (exact up to 16 dimensions) or a callable
            ``div(v_out, x, t, create_graph) -> (b,)`` (a manifold passes its Riemannian divergence).
        ts: a grid from 1 down to 0 (default ``uniform_grid(steps or 32).flip(0)``; dopri5 one span).
    """
    if x_1.ndim < 2:
        raise ValueError(f"x_1 must have shape (b, *d), got {tuple(x_1.shape)}")
    geometry = geometry or FLAT
    shape = tuple(x_1.shape[1:])
    d = x_1[0].numel()
    if divergence == "auto":
        divergence = "exact" if d <= 16 else "hutchinson"
    if isinstance(divergence, str) and divergence not in ("exact", "hutchinson"):
        raise ValueError(f"unknown divergence {divergence!r}; expected 'exact', 'hutchinson' or a callable")
    want_graph = torch.is_grad_enabled()
    eps = None
    if divergence == "hutchinson":
        if hutchinson_noise == "rademacher":
            eps = torch.randint(0, 2, x_1.shape, generator=generator, device="cpu").to(x_1) * 2 - 1
        elif hutchinson_noise == "gaussian":
            eps = torch.randn(x_1.shape, generator=generator, device="cpu").to(x_1)
        else:
            raise ValueError(f"unknown hutchinson_noise {hutchinson_noise!r}; expected 'rademacher' or 'gaussian'")

    def field(z: Tensor, t: Tensor) -> Tensor:
        x = z[:, :-1].reshape(z.shape[0], *shape)
        with torch.enable_grad():
            if not want_graph:
                x = x.detach()
            if not x.requires_grad:
                x = x.requires_grad_(True)
            out = v(x, t)
            if callable(divergence):
                div = divergence(out, x, t, want_graph)
            elif divergence == "exact":
                div = divergence_exact(out, x, want_graph)
            else:
                div = divergence_hutchinson(out, x, eps, want_graph)
        if not want_graph:
            out, div = out.detach(), div.detach()
        return torch.cat([out.reshape(z.shape[0], -1), div[:, None]], dim=1)

    if ts is None:
        ts = torch.tensor([1.0, 0.0], dtype=torch.float64) if method == "dopri5" and steps is None \
            else uniform_grid(steps or 32).flip(0)
    z_1 = torch.cat([x_1.reshape(x_1.shape[0], -1), x_1.new_zeros(x_1.shape[0], 1)], dim=1)
    z_0 = sample(field, z_1, ts=ts, method=method, geometry=_Augmented(geometry, shape), atol=atol,
                 rtol=rtol, cost=cost)
    x_0 = z_0[:, :-1].reshape(x_1.shape)
    return base_log_prob(x_0) + z_0[:, -1]
