"""Constrained domains with reflecting boundaries: boxes and simplices (Xie et al. 2024, "Reflected Flow
Matching", ICML).

A domain is a *geometry* for :func:`steerflow.sample`: every solver stage is formed with
``retract(x, dx)``, which follows the straight segment ``x → x + dx`` and reflects it off every wall it
meets (a billiard), so every stage state lies in the closed domain. Training uses the reflected
conditional path :class:`~steerflow.paths.ReflectedPath` (importable from here too): ``x_t = R(y_t)`` with ``y_t = alpha_t x_1 + sigma_t x_0`` and the
target velocity is the *reflected* velocity ``u_t = J_R(y_t) ẏ_t`` (the derivative of the fold along the
unreflected path; for a box ``J_R`` flips the sign of every coordinate that has been reflected an odd
number of times). The conditional flow is then the solution of the reflected ODE
``dx = u_t(x | x_1) dt + dL_t`` of the paper (Skorokhod problem with normal reflection), and its marginal
velocity ``E[u_t | x_t]`` generates the reflected marginal path.

Box fold (any number of reflections at once): with ``L = high - low`` and ``m = (y - low) mod 2L``,
``R(y) = low + m`` where ``m ≤ L`` and ``R(y) = low + 2L - m`` otherwise; ``J_R(y) = diag(±1)`` with the
same case split. For the simplex (whose reflection group does not tile space for ``d ≥ 3``) the reflection
is the billiard itself: the segment from a start point is traced face to face with Householder reflections
``r ← r - 2 (aᵀr / aᵀa) a`` until its length is used up; ``J_R`` is the product of those reflections.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..paths.reflected import ReflectedPath  # the path lives with the paths; re-exported here

BASES = ("uniform", "folded_normal")


def _rows(x: Tensor, dim: int, what: str = "x") -> tuple[Tensor, tuple[int, ...]]:
    """View points as rows (n, dim). Accepted: (..., dim), or (b, *event) with ``dim`` elements per sample
    (e.g. images (b, C, H, W) in a box of dimension C·H·W). Returns the rows and the batch shape."""
    if not torch.is_tensor(x):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim >= 1 and x.shape[-1] == dim:
        return x.reshape(-1, dim), tuple(x.shape[:-1])
    if x.ndim >= 2 and x[0].numel() == dim:
        return x.reshape(x.shape[0], dim), tuple(x.shape[:1])
    raise ValueError(f"{what} must have shape (..., {dim}) or (b, *event) with {dim} elements per sample, "
                     f"got {tuple(x.shape)}")


class AbstractDomain(ABC):
    """A closed convex domain ``D ⊂ R^d`` with normally reflecting walls.

    Concrete domains provide :meth:`reflect_velocity` (the fold ``R`` and its Jacobian applied to a
    vector), :meth:`contains`, the base distribution and :meth:`billiard` for solver steps.
    """

    dim: int
    base: str

    @abstractmethod
    def _reflect_velocity(self, y: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`reflect_velocity` on rows (n, d)."""

    @abstractmethod
    def _contains(self, x: Tensor, atol: float) -> Tensor:
        """:meth:`contains` on rows (n, d) → (n,)."""

    @abstractmethod
    def _billiard(self, x: Tensor, dx: Tensor) -> Tensor:
        """:meth:`billiard` on rows (n, d)."""

    @abstractmethod
    def _outward_normals(self, x: Tensor, atol: float) -> list[tuple[Tensor, Tensor]]:
        """``[(active (n,), unit normal (n, d))]`` for each wall the rows ``x`` touch within ``atol``."""

    # --- points of any shape (..., d) or (b, *event) ---------------------------------------------
    def reflect_velocity(self, y: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(R(y), J_R(y) u)`` for points ``y`` anywhere and vectors ``u`` of the same shape."""
        y2, _ = _rows(y, self.dim, "y")
        u2, _ = _rows(u, self.dim, "u")
        x, ju = self._reflect_velocity(y2, u2)
        return x.reshape(y.shape), ju.reshape(u.shape)

    def contains(self, x: Tensor, atol: float = 0.0) -> Tensor:
        """Boolean, one per point: whether each point lies in the domain enlarged by ``atol``."""
        x2, batch = _rows(x, self.dim)
        return self._contains(x2, atol).reshape(batch)

    def billiard(self, x: Tensor, dx: Tensor) -> Tensor:
        """End point of the segment ``x → x + dx`` (``x`` in ``D``) reflected off the walls."""
        x2, _ = _rows(x, self.dim)
        dx2, _ = _rows(dx, self.dim, "dx")
        return self._billiard(x2, dx2).reshape(x.shape)

    @abstractmethod
    def volume(self) -> float: ...

    @abstractmethod
    def _uniform(self, n: int, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor: ...

    @abstractmethod
    def _folded_normal_log_prob(self, x: Tensor) -> Tensor: ...

    @abstractmethod
    def _normal_params(self) -> tuple[Tensor, Tensor]:
        """Centre and standard deviation of the unfolded Gaussian of the ``folded_normal`` base."""

    # --- what a solver needs ----------------------------------------------------------------------
    def reflect(self, x: Tensor) -> Tensor:
        """The billiard fold ``R(x)`` of any point into the domain (identity inside, idempotent)."""
        return self.reflect_velocity(x, torch.zeros_like(x))[0]

    def retract(self, x: Tensor, dx: Tensor) -> Tensor:
        """One reflected step: ``x + dx`` traced as a billiard from ``x`` (``= reflect(x + dx)`` for a box)."""
        return self.billiard(x, dx)

    def proju(self, x: Tensor, v: Tensor) -> Tensor:
        """Project ``v`` onto the tangent cone at ``x``: identity inside; on a wall the outward normal
        component is removed (the velocity of the Skorokhod reflected ODE)."""
        x2, _ = _rows(x, self.dim)
        out, _ = _rows(v, self.dim, "v")
        for active, n in self._outward_normals(x2, atol=0.0):
            vn = (out * n).sum(-1, keepdim=True)
            out = torch.where(active[..., None] & (vn > 0), out - vn * n, out)
        return out.reshape(v.shape)

    def projx(self, x: Tensor) -> Tensor:
        """Alias of :meth:`reflect` (the name manifolds use for "put a point back on the space")."""
        return self.reflect(x)

    # --- base distribution ------------------------------------------------------------------------
    def random_base(self, n: int, generator: torch.Generator | None = None, *,
                    dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """``n`` draws (n, d) of the base distribution, supported in the domain.

        ``uniform``: uniform on ``D``. ``folded_normal``: ``R(c + s ε)``, ``ε ~ N(0, I)`` (the ``t = 0``
        marginal of :class:`ReflectedPath` with a Gaussian source, see :meth:`random_source`).
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if self.base == "uniform":
            return self._uniform(n, generator, dtype).to(device)
        return self.reflect(self.random_source(n, generator, dtype=dtype, device=device))

    def random_source(self, n: int, generator: torch.Generator | None = None, *,
                      dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """Source draws ``x_0`` for training with :class:`ReflectedPath` (n, d).

        ``uniform``: the uniform base itself. ``folded_normal``: the *unfolded* Gaussian ``c + s ε``; the
        path folds it, so ``x_{t=0} = R(x_0)`` has the base distribution.
        """
        if self.base == "uniform":
            return self._uniform(n, generator, dtype).to(device)
        c, s = self._normal_params()
        eps = torch.randn(n, self.dim, generator=generator, dtype=dtype)
        return (c.to(dtype) + s.to(dtype) * eps).to(device)

    def base_log_prob(self, x: Tensor) -> Tensor:
        """``log p_base(x)`` (...,); ``-inf`` outside the domain.

        Uniform: ``-log vol(D)``. Folded normal on a box: the sum over all mirror images of ``x``.
        """
        x2, batch = _rows(x, self.dim)
        inside = self._contains(x2, 1e-6)
        if self.base == "uniform":
            lp = torch.full(x2.shape[:1], -math.log(self.volume()), dtype=x.dtype, device=x.device)
        else:
            lp = self._folded_normal_log_prob(x2)
        return torch.where(inside, lp, torch.full_like(lp, -math.inf)).reshape(batch)


class Box(AbstractDomain):
    """The box ``[low_1, high_1] × ... × [low_d, high_d]`` with reflecting walls.

    Args:
        low, high: scalars or (d,) bounds with ``low < high``; ``dim`` is needed when both are scalars.
        base: ``uniform`` (default) or ``folded_normal`` (the fold of ``N(centre, (scale·L)² I)``).
        scale: standard deviation of the unfolded Gaussian in units of the side length ``L``.
    """

    def __init__(self, low: float | Tensor = 0.0, high: float | Tensor = 1.0, dim: int | None = None, *,
                 base: str = "uniform", scale: float = 0.5) -> None:
        low_t = torch.as_tensor(low, dtype=torch.float64)
        high_t = torch.as_tensor(high, dtype=torch.float64)
        if low_t.ndim > 1 or high_t.ndim > 1:
            raise ValueError(f"low and high must be scalars or 1-D, got shapes {tuple(low_t.shape)}, {tuple(high_t.shape)}")
        if dim is None:
            if low_t.ndim == 0 and high_t.ndim == 0:
                raise ValueError("Box needs dim when low and high are both scalars")
            dim = int(low_t.numel() if low_t.ndim == 1 else high_t.numel())
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        low_t, high_t = low_t.expand(dim).clone(), high_t.expand(dim).clone()
        if not (high_t > low_t).all():
            raise ValueError(f"Box needs low < high in every coordinate, got low={low_t.tolist()}, high={high_t.tolist()}")
        if base not in BASES:
            raise ValueError(f"unknown base {base!r}; expected one of {list(BASES)}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.dim, self.low, self.high, self.base, self.scale = dim, low_t, high_t, base, float(scale)

    def __repr__(self) -> str:
        return f"Box(low={self.low.tolist()}, high={self.high.tolist()}, base={self.base!r})"

    def _bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.low.to(dtype=x.dtype, device=x.device), self.high.to(dtype=x.dtype, device=x.device)

    def _reflect_velocity(self, y: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        # Fold R(y) = low + L·tri((y - low)/L), tri(z) = 1 - |(z mod 2) - 1|; J_R(y) u = sign · u with
        # sign = -1 on the coordinates reflected an odd number of times.
        low, high = self._bounds(y)
        L = high - low
        m = torch.remainder(y - low, 2 * L)
        back = m > L
        x = torch.where(back, low + 2 * L - m, low + m)
        x = torch.minimum(torch.maximum(x, low), high)  # round-off guard
        return x, torch.where(back, -u, u)

    def _billiard(self, x: Tensor, dx: Tensor) -> Tensor:
        # The box's reflection group tiles space, so the billiard end point is the fold of x + dx.
        return self._reflect_velocity(x + dx, dx)[0]

    def _contains(self, x: Tensor, atol: float) -> Tensor:
        low, high = self._bounds(x)
        return ((x >= low - atol) & (x <= high + atol)).all(-1)

    def _outward_normals(self, x, atol):
        low, high = self._bounds(x)
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        out = []
        for i in range(self.dim):
            e = eye[i].expand_as(x)
            out.append((x[:, i] <= low[i] + atol, -e))
            out.append((x[:, i] >= high[i] - atol, e))
        return out

    def volume(self) -> float:
        return float(torch.prod(self.high - self.low))

    def _uniform(self, n, generator, dtype):
        u = torch.rand(n, self.dim, generator=generator, dtype=dtype)
        return self.low.to(dtype) + (self.high - self.low).to(dtype) * u

    def _normal_params(self):
        return 0.5 * (self.low + self.high), self.scale * (self.high - self.low)

    def _folded_normal_log_prob(self, x: Tensor, images: int = 6) -> Tensor:
        # Mirror images of x under the fold: low ± (x - low) + 2kL; truncated at |k| ≤ images.
        low, high = self._bounds(x)
        L = high - low
        c, s = (p.to(dtype=x.dtype, device=x.device) for p in self._normal_params())
        k = torch.arange(-images, images + 1, dtype=x.dtype, device=x.device)
        pre = torch.stack([x, 2 * low - x], dim=-1)[..., None] + 2 * k * L[..., None, None]  # (..., d, 2, K)
        z = (pre - c[..., None, None]) / s[..., None, None]
        lp = torch.logsumexp((-0.5 * z**2).flatten(-2), dim=-1) - torch.log(s) - 0.5 * math.log(2 * math.pi)
        return lp.sum(-1)


class Simplex(AbstractDomain):
    """The corner simplex ``{x ∈ R^d : x_i ≥ 0, Σ_i x_i ≤ 1}`` with reflecting faces.

    A point of the probability simplex ``Δ^d ⊂ R^{d+1}`` is its first ``d`` coordinates; the last is
    ``1 - Σ_i x_i``. ``reflect(y)`` is the billiard from the barycentre ``c = 1/(d+1)`` along ``y - c``;
    ``retract(x, dx)`` is the billiard from ``x`` along ``dx``.

    Args:
        d: dimension.
        base: ``uniform`` (Dirichlet(1, ..., 1)) or ``folded_normal`` (billiard fold of
            ``N(c, scale² I)``; its density has no closed form, so ``base_log_prob`` is only offered for
            the uniform base).
        max_reflections: bound on the faces one segment may hit before it is stopped (then projected).
    """

    def __init__(self, d: int, *, base: str = "uniform", scale: float = 0.3, max_reflections: int = 1000) -> None:
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"d must be a positive integer, got {d!r}")
        if base not in BASES:
            raise ValueError(f"unknown base {base!r}; expected one of {list(BASES)}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.dim, self.base, self.scale, self.max_reflections = d, base, float(scale), int(max_reflections)

    def __repr__(self) -> str:
        return f"Simplex({self.dim}, base={self.base!r})"

    def _faces(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Half-spaces ``A x ≤ b``: rows ``-e_i`` (``x_i ≥ 0``) and ``1`` (``Σ x ≤ 1``); A (d+1, d), b (d+1,)."""
        A = torch.cat([-torch.eye(self.dim, dtype=x.dtype, device=x.device),
                       torch.ones(1, self.dim, dtype=x.dtype, device=x.device)])
        b = torch.zeros(self.dim + 1, dtype=x.dtype, device=x.device)
        b[-1] = 1.0
        return A, b

    def _trace(self, p: Tensor, r: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """Trace segments from ``p`` (n, d) along ``r`` (n, d); reflect ``u`` (n, d) with ``r``."""
        A, b = self._faces(p)
        aa = (A * A).sum(-1)
        p, r, u = p.clone(), r.clone(), u.clone()
        active = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
        eps = 64 * torch.finfo(p.dtype).eps
        for _ in range(self.max_reflections):
            if not active.any():
                break
            idx = active.nonzero().squeeze(-1)
            pa, ra = p[idx], r[idx]
            ar = ra @ A.T                                             # (m, F)
            slack = b - pa @ A.T                                      # ≥ 0 inside
            s = torch.where(ar > eps, slack.clamp_min(0) / ar.clamp_min(eps), torch.full_like(ar, math.inf))
            s_min, f = s.min(-1)
            hit = s_min < 1
            done = idx[~hit]
            p[done] = p[done] + r[done]
            active[done] = False
            if hit.any():
                h = idx[hit]
                sh, fh = s_min[hit][:, None], f[hit]
                p[h] = p[h] + sh * r[h]
                a = A[fh]
                rem = (1 - sh) * r[h]
                r[h] = rem - 2 * ((rem * a).sum(-1, keepdim=True) / aa[fh][:, None]) * a
                u[h] = u[h] - 2 * ((u[h] * a).sum(-1, keepdim=True) / aa[fh][:, None]) * a
        if active.any():  # ran out of reflections: stop on the wall where it stands
            p[active] = self._clip(p[active])
        return self._clip(p), u

    def _clip(self, x: Tensor) -> Tensor:
        # Round-off guard: points a few ulps outside are put back (not a projection of far points).
        x = x.clamp_min(0)
        s = x.sum(-1, keepdim=True)
        return torch.where(s > 1, x / s, x)

    def _reflect_velocity(self, y: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        # Billiard from the barycentre to y; the reflections it makes are applied to u.
        inside = self._contains(y, 0.0)
        x, ju = y.clone(), u.clone()
        out = ~inside
        if out.any():  # points inside are returned bit for bit; only the others are traced
            c = torch.full_like(y[out], 1.0 / (self.dim + 1))
            x[out], ju[out] = self._trace(c, y[out] - c, u[out])
        return x, ju

    def _billiard(self, x: Tensor, dx: Tensor) -> Tensor:
        x = self._clip(x)
        return self._trace(x, dx, torch.zeros_like(x))[0]

    def _contains(self, x: Tensor, atol: float) -> Tensor:
        return (x >= -atol).all(-1) & (x.sum(-1) <= 1 + atol)

    def _outward_normals(self, x, atol):
        A, b = self._faces(x)
        n = A / A.norm(dim=-1, keepdim=True)
        act = (x @ A.T) >= b - atol
        return [(act[:, f], n[f].expand_as(x)) for f in range(A.shape[0])]

    def volume(self) -> float:
        return 1.0 / math.factorial(self.dim)

    def _uniform(self, n, generator, dtype):
        e = -torch.log(torch.rand(n, self.dim + 1, generator=generator, dtype=torch.float64).clamp_min(1e-300))
        return (e / e.sum(-1, keepdim=True))[:, :-1].to(dtype)

    def _normal_params(self):
        return torch.full((self.dim,), 1.0 / (self.dim + 1), dtype=torch.float64), torch.tensor(self.scale, dtype=torch.float64)

    def _folded_normal_log_prob(self, x):
        raise NotImplementedError("the folded-normal base of a simplex has no closed-form density; use base='uniform'")


__all__ = ["AbstractDomain", "Box", "Simplex", "ReflectedPath", "BASES"]
