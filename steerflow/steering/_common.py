"""What the measurement-guidance methods share: the measurement ``(A, y, σ)`` (:class:`Measurement`), cost
counting, argument checks, an affine path's coefficients at one time (:class:`_At`) and :class:`_Steering`, the
base of every method in :mod:`steerflow.steering.methods` and of :class:`~steerflow.steering.default.SteerflowDefault`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..metrics.cost import Cost
from ..paths.affine import AffinePath
from .base import PathGuidance
from .operators import AbstractLinearOperator, AbstractOperator, Dense, GaussianNoise

__all__ = ["Measurement", "measurement"]


@dataclass(frozen=True)
class Measurement:
    """A measurement ``y`` of ``A(x_1)`` with Gaussian noise ``σ``; built by :func:`measurement`."""

    operator: AbstractOperator
    y: Tensor
    sigma: float

    def residual(self, x1: Tensor, cost: Cost | None = None) -> Tensor:
        """``y − A(x̂_1)`` (b, *m)."""
        Ax = self.operator(x1)
        _count(cost, operator_calls=1)
        return self.y_like(Ax) - Ax

    def y_like(self, Ax: Tensor) -> Tensor:
        y = self.y.to(dtype=Ax.dtype, device=Ax.device)
        if y.shape == Ax.shape:
            return y
        if y.shape == Ax.shape[1:]:
            return y.unsqueeze(0).expand_as(Ax)
        if y.ndim == Ax.ndim and y.shape[0] == 1 and y.shape[1:] == Ax.shape[1:]:
            return y.expand_as(Ax)
        raise ValueError(f"the measurement y has shape {tuple(self.y.shape)} but A(x) has shape {tuple(Ax.shape)}; "
                         f"expected {tuple(Ax.shape[1:])} or {tuple(Ax.shape)}")


def measurement(operator, y, sigma) -> Measurement:
    """Validate ``(A, y, σ)``: ``A`` an operator (a matrix becomes :class:`Dense`), ``y`` finite, ``σ ≥ 0``."""
    if torch.is_tensor(operator) and operator.ndim == 2:
        operator = Dense(operator)
    if not isinstance(operator, AbstractOperator):
        raise TypeError(f"operator must be a steerflow operator or a matrix, got {type(operator).__name__}")
    if not torch.is_tensor(y):
        y = torch.as_tensor(y)
    if not y.is_floating_point():
        raise TypeError(f"y must be a floating-point tensor, got {y.dtype}")
    if not torch.isfinite(y).all():
        raise ValueError("the measurement y holds NaN or inf; guidance needs a finite measurement "
                         "(mask missing entries with a Mask operator instead)")
    if isinstance(sigma, GaussianNoise):
        sigma = sigma.std
    sigma = float(sigma)
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"the noise std sigma must be finite and non-negative, got {sigma}")
    if operator.in_shape is not None and operator.linear:
        out = operator.out_shape_for(operator.in_shape)
        if tuple(y.shape) != out and tuple(y.shape[1:]) != out:
            raise ValueError(f"y has shape {tuple(y.shape)} but {operator!r} measures shape {out} "
                             f"(expected {out} or (b, {', '.join(map(str, out))}))")
    return Measurement(operator, y, sigma)


def _count(cost: Cost | None, *, vjp: int = 0, operator_calls: int = 0) -> None:
    if cost is not None:
        cost.vjp += vjp
        cost.operator_calls += operator_calls


def _number(value, name: str, *, low: float = 0.0, high: float = math.inf, open_low: bool = False,
            open_high: bool = False) -> float:
    """A finite real setting in ``[low, high]`` (ends open where asked), as a float; else a clear error."""
    number = isinstance(value, (int, float)) or torch.is_tensor(value) and value.numel() == 1
    if isinstance(value, bool) or not number:
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    bad = not math.isfinite(v) or v < low or v > high or (open_low and v == low) or (open_high and v == high)
    if bad:
        lo, hi = "(" if open_low else "[", ")" if open_high or high == math.inf else "]"
        raise ValueError(f"{name} must be a finite number in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return v


def _integer(value, name: str, *, low: int = 1, optional: bool = False) -> int | None:
    """An integer setting of at least ``low`` (``None`` passes where ``optional``); else a clear error."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a positive integer" if low == 1 else f"an integer of at least {low}"
        raise ValueError(f"{name} must be {what}{' or None' if optional else ''}, got {value!r}")
    return value


def _t0(t: Tensor) -> float:
    if t.numel() == 0:
        raise ValueError("guidance got an empty batch (0 samples); steer at least one sample")
    return float(t.reshape(-1)[0])


def _require_linear(meas: Measurement, method: str) -> AbstractLinearOperator:
    if not isinstance(meas.operator, AbstractLinearOperator):
        hint = ("; for a pixel measurement of a diffusers pipeline use its latent-space variant, "
                "FlowPipeline.latent_measurement(A, y)") if type(meas.operator).__name__ == "DecodedOperator" else ""
        raise TypeError(f"{method} needs a linear operator (forward/adjoint), got {meas.operator!r}; use FlowChef, "
                        f"DPS or PnP-Flow (differentiable) or EnKG (derivative-free) for non-linear models{hint}")
    return meas.operator


def _require_differentiable(meas: Measurement, method: str) -> None:
    if not meas.operator.differentiable:
        raise TypeError(f"{method} differentiates the forward model, but {meas.operator!r} has no gradient; "
                        f"use the derivative-free EnKG")


def _data_grad(meas: Measurement, x1: Tensor, cost: Cost | None) -> Tensor:
    """``∇_{x̂_1} ½‖y − A x̂_1‖²`` (b, *d) without touching the network: ``Aᵀ(A x̂_1 − y)`` or a VJP of ``A``."""
    if isinstance(meas.operator, AbstractLinearOperator):
        r = meas.residual(x1, cost)
        _count(cost, operator_calls=1)
        return -meas.operator.adjoint(r)
    _require_differentiable(meas, "this method")
    with torch.enable_grad():
        x1_ = x1.detach().requires_grad_(True)
        r = meas.residual(x1_, cost)
        (g,) = torch.autograd.grad(0.5 * (r**2).sum(), x1_)
    _count(cost, operator_calls=1)
    return g


def _displace(v: Tensor, x: Tensor, x_new: Tensor, dt: Tensor) -> Tensor:
    """The velocity ``v + (x' − x) / dt`` that takes an Euler step from ``x'`` with ``v`` held fixed."""
    return v + (x_new - x) / dt.to(dtype=x.dtype)


def _loss_grad(loss_fn: Callable[[Tensor], Tensor], x1: Tensor) -> Tensor:
    with torch.enable_grad():
        x1_ = x1.detach().requires_grad_(True)
        loss = loss_fn(x1_)
        if loss.ndim > 0:
            loss = loss.sum()
        (g,) = torch.autograd.grad(loss, x1_)
    return g


# conjugate-gradient budget of a guidance's (r A Aᵀ + σ² I) solve where A Aᵀ has no closed form (blur): a
# noiseless deblur is ill-posed (float32, 3×32×32: residual still 0.25 after the default 10 m + 100 iterations,
# 330 s a step), and an early-stopped CG is the regularised solve; well-posed systems stop earlier on the tolerance
_GUIDANCE_CG_ITERS = 100

@dataclass(frozen=True)
class _At:
    """An affine path's ``α_t, σ_t, α̇_t, σ̇_t`` at one time, as floats, and the factors the methods use."""

    alpha: float
    sigma: float
    d_alpha: float
    d_sigma: float

    @classmethod
    def of(cls, path: AffinePath, t: float) -> "_At":
        c = path.schedule(torch.tensor(float(t), dtype=torch.float64))
        return cls(float(c.alpha_t), float(c.sigma_t), float(c.d_alpha_t), float(c.d_sigma_t))

    @property
    def score_factor(self) -> float:
        """``b_t = σ (α̇ σ / α − σ̇)``: ``∂v/∂(∇ log p_t)`` for a Gaussian source (linear: ``(1 − t) / t``)."""
        return self.sigma * (self.d_alpha * self.sigma / self.alpha - self.d_sigma)

    @property
    def r2(self) -> float:
        """``Cov[x_1 | x_t]`` for data ``N(m, I)``: ``σ² / (α² + σ²)`` (linear: ``(1 − t)² / (t² + (1 − t)²)``)."""
        return self.sigma**2 / (self.alpha**2 + self.sigma**2)

    @property
    def gain(self) -> float:
        """``∂x̂_1/∂x_t`` for data ``N(m, I)``: ``α / (α² + σ²)`` (linear: ``t / (t² + (1 − t)²)``)."""
        return self.alpha / (self.alpha**2 + self.sigma**2)

    @property
    def predicts(self) -> bool:
        """Whether ``v`` determines ``x̂_1`` here (``α σ̇ − σ α̇ ≠ 0``; not at ``t = 0`` of a polynomial path)."""
        return abs(self.alpha * self.d_sigma - self.sigma * self.d_alpha) > 1e-12

    @property
    def x1_per_v(self) -> float:
        """``∂x̂_1/∂v = −σ / (α σ̇ − σ α̇)`` (linear: ``1 − t``): a change of ``v`` moves ``x̂_1`` this many times."""
        return -self.sigma / (self.alpha * self.d_sigma - self.sigma * self.d_alpha)


class _Steering(PathGuidance):
    """Shared plumbing of the measurement guidances: the path the model was trained with and the range check.

    The path is ``model.path`` when the model carries one, else ``path=`` (default: linear); both given and
    different is an error. Subclasses set ``self.path`` (``check_path(path)``), ``self.window``
    (``check_window(window)``) and ``self.meas`` (or ``None``), and implement :meth:`_steer`, the guided velocity at
    a time inside the window where ``v`` determines ``x̂_1`` (the window itself is applied by
    :meth:`AbstractGuidance.velocity <steerflow.steering.base.AbstractGuidance.velocity>`).
    """

    meas: Measurement | None = None

    def initial(self, v, x, ts, *, generator=None, cost=None):
        self._start(v, x)
        return x

    def _start(self, v, x: Tensor) -> None:
        """At the start of a solve: resolve the model's path and set the scale of the solve."""
        if x.shape[0] == 0:
            raise ValueError(f"{type(self).__name__} got an empty batch (0 samples); steer at least one sample")
        self._start_path(v)
        self._watch(x)
        if self.meas is not None and self.meas.y.numel():
            self._note_scale(self.meas.y)
        self._fresh = True

    def guided_velocity(self, v, x, t, dt, *, generator=None, cost=None):
        path = self._path_for(v)
        c = _At.of(path, _t0(t))
        if not c.predicts:  # no data prediction at t (a polynomial path at t = 0, where v = 0): step unguided
            return v(x, t)
        return self._steer(v, x, t, dt, path, c, generator=generator, cost=cost)

    def _steer(self, v, x: Tensor, t: Tensor, dt: Tensor, path: AffinePath, c: _At, *, generator, cost) -> Tensor:
        """The guided velocity at ``(x, t)``; ``path`` is the model's path and ``c`` its coefficients at ``t``."""
        raise NotImplementedError

    def _predicted(self, x1: Tensor) -> None:
        """The first data prediction of a solve widens its scale (data may be larger than the noise)."""
        if getattr(self, "_fresh", False):
            self._note_scale(x1)
            self._fresh = False
