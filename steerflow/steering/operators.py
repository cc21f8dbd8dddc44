"""Measurement operators ``y = A(x) + noise`` for inverse problems, and the Gaussian noise model.

An operator never adds noise: ``A(x)`` is the clean measurement and :class:`GaussianNoise` is the separate
measurement model ``y = A(x) + σ ε``, ``ε ~ N(0, I)``. Linear operators provide

* ``forward(x)``  ``A x``  — (b, *in_shape) → (b, *out_shape),
* ``adjoint(u)``  ``Aᵀ u`` — (b, *out_shape) → (b, *in_shape), the true adjoint: ``⟨A x, u⟩ = ⟨x, Aᵀ u⟩``,
* ``solve_normal(r, sigma2, b)`` ``(r A Aᵀ + σ² I)⁻¹ b`` in measurement space — closed form where ``A Aᵀ`` is
  diagonal (identity, masks, average pooling), Cholesky for dense matrices, conjugate gradients otherwise.

With ``solve_normal`` the Gaussian posterior mean of ``x ~ N(x̂, r I)`` given ``y = A x + N(0, σ² I)`` is
``x̂ + r Aᵀ (r A Aᵀ + σ² I)⁻¹ (y − A x̂)`` (Bishop, PRML §2.3.3), the update of ΠGDM / OT-ODE / DDS-type methods.

Shapes: ``in_shape`` / ``out_shape`` exclude the batch dimension. An operator built without ``in_shape``
accepts any shape it can act on and checks it on each call.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AbstractOperator", "AbstractLinearOperator", "Identity", "Mask", "AvgPool", "Blur", "Colorize", "Dense",
           "NonLinear", "GaussianNoise", "conjugate_gradient", "operator_norm", "OPERATORS", "get_operator"]


def _check_tensor(x, what: str) -> Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be floating point, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{what} must have a batch dimension, got a 0-dim tensor")
    return x


def _bdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product ``⟨a_i, b_i⟩`` (b,) of two (b, *d) tensors."""
    return (a * b).reshape(a.shape[0], -1).sum(-1)


def _bexpand(s: Tensor, like: Tensor) -> Tensor:
    return s.reshape(-1, *([1] * (like.ndim - 1)))


class AbstractOperator(ABC):
    """A forward model ``x ↦ A(x)``; ``differentiable`` says whether autograd may pass through it."""

    in_shape: tuple[int, ...] | None = None
    linear: bool = False
    differentiable: bool = True

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """``A(x)`` (b, *out_shape) for ``x`` (b, *in_shape)."""

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def _check_in(self, x: Tensor) -> Tensor:
        _check_tensor(x, "the operator input")
        if self.in_shape is not None and tuple(x.shape[1:]) != tuple(self.in_shape):
            raise ValueError(f"{type(self).__name__} expects inputs of shape (b, {', '.join(map(str, self.in_shape))}),"
                             f" got {tuple(x.shape)}")
        return x

    def out_shape_for(self, in_shape: Sequence[int]) -> tuple[int, ...]:
        """The measurement shape (without batch) for an input of shape ``in_shape`` (without batch)."""
        with torch.no_grad():
            return tuple(self.forward(torch.zeros(1, *in_shape)).shape[1:])


class AbstractLinearOperator(AbstractOperator):
    """A linear ``A``: ``forward``, its true ``adjoint`` and ``solve_normal`` (CG fallback here)."""

    linear = True

    @abstractmethod
    def adjoint(self, u: Tensor) -> Tensor:
        """``Aᵀ u`` (b, *in_shape) for ``u`` (b, *out_shape); ``⟨A x, u⟩ = ⟨x, Aᵀ u⟩``."""

    def normal(self, u: Tensor) -> Tensor:
        """``A Aᵀ u`` in measurement space."""
        return self.forward(self.adjoint(u))

    def solve_normal(self, r, sigma2, b: Tensor, *, n_iter: int | None = None, tol: float | None = None,
                     cost=None) -> Tensor:
        """``(r A Aᵀ + σ² I)⁻¹ b`` for ``b`` (b, *out_shape); ``r``/``sigma2`` scalars or (b,).

        Generic fallback: conjugate gradients on the symmetric positive (semi-)definite system
        (Hestenes & Stiefel 1952), batched per sample, to the relative residual ``tol`` (default: ``b``'s
        precision, see :func:`conjugate_gradient`) or ``n_iter`` iterations (default ``10 m + 100`` for ``m``
        measurements per sample). ``cost`` (a :class:`~steerflow.metrics.cost.Cost`), when given, counts the two
        operator calls of every ``A Aᵀ`` product the iterations make; the closed forms of the subclasses make none.
        """
        r_, s2 = _as_coef(r, b), _as_coef(sigma2, b)

        def apply(u: Tensor) -> Tensor:
            if cost is not None:
                cost.operator_calls += 2
            return r_ * self.normal(u) + s2 * u

        return conjugate_gradient(apply, b, n_iter=n_iter, tol=tol)

    def matrix(self, in_shape: Sequence[int] | None = None, *, dtype=torch.float64) -> Tensor:
        """The dense matrix (m, n) of ``A`` acting on flattened inputs (for tests and exact oracles)."""
        in_shape = tuple(in_shape) if in_shape is not None else self.in_shape
        if in_shape is None:
            raise ValueError(f"{type(self).__name__}.matrix needs in_shape")
        n = math.prod(in_shape)
        eye = torch.eye(n, dtype=dtype).reshape(n, *in_shape)
        return self.forward(eye).reshape(n, -1).T.contiguous()


def _as_coef(c, like: Tensor) -> Tensor:
    c = torch.as_tensor(c, dtype=like.dtype, device=like.device)
    if c.ndim == 0:
        return c
    if c.shape != (like.shape[0],):
        raise ValueError(f"a per-sample coefficient must have shape ({like.shape[0]},), got {tuple(c.shape)}")
    return _bexpand(c, like)


def conjugate_gradient(apply: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None = None, *,
                       n_iter: int | None = None, tol: float | None = None) -> Tensor:
    """Solve ``M x = b`` for symmetric positive (semi-)definite ``M`` by conjugate gradients, per sample
    (Hestenes & Stiefel 1952).

    ``apply(x) = M x`` acts on (b, *d); each batch element is its own system. A sample stops when

    * its residual is small: ``‖b − M x‖ ≤ tol · max(‖b‖, ‖b − M x_0‖)`` (relative; ``tol`` defaults to
      ``eps^(3/4)`` of ``b``'s dtype: 1.8e-12 in float64, 6.4e-6 in float32);
    * the search direction has no curvature left, ``pᵀ M p ≤ eps · λ̂ ‖p‖²`` with ``λ̂`` the largest Rayleigh
      quotient seen so far: on a singular ``M`` (a rank-deficient ``Aᵀ A``) what is left of the residual once
      the system is solved is rounding in the null space, and the step ``‖r‖² / pᵀ M p`` along it is unbounded;

    or after ``n_iter`` iterations (default ``10 n + 100`` for ``n`` unknowns per sample, as scipy's ``cg``: exact
    arithmetic needs at most ``n``, rounding on an ill-conditioned ``M`` several times more). The residual of conjugate gradients
    is not monotone (on a noiseless 5 × 5 blur of 256 pixels it goes 500 iterations without a new low before it
    converges), so no "stopped decreasing" test is made: the curvature test is what ends a singular system.
    """
    if not torch.is_tensor(b) or not b.is_floating_point() or b.ndim < 1:
        raise TypeError(f"b must be a floating-point tensor (b, *d), got "
                        f"{getattr(b, 'dtype', type(b).__name__)} {tuple(getattr(b, 'shape', ()))}")
    if x0 is not None and (not torch.is_tensor(x0) or x0.shape != b.shape):
        raise ValueError(f"x0 must have b's shape {tuple(b.shape)}, got {tuple(getattr(x0, 'shape', ()))}")
    n = b[0].numel() if b.shape[0] else 1
    eps = torch.finfo(b.dtype).eps
    tol = eps**0.75 if tol is None else float(tol)
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive relative residual (e.g. 1e-10), got {tol}; with tol = 0 conjugate "
                         "gradients run on past convergence and, on a singular system, step along rounding noise")
    n_iter = 10 * n + 100 if n_iter is None else n_iter
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    tiny = torch.finfo(b.dtype).tiny
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = _bdot(r, r)
    thresh = tol**2 * torch.maximum(_bdot(b, b), rs)
    lam = torch.zeros_like(rs)  # largest Rayleigh quotient pᵀMp / ‖p‖² seen: a lower bound of ‖M‖
    active = torch.isfinite(rs) & (rs > thresh)
    for _ in range(n_iter):
        if not bool(active.any()):
            break
        Mp = apply(p)
        pMp, pp = _bdot(p, Mp), _bdot(p, p)
        lam = torch.maximum(lam, torch.where(pp > 0, pMp / pp.clamp_min(tiny), torch.zeros_like(pp)))
        active = active & (pMp > eps * lam * pp)  # no curvature left along p: stop this sample
        alpha = torch.where(active, rs / pMp.clamp_min(tiny), torch.zeros_like(rs))
        x = x + _bexpand(alpha, x) * p
        r = r - _bexpand(alpha, r) * Mp
        rs_new = _bdot(r, r)
        active = active & torch.isfinite(rs_new) & (rs_new > thresh)
        beta = torch.where(active, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
        p = r + _bexpand(beta, p) * p
        rs = rs_new
    return x


def operator_norm(op: AbstractLinearOperator, in_shape: Sequence[int], *, n_iter: int = 50,
                  generator: torch.Generator | None = None, dtype=torch.float64) -> float:
    """Spectral norm ``‖A‖₂`` by power iteration on ``Aᵀ A``."""
    x = torch.randn(1, *in_shape, generator=generator, dtype=dtype)
    x = x / x.norm()
    lam = 0.0
    for _ in range(n_iter):
        y = op.adjoint(op.forward(x))
        lam = float(y.norm())
        if lam == 0.0:
            return 0.0
        x = y / lam
    return math.sqrt(lam)


# --------------------------------------------------------------------------------------------------
class Identity(AbstractLinearOperator):
    """``A = I`` (denoising)."""

    def __init__(self, in_shape: Sequence[int] | None = None) -> None:
        self.in_shape = tuple(in_shape) if in_shape is not None else None

    def __repr__(self) -> str:
        return f"Identity(in_shape={self.in_shape})"

    def forward(self, x):
        return self._check_in(x)

    def adjoint(self, u):
        return self._check_in(u)

    def solve_normal(self, r, sigma2, b, **_):
        """``b / (r + σ²)``."""
        return b / (_as_coef(r, b) + _as_coef(sigma2, b))


class Mask(AbstractLinearOperator):
    """Inpainting: ``A x = m ⊙ x`` for a boolean mask ``m`` of shape ``in_shape`` (1 = observed).

    The measurement keeps the input's shape with zeros where nothing is observed; ``A = Aᵀ = diag(m)``,
    so ``(r A Aᵀ + σ² I)⁻¹ b = b / (r m + σ²)`` (taken as 0 where ``r m + σ² = 0``: the pseudo-inverse).
    """

    def __init__(self, mask) -> None:
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            if not ((mask == 0) | (mask == 1)).all():
                raise ValueError("a mask must be boolean or hold only 0 and 1")
            mask = mask.bool()
        if mask.ndim < 1:
            raise ValueError("a mask must have at least one dimension (the per-sample shape)")
        self.mask = mask
        self.in_shape = tuple(mask.shape)

    def __repr__(self) -> str:
        return f"Mask(in_shape={self.in_shape}, observed={int(self.mask.sum())})"

    @classmethod
    def box(cls, shape: Sequence[int], top: int, left: int, height: int, width: int) -> "Mask":
        """Hide the box ``[top:top+height, left:left+width]`` of the last two axes (box inpainting)."""
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(f"a box mask needs at least two (spatial) axes, got shape {shape}")
        H, W = shape[-2:]
        if not (0 <= top and 0 <= left and height > 0 and width > 0 and top + height <= H and left + width <= W):
            raise ValueError(f"the box [{top}:{top + height}, {left}:{left + width}] does not fit in {H}x{W}")
        m = torch.ones(shape, dtype=torch.bool)
        m[..., top:top + height, left:left + width] = False
        return cls(m)

    @classmethod
    def random(cls, shape: Sequence[int], p_observed: float, generator: torch.Generator | None = None,
               *, per_pixel: bool = True) -> "Mask":
        """Observe each entry independently with probability ``p_observed``.

        ``per_pixel=True`` shares the draw across a leading channel axis when ``shape`` has 3 axes (C, H, W).
        """
        shape = tuple(shape)
        if not 0.0 <= p_observed <= 1.0:
            raise ValueError(f"p_observed must be in [0, 1], got {p_observed}")
        draw_shape = shape[1:] if (per_pixel and len(shape) == 3) else shape
        m = torch.rand(draw_shape, generator=generator) < p_observed
        return cls(m.expand(shape).clone())

    @classmethod
    def coordinates(cls, dim: int, observed: Sequence[int]) -> "Mask":
        """Observe the listed coordinates of a ``dim``-vector."""
        m = torch.zeros(dim, dtype=torch.bool)
        idx = torch.as_tensor(list(observed), dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= dim):
            raise ValueError(f"observed coordinates must lie in [0, {dim}), got {list(observed)}")
        m[idx] = True
        return cls(m)

    def _m(self, x):
        return self.mask.to(device=x.device, dtype=x.dtype)

    def forward(self, x):
        return self._check_in(x) * self._m(x)

    def adjoint(self, u):
        return self._check_in(u) * self._m(u)

    def solve_normal(self, r, sigma2, b, **_):
        den = _as_coef(r, b) * self._m(b) + _as_coef(sigma2, b)
        return torch.where(den > 0, b / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(b))


class AvgPool(AbstractLinearOperator):
    """Super-resolution by ``k × k`` average pooling of the last two axes (H and W divisible by ``k``).

    Adjoint: upsampling by repetition divided by ``k²`` (not nearest-neighbour upsampling, which is
    ``k²·Aᵀ``). ``A Aᵀ = I / k²``, so ``(r A Aᵀ + σ² I)⁻¹ b = b / (r / k² + σ²)``.
    """

    def __init__(self, factor: int, in_shape: Sequence[int] | None = None) -> None:
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor!r}")
        self.k = factor
        self.in_shape = tuple(in_shape) if in_shape is not None else None
        if self.in_shape is not None:
            self._check_spatial(self.in_shape)

    def __repr__(self) -> str:
        return f"AvgPool(factor={self.k}, in_shape={self.in_shape})"

    def _check_spatial(self, shape):
        if len(shape) < 2:
            raise ValueError(f"AvgPool acts on the last two axes (H, W); got per-sample shape {tuple(shape)}")
        H, W = shape[-2:]
        if H % self.k or W % self.k:
            raise ValueError(f"AvgPool(factor={self.k}) needs H and W divisible by {self.k}, got {H}x{W}")

    def forward(self, x):
        self._check_in(x)
        self._check_spatial(x.shape[1:])
        lead, (H, W) = x.shape[:-2], x.shape[-2:]
        y = F.avg_pool2d(x.reshape(-1, 1, H, W), self.k)
        return y.reshape(*lead, H // self.k, W // self.k)

    def adjoint(self, u):
        _check_tensor(u, "the adjoint input")
        if u.ndim < 3:
            raise ValueError(f"AvgPool.adjoint expects (b, ..., h, w), got {tuple(u.shape)}")
        if self.in_shape is not None:
            expect = (*self.in_shape[:-2], self.in_shape[-2] // self.k, self.in_shape[-1] // self.k)
            if tuple(u.shape[1:]) != expect:
                raise ValueError(f"AvgPool.adjoint expects (b, {', '.join(map(str, expect))}), got {tuple(u.shape)}")
        return u.repeat_interleave(self.k, -2).repeat_interleave(self.k, -1) / self.k**2

    def solve_normal(self, r, sigma2, b, **_):
        return b / (_as_coef(r, b) / self.k**2 + _as_coef(sigma2, b))


class Blur(AbstractLinearOperator):
    """Deblurring: per-channel convolution of (b, C, H, W) images with a known odd-sized kernel, zero padding.

    ``A x = x ⋆ k`` ("same" size, zero padding ``p = (s − 1) / 2``, torch's ``conv2d`` being a correlation);
    the adjoint is the correlation with the flipped kernel and the same padding,
    ``Aᵀ u = u ⋆ flip(k)``, which is exactly the transposed convolution. ``solve_normal`` uses CG.
    """

    def __init__(self, kernel, in_shape: Sequence[int] | None = None) -> None:
        kernel = torch.as_tensor(kernel)
        if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
            raise ValueError(f"the blur kernel must be 2-D with odd sizes, got shape {tuple(kernel.shape)}")
        if not kernel.is_floating_point():
            kernel = kernel.double()
        self.kernel = kernel
        self.in_shape = tuple(in_shape) if in_shape is not None else None
        if self.in_shape is not None and len(self.in_shape) != 3:
            raise ValueError(f"Blur acts on (C, H, W) images, got in_shape {self.in_shape}")

    def __repr__(self) -> str:
        return f"Blur(kernel={tuple(self.kernel.shape)}, in_shape={self.in_shape})"

    @classmethod
    def gaussian(cls, size: int, std: float, in_shape: Sequence[int] | None = None) -> "Blur":
        """Normalised isotropic Gaussian kernel ``exp(−(i² + j²) / 2 std²)`` of odd ``size``."""
        if size < 1 or size % 2 == 0:
            raise ValueError(f"size must be a positive odd integer, got {size}")
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        g = torch.arange(size, dtype=torch.float64) - size // 2
        k = torch.exp(-(g[:, None] ** 2 + g[None, :] ** 2) / (2 * std**2))
        return cls(k / k.sum(), in_shape)

    @classmethod
    def motion(cls, size: int, angle: float = 0.0, in_shape: Sequence[int] | None = None) -> "Blur":
        """Normalised linear motion blur: a line of length ``size`` (odd) through the centre at ``angle``
        degrees (0 = horizontal), each pixel weighted by the length of the line inside it (supersampled)."""
        if size < 1 or size % 2 == 0:
            raise ValueError(f"size must be a positive odd integer, got {size}")
        if not math.isfinite(angle):
            raise ValueError(f"angle must be finite, got {angle}")
        s = torch.linspace(-(size - 1) / 2, (size - 1) / 2, 16 * size + 1, dtype=torch.float64)
        a = math.radians(angle)
        rows = torch.round(-s * math.sin(a)).long() + size // 2
        cols = torch.round(s * math.cos(a)).long() + size // 2
        k = torch.zeros(size, size, dtype=torch.float64)
        k.index_put_((rows, cols), torch.ones_like(s), accumulate=True)
        return cls(k / k.sum(), in_shape)

    def _conv(self, x, kernel):
        self._check_in(x)
        if x.ndim != 4:
            raise ValueError(f"Blur acts on (b, C, H, W) images, got {tuple(x.shape)}")
        C = x.shape[1]
        w = kernel.to(dtype=x.dtype, device=x.device).expand(C, 1, *kernel.shape)
        pad = (kernel.shape[0] // 2, kernel.shape[1] // 2)
        return F.conv2d(x, w, padding=pad, groups=C)

    def forward(self, x):
        return self._conv(x, self.kernel)

    def adjoint(self, u):
        return self._conv(u, self.kernel.flip(0, 1))


class Colorize(AbstractLinearOperator):
    """Colourisation: the grey value ``A x = (x_R + x_G + x_B) / 3`` of (b, 3, H, W) images → (b, 1, H, W).

    ``Aᵀ u`` spreads ``u / 3`` over the three channels, so ``A Aᵀ = I / 3`` and ``solve_normal`` is closed form.
    """

    def __init__(self, in_shape: Sequence[int] | None = None) -> None:
        self.in_shape = tuple(in_shape) if in_shape is not None else None
        if self.in_shape is not None and (len(self.in_shape) != 3 or self.in_shape[0] != 3):
            raise ValueError(f"Colorize acts on (3, H, W) images, got in_shape {self.in_shape}")

    def __repr__(self) -> str:
        return f"Colorize(in_shape={self.in_shape})"

    def forward(self, x):
        self._check_in(x)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Colorize acts on (b, 3, H, W) images, got {tuple(x.shape)}")
        return x.mean(1, keepdim=True)

    def adjoint(self, u):
        _check_tensor(u, "the adjoint input")
        if u.ndim != 4 or u.shape[1] != 1:
            raise ValueError(f"Colorize's adjoint takes (b, 1, H, W) grey images, got {tuple(u.shape)}")
        return (u / 3).expand(-1, 3, -1, -1).contiguous()

    def solve_normal(self, r, sigma2, b, **_):
        """``b / (r / 3 + σ²)``."""
        return b / (_as_coef(r, b) / 3 + _as_coef(sigma2, b))


class Dense(AbstractLinearOperator):
    """Any matrix ``A`` (m, n) acting on flattened inputs: (b, *in_shape) → (b, m), ``n = prod(in_shape)``.

    ``solve_normal`` factorises ``r A Aᵀ + σ² I`` (m × m) by Cholesky. ``A`` is kept as given; ``A Aᵀ`` is
    formed in float64 (a float32 ``A`` is exact in float64), so a solve is as precise as its input's dtype.
    """

    def __init__(self, A, in_shape: Sequence[int] | None = None) -> None:
        A = torch.as_tensor(A)
        if A.ndim != 2:
            raise ValueError(f"A must be a matrix (m, n), got shape {tuple(A.shape)}")
        if not A.is_floating_point():
            A = A.double()
        self.A = A
        self.in_shape = tuple(in_shape) if in_shape is not None else (A.shape[1],)
        if math.prod(self.in_shape) != A.shape[1]:
            raise ValueError(f"in_shape {self.in_shape} has {math.prod(self.in_shape)} entries but A has {A.shape[1]} columns")
        A64 = A.double()  # exact for a lower-precision A; A itself when it is float64
        self._AAt = A64 @ A64.T

    def __repr__(self) -> str:
        return f"Dense(A={tuple(self.A.shape)})"

    def _a(self, x):
        return self.A.to(dtype=x.dtype, device=x.device)

    def forward(self, x):
        self._check_in(x)
        return x.reshape(x.shape[0], -1) @ self._a(x).T

    def adjoint(self, u):
        _check_tensor(u, "the adjoint input")
        if u.ndim != 2 or u.shape[1] != self.A.shape[0]:
            raise ValueError(f"Dense.adjoint expects (b, {self.A.shape[0]}), got {tuple(u.shape)}")
        return (u @ self._a(u)).reshape(u.shape[0], *self.in_shape)

    def solve_normal(self, r, sigma2, b, **_):
        """Cholesky solve of ``(r A Aᵀ + σ² I) z = b`` (one factorisation per distinct ``(r, σ²)``)."""
        if b.ndim != 2 or b.shape[1] != self.A.shape[0]:
            raise ValueError(f"Dense.solve_normal expects (b, {self.A.shape[0]}), got {tuple(b.shape)}")
        m = self.A.shape[0]
        AAt = self._AAt.to(dtype=b.dtype, device=b.device)
        r_t = torch.as_tensor(r, dtype=b.dtype, device=b.device)
        s2 = torch.as_tensor(sigma2, dtype=b.dtype, device=b.device)
        eye = torch.eye(m, dtype=b.dtype, device=b.device)
        if r_t.ndim == 0 and s2.ndim == 0:
            L = torch.linalg.cholesky(r_t * AAt + s2 * eye)
            return torch.cholesky_solve(b.T, L).T
        r_t, s2 = r_t.expand(b.shape[0]), s2.expand(b.shape[0])
        L = torch.linalg.cholesky(r_t[:, None, None] * AAt + s2[:, None, None] * eye)
        return torch.cholesky_solve(b[..., None], L)[..., 0]


class NonLinear(AbstractOperator):
    """A black-box forward model ``fn(x)`` (b, *in) → (b, *out).

    ``differentiable=False`` marks a model without gradients (a simulator, a quantiser): it is run under
    ``no_grad`` and only derivative-free methods (EnKG) accept it.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], *, differentiable: bool = True,
                 in_shape: Sequence[int] | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.differentiable = bool(differentiable)
        self.in_shape = tuple(in_shape) if in_shape is not None else None

    def __repr__(self) -> str:
        return f"NonLinear({getattr(self.fn, '__name__', 'fn')}, differentiable={self.differentiable})"

    def forward(self, x):
        self._check_in(x)
        if self.differentiable:
            out = self.fn(x)
        else:
            with torch.no_grad():
                out = self.fn(x.detach())
        if not torch.is_tensor(out) or out.ndim < 1 or out.shape[0] != x.shape[0]:
            raise ValueError(f"the forward model must return a (b, ...) tensor with b={x.shape[0]}, got "
                             f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}")
        return out


# --------------------------------------------------------------------------------------------------
class GaussianNoise:
    """The measurement model ``y = A(x) + σ ε``, ``ε ~ N(0, I)``."""

    def __init__(self, std: float) -> None:
        std = float(std)
        if not (std >= 0 and math.isfinite(std)):
            raise ValueError(f"the noise std must be finite and non-negative, got {std}")
        self.std = std

    def __repr__(self) -> str:
        return f"GaussianNoise(std={self.std})"

    @property
    def variance(self) -> float:
        return self.std**2

    def sample(self, y_clean: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``y_clean + σ ε`` with ``ε`` drawn from ``generator``."""
        _check_tensor(y_clean, "y_clean")
        eps = torch.randn(y_clean.shape, generator=generator, dtype=y_clean.dtype, device=y_clean.device)
        return y_clean + self.std * eps

    def log_likelihood(self, y: Tensor, y_pred: Tensor) -> Tensor:
        """``log N(y; y_pred, σ² I)`` per sample (b,): ``−‖y − y_pred‖² / 2σ² − (m/2) log 2πσ²``."""
        if self.std == 0:
            raise ValueError("the log-likelihood of noiseless measurements (std = 0) is not defined")
        y = y.expand_as(y_pred) if y.shape != y_pred.shape else y
        r = (y - y_pred).reshape(y_pred.shape[0], -1)
        m = r.shape[1]
        return -0.5 * (r**2).sum(-1) / self.variance - 0.5 * m * math.log(2 * math.pi * self.variance)


OPERATORS = {"identity": Identity, "mask": Mask, "avgpool": AvgPool, "blur": Blur, "colorize": Colorize, "dense": Dense,
             "nonlinear": NonLinear}


def get_operator(name: str, *args, **kwargs) -> AbstractOperator:
    """Build an operator by name: ``identity``, ``mask``, ``avgpool``, ``blur``, ``dense``, ``nonlinear``."""
    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}; expected one of {sorted(OPERATORS)}")
    return OPERATORS[name](*args, **kwargs)
