"""Log-likelihood of a flow by the instantaneous change of variables (Chen et al. 2018, FFJORD).

``d/dt log p_t(x_t) = -div v(x_t, t)``, so with the data at ``t = 1``:
``log p_1(x_1) = log p_0(x_0) - ∫_0^1 div v(x_t, t) dt`` where ``x_0`` is ``x_1`` integrated back to
``t = 0``. The divergence is exact (one vector-Jacobian product per dimension) or Hutchinson's
estimate ``E[εᵀ (∂v/∂x) ε]`` with one probe ``ε`` per sample held for the whole solve. With
``enable_grad=True`` the result carries gradients with respect to ``x_1`` and the field's parameters.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor

from .._types import VelocityField, check_batch
from .cost import Cost
from .grids import uniform_grid
from .sample import sample
from .steps import FLAT, Geometry, SolveBreakdown


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


def in_numeric_range(x: Tensor) -> Tensor:
    """(b,) True where every coordinate of a point is finite and at most ``finfo(dtype).max ** (1/4)`` in size.

    The default numeric range of a geometry: products of up to four coordinates (a metric, its derivative
    in a vector-Jacobian product) stay finite there. Points beyond it have escaped to infinity.
    """
    flat = x.detach().reshape(x.shape[0], -1)
    if not flat.is_floating_point():
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return (flat.abs() <= torch.finfo(flat.dtype).max ** 0.25).all(-1)  # False for NaN and ±inf


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
    enable_grad: bool = False,
    batch_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Return ``log p_1(x_1)`` (b,) of the flow ``v`` whose source density is ``base_log_prob``.

    Args:
        divergence: ``exact``, ``hutchinson``, ``auto`` (exact up to 16 dimensions) or a callable
            ``div(v_out, x, t, create_graph) -> (b,)`` (a manifold passes its Riemannian divergence).
        ts: a grid from 1 down to 0 (default ``uniform_grid(steps or 32).flip(0)``; dopri5 one span).
        enable_grad: return a result that carries gradients (with respect to ``x_1`` and the field's
            parameters). Off by default: the divergence's VJPs are taken without keeping the solve's graph.
        batch_size: solve at most this many points at a time, so memory is that of one such solve (default:
            all at once). The result does not depend on it (Hutchinson's probes are drawn for all points first).
        progress: show a progress bar over the batches.

    Points whose backward trajectory leaves the numeric range of ``geometry`` (``geometry.in_numeric_range``,
    else :func:`in_numeric_range`) — a learned field on ``H²`` can carry a point to infinity in finite time —
    get ``-inf``: no base point flows to them, so the model's density there is 0. Such a point is frozen
    (zero velocity) from the first evaluation outside the range, so it cannot spoil the other points'
    solve; a point outside the range to begin with gets NaN. A ``RuntimeWarning`` gives both counts. dopri5
    controls one step size for the whole batch, so an escaping point can shrink it to nothing before it
    leaves the range: a batch whose solve stops so (step size underflow, non-finite values) is solved again
    in halves, down to the single points that cannot be solved (``-inf``).
    """
    check_batch(x_1, "x_1")  # a tensor (b, *d), b ≥ 1, floating point, finite
    geometry = geometry or FLAT
    shape = tuple(x_1.shape[1:])
    d = x_1[0].numel()
    if divergence == "auto":
        divergence = "exact" if d <= 16 else "hutchinson"
    if isinstance(divergence, str) and divergence not in ("exact", "hutchinson"):
        raise ValueError(f"unknown divergence {divergence!r}; expected 'exact', 'hutchinson' or a callable")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    want_graph = bool(enable_grad)
    eps = None
    if divergence == "hutchinson":
        if hutchinson_noise == "rademacher":
            eps = torch.randint(0, 2, x_1.shape, generator=generator, device="cpu").to(x_1) * 2 - 1
        elif hutchinson_noise == "gaussian":
            eps = torch.randn(x_1.shape, generator=generator, device="cpu").to(x_1)
        else:
            raise ValueError(f"unknown hutchinson_noise {hutchinson_noise!r}; expected 'rademacher' or 'gaussian'")
    if ts is None:
        ts = torch.tensor([1.0, 0.0], dtype=torch.float64) if method == "dopri5" and steps is None \
            else uniform_grid(steps or 32).flip(0)
    in_range = getattr(geometry, "in_numeric_range", in_numeric_range)
    solve = _BackwardSolve(v, divergence, base_log_prob, geometry, in_range, shape, want_graph,
                           dict(ts=ts, method=method, atol=atol, rtol=rtol, cost=cost))
    n = x_1.shape[0]
    size = n if batch_size is None else batch_size
    starts = range(0, n, size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="log-likelihood", unit="batch", leave=False)
    parts = [_solve_or_split(solve, x_1[i:i + size], None if eps is None else eps[i:i + size]) for i in starts]
    logp = torch.cat([p[0] for p in parts])
    outside, escaped = (int(sum(p[k].sum() for p in parts)) for k in (1, 2))
    if outside or escaped:
        where = getattr(geometry, "name", None) or "flat space"
        warnings.warn(f"log_likelihood: {escaped} of {n} points left the numeric range of {where} in the backward "
                      f"solve (log-likelihood -inf: the flow does not reach them)"
                      + (f"; {outside} lie outside it to begin with (NaN)" if outside else ""),
                      RuntimeWarning, stacklevel=2)
    return logp


def _solve_or_split(solve: "_BackwardSolve", x_1: Tensor, eps: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``solve(x_1, eps)``; when an adaptive solve gives up, the two halves of the batch, recursively."""
    try:
        return solve(x_1, eps)
    except SolveBreakdown:  # (not max_steps: a stiff batch is not an escaping one)
        pass
    b = x_1.shape[0]
    if b == 1:
        flag = torch.ones(1, dtype=torch.bool, device=x_1.device)
        return x_1.new_full((1,), -math.inf), ~flag, flag
    h = b // 2
    a, c = (_solve_or_split(solve, x_1[sl], None if eps is None else eps[sl]) for sl in (slice(0, h), slice(h, b)))
    return tuple(torch.cat([u, w]) for u, w in zip(a, c))


class _BackwardSolve:
    """One batch of :func:`log_likelihood`: ``x_1`` → ``(log p_1, outside, escaped)`` with two (b,) masks.

    The augmented state is ``z = [x, ℓ]`` with ``dℓ/dt = div v``. A point that leaves the numeric range at any
    evaluation (a stage of a rejected dopri5 step included) is frozen for the rest of the solve: its velocity
    and divergence are 0, so it neither turns non-finite nor enters the other points' step-size control.
    """

    def __init__(self, v, divergence, base_log_prob, geometry, in_range, shape, want_graph, ode) -> None:
        self.v, self.divergence, self.base_log_prob = v, divergence, base_log_prob
        self.geometry, self.in_range, self.shape, self.want_graph, self.ode = geometry, in_range, shape, want_graph, ode

    def __call__(self, x_1: Tensor, eps: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        b, shape = x_1.shape[0], self.shape
        outside = ~self.in_range(x_1.detach())
        if outside.any():  # NaN for them; the solver is given the others only (it refuses non-finite states)
            logp = x_1.new_full((b,), math.nan)
            escaped = torch.zeros(b, dtype=torch.bool, device=x_1.device)
            inside = (~outside).nonzero().squeeze(1)
            if inside.numel():
                lp, _, esc = self(x_1[inside], None if eps is None else eps[inside])
                logp, escaped = logp.index_copy(0, inside, lp), escaped.index_copy(0, inside, esc)
            return logp, outside, escaped
        frozen = torch.zeros(b, dtype=torch.bool, device=x_1.device)

        def field(z: Tensor, t: Tensor) -> Tensor:
            x = z[:, :-1].reshape(b, *shape)
            frozen.logical_or_(~(self.in_range(x.detach()) & torch.isfinite(z[:, -1].detach())))
            if not frozen.any():
                return self._velocity(x, t, eps)
            keep = (~frozen).nonzero().squeeze(1)
            dz = z.new_zeros(z.shape)
            if keep.numel() == 0:
                return dz
            return dz.index_copy(0, keep, self._velocity(x[keep], t[keep], None if eps is None else eps[keep]))

        z_1 = torch.cat([x_1.reshape(b, -1), x_1.new_zeros(b, 1)], dim=1)
        z_0 = sample(field, z_1, geometry=_Augmented(self.geometry, shape), enable_grad=self.want_graph,
                     check_finite=False, **self.ode)
        x_0 = z_0[:, :-1].reshape(x_1.shape)
        logp = self.base_log_prob(x_0) + z_0[:, -1]
        escaped = frozen | ~self.in_range(x_0.detach()) | ~torch.isfinite(z_0[:, -1].detach())
        if escaped.any():
            logp = torch.where(escaped, torch.full_like(logp, -math.inf), logp)
        return logp, outside, escaped

    def _velocity(self, x: Tensor, t: Tensor, eps: Tensor | None) -> Tensor:
        """``[v(x, t), div v(x, t)]`` flattened: shape (b, D + 1)."""
        want_graph, divergence = self.want_graph, self.divergence
        with torch.enable_grad():
            if not want_graph:
                x = x.detach()
            if not x.requires_grad:
                x = x.requires_grad_(True)
            out = self.v(x, t)
            if callable(divergence):
                div = divergence(out, x, t, want_graph)
            elif divergence == "exact":
                div = divergence_exact(out, x, want_graph)
            else:
                div = divergence_hutchinson(out, x, eps, want_graph)
        if not want_graph:
            out, div = out.detach(), div.detach()
        return torch.cat([out.reshape(x.shape[0], -1), div[:, None]], dim=1)
