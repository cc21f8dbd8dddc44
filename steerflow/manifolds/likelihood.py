"""Riemannian divergence and likelihood of a flow on a manifold (Chen & Lipman 2024, §3.4).

For a tangent field ``v`` on ``M`` the density of the flow obeys ``d/dt log p_t(x_t) = -div_g v(x_t, t)``
with the Riemannian divergence ``div_g v = Σ_i ⟨∇_{e_i} v, e_i⟩_g`` over a ``g``-orthonormal basis
``e_i`` of ``T_x M``. For an (isometrically) embedded manifold the Levi-Civita connection is the
tangential part of the ambient derivative, ``∇_{e_i} v = P_x (Dv · e_i)``, so

    ``div_g v(x) = Σ_i (G e_i) · J e_i``,  ``J = ∂ P_x v(x) / ∂x`` (ambient Jacobian),

which is independent of how ``v`` is extended off ``M`` because only tangential derivatives enter.
Projecting first (``P_x v``) removes the normal component, whose tangential derivative would otherwise
add a mean-curvature term (``-n ⟨x, v⟩`` on ``Sⁿ``). Cost: ``dim`` vector-Jacobian products.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .._types import VelocityField
from ..metrics.cost import Cost
from ..solvers.likelihood import log_likelihood
from .base import AbstractManifold


def riemannian_divergence(manifold: AbstractManifold) -> Callable[[Tensor, Tensor, Tensor, bool], Tensor]:
    """Return ``div(v_out, x, t, create_graph) -> (b,)`` for :func:`steerflow.solvers.log_likelihood`.

    ``v_out`` must be computed from ``x`` (which requires grad); the exact Riemannian divergence
    ``Σ_i (G e_i) · ∂(P_x v)/∂x · e_i`` with ``e_i = manifold.tangent_basis(x)``.
    """
    if not isinstance(manifold, AbstractManifold):
        raise TypeError(f"manifold must be an AbstractManifold, got {type(manifold).__name__}")

    def divergence(v_out: Tensor, x: Tensor, t: Tensor, create_graph: bool) -> Tensor:
        b = x.shape[0]
        v_tan = manifold.proju(x, v_out)
        with torch.no_grad():
            E = manifold.tangent_basis(x.detach())  # (b, D, dim)
        div = torch.zeros(b, dtype=x.dtype, device=x.device)
        for i in range(E.shape[-1]):
            e_i = E[:, :, i].reshape(x.shape)
            (g,) = torch.autograd.grad(v_tan, x, grad_outputs=manifold.covector(x.detach(), e_i),
                                       create_graph=create_graph, retain_graph=True)
            div = div + (g * e_i).reshape(b, -1).sum(-1)  # (G e_i)ᵀ J e_i
        return div

    return divergence


def manifold_log_likelihood(
    v: VelocityField,
    x_1: Tensor,
    manifold: AbstractManifold,
    *,
    steps: int | None = None,
    ts: Tensor | None = None,
    method: str = "rk4",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    cost: Cost | None = None,
    enable_grad: bool = False,
    batch_size: int | None = None,
    base_log_prob: Callable[[Tensor], Tensor] | None = None,
    progress: bool = False,
) -> Tensor:
    """``log p_1(x_1)`` (b,) w.r.t. the Riemannian volume of ``manifold``:

    ``log p_1(x_1) = log p_base(x_0) - ∫_0^1 div_g v(x_t, t) dt`` with ``x_0`` the point ``x_1`` flows back
    to (Chen & Lipman 2024, eq. 7; Mathieu & Nickel 2020). Solved by
    :func:`steerflow.solvers.log_likelihood` with ``geometry=manifold``, the exact Riemannian divergence
    and the source density ``base_log_prob`` (default ``manifold.base_log_prob``; pass the ``log_prob`` of the
    source the flow was trained from, e.g. a :class:`~steerflow.manifolds.VonMisesFisherMixture`'s).
    The default grid is 32 uniform steps from 1 to 0 (RK4). No autograd graph is kept unless
    ``enable_grad=True``; ``batch_size`` bounds how many points are solved at once (``progress``: a bar over the
    batches).

    A point whose backward trajectory leaves ``manifold.in_numeric_range`` (on ``H²`` a learned field can
    carry it to infinity in finite time) gets ``-inf`` and the others are unaffected; a ``RuntimeWarning``
    counts them (see :func:`~steerflow.solvers.log_likelihood`).
    """
    return log_likelihood(v, x_1, steps=steps, ts=ts, method=method, divergence=riemannian_divergence(manifold),
                          base_log_prob=manifold.base_log_prob if base_log_prob is None else base_log_prob,
                          geometry=manifold, atol=atol, rtol=rtol,
                          cost=cost, enable_grad=enable_grad, batch_size=batch_size, progress=progress)
