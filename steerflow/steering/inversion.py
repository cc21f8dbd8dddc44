"""Inversion and editing of rectified flows: RF-Inversion and the rectified SDE, as guidances.

Nothing here has a sampler loop of its own: inversion is :func:`steerflow.sample` on a decreasing grid
(data ``t = 1`` → noise ``t = 0``), editing is the same ``sample`` on an increasing grid, and the
controllers below only transform the velocity (or, for the SDE, add noise after each step).

RF-Inversion (Rout et al. 2024, "Semantic Image Inversion and Editing using Rectified Stochastic
Differential Equations", arXiv:2410.10792), written in steerflow's time (``t = 0`` noise, ``t = 1`` data;
the paper runs its own clock ``τ = 1 − t`` for inversion):

* controlled inversion (paper eq. 8, Algorithm 1). The straight line through ``x`` at time ``t`` that
  starts at a chosen noise ``z`` has velocity ``u_t(x | z) = (x − z) / t``; the controller pulls the
  learned field toward it with strength ``γ``::

      v̂(x, t) = v(x, t) + γ (u_t(x | z) − v(x, t)),   integrated from t = 1 down to t = 0.

  ``γ = 0`` is plain ODE inversion, ``γ = 1`` lands exactly on ``z`` (the controlled path is a straight
  line, which every Runge–Kutta rule integrates exactly);
* controlled editing (paper eq. 15/17, Algorithm 2). The straight line from ``x`` at ``t`` to the
  reference image ``y`` has velocity ``u_t(x | y) = (y − x) / (1 − t)``; inside a window
  ``[t_start, t_end]`` of the generation::

      v̂(x, t) = v(x, t) + η(t) (u_t(x | y) − v(x, t)),   η(t) = η on the window, 0 elsewhere.

  ``η = 1`` on all of ``[0, 1]`` returns ``y`` exactly; the paper's "η for t ≤ τ" is the window ``[0, τ]``.

The rectified SDE with the ODE's marginals (Song et al. 2021, eq. 6 and App. D; Rout et al. 2024, §3.2,
for rectified flows): for any diffusion ``g(t)``

    dX = [v(X, t) + (g(t)² / 2) ∇log p_t(X)] dt + g(t) dW,

has the same marginals ``p_t`` as ``dX = v dt``; the score is read off the velocity for a Gaussian
source (:meth:`steerflow.paths.AffinePath.score_from_velocity`). On a decreasing grid the correction
changes sign (the time-reversed SDE), so the same guidance also gives stochastic inversion.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .._types import expand_t
from ..metrics.cost import Cost
from ..paths import AffinePath, LinearPath
from ..solvers import sample, uniform_grid
from .base import AbstractGuidance, Field

__all__ = ["ControlledInversion", "ControlledEditing", "RectifiedSDE", "invert", "edit"]


def _check_strength(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _check_window(window: tuple[float, float]) -> tuple[float, float]:
    try:
        t_start, t_end = (float(w) for w in window)
    except (TypeError, ValueError):
        raise TypeError(f"window must be a pair (t_start, t_end), got {window!r}") from None
    if not 0.0 <= t_start <= t_end <= 1.0:
        raise ValueError(f"window must satisfy 0 <= t_start <= t_end <= 1, got ({t_start}, {t_end})")
    return t_start, t_end


def _in_window(t: Tensor, window: tuple[float, float]) -> Tensor:
    """Closed window membership (b,) → bool."""
    return (t >= window[0]) & (t <= window[1])


def _check_like(name: str, target: Tensor, x: Tensor) -> Tensor:
    if not torch.is_tensor(target):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.shape != x.shape:
        raise ValueError(f"{name} must have the state's shape {tuple(x.shape)}, got {tuple(target.shape)}")
    return target.to(dtype=x.dtype, device=x.device)


class ControlledInversion(AbstractGuidance):
    """RF-Inversion's controlled inversion field (Rout et al. 2024, eq. 8) for a decreasing grid 1 → 0.

    ``v̂(x, t) = v(x, t) + γ(t) ((x − z) / t − v(x, t))`` with ``γ(t) = γ`` for ``t`` in ``window`` and
    ``0`` elsewhere; ``(x − z) / t`` is the velocity of the straight line from the target noise ``z`` at
    ``t = 0`` through ``x`` at ``t``.

    Args:
        target_noise: ``z`` (b, *d), the noise the inversion is steered to (``y_1`` in the paper).
        gamma: controller strength ``γ ∈ [0, 1]``.
        window: ``(t_start, t_end)`` where the controller acts (closed); default all of ``[0, 1]``.

    The field is singular at ``t = 0`` when ``γ > 0``; fixed-step rules whose stages stay above 0 on a
    decreasing grid (``euler``, ``midpoint``) are exact for the straight controlled path.
    """

    def __init__(self, target_noise: Tensor, gamma: float, window: tuple[float, float] = (0.0, 1.0)) -> None:
        if not torch.is_tensor(target_noise):
            raise TypeError(f"target_noise must be a torch.Tensor, got {type(target_noise).__name__}")
        if not torch.isfinite(target_noise).all():
            raise ValueError("target_noise holds NaN or inf")
        self.target_noise = target_noise
        self.gamma = _check_strength("gamma", gamma)
        self.window = _check_window(window)

    def __repr__(self) -> str:
        return f"ControlledInversion(gamma={self.gamma}, window={self.window})"

    def velocity(self, v: Field, x: Tensor, t: Tensor, dt: Tensor, *, generator=None, cost=None) -> Tensor:
        v_t = v(x, t)
        if self.gamma == 0.0:
            return v_t
        z = _check_like("target_noise", self.target_noise, x)
        gamma_t = self.gamma * _in_window(t, self.window).to(x.dtype)
        if bool(((gamma_t > 0) & (t <= 0)).any()):
            raise ValueError("the controlled inversion field (x - z)/t is singular at t = 0; use a rule whose "
                             "stages stay above t = 0 (euler, midpoint) or end the window above 0")
        tt = expand_t(t, x)
        u_cond = (x - z) / torch.where(tt > 0, tt, torch.ones_like(tt))
        return v_t + expand_t(gamma_t, x) * (u_cond - v_t)


class ControlledEditing(AbstractGuidance):
    """RF-Inversion's controlled editing field (Rout et al. 2024, eq. 15/17) for an increasing grid 0 → 1.

    ``v̂(x, t) = v(x, t) + η(t) ((y − x) / (1 − t) − v(x, t))`` with ``η(t) = η`` for ``t`` in ``window``
    and ``0`` elsewhere; ``(y − x) / (1 − t)`` is the velocity of the straight line from ``x`` at ``t`` to
    the reference ``y`` at ``t = 1``. With ``η = 1`` on ``[0, τ]`` the state at ``τ`` is exactly
    ``(1 − τ) x_0 + τ y``; on ``[0, 1]`` the result is ``y``.

    Args:
        reference: ``y`` (b, *d), the image the edit stays faithful to (``y_0`` in the paper).
        eta: controller strength ``η ∈ [0, 1]``.
        window: ``(t_start, t_end)`` where the controller acts (closed); the paper's ``τ`` is ``(0, τ)``.

    The field is singular at ``t = 1`` when ``η > 0`` there; use ``euler`` or ``midpoint`` (no stage at
    ``t = 1``) or end the window before 1.
    """

    def __init__(self, reference: Tensor, eta: float, window: tuple[float, float] = (0.0, 1.0)) -> None:
        if not torch.is_tensor(reference):
            raise TypeError(f"reference must be a torch.Tensor, got {type(reference).__name__}")
        if not torch.isfinite(reference).all():
            raise ValueError("reference holds NaN or inf")
        self.reference = reference
        self.eta = _check_strength("eta", eta)
        self.window = _check_window(window)

    def __repr__(self) -> str:
        return f"ControlledEditing(eta={self.eta}, window={self.window})"

    def velocity(self, v: Field, x: Tensor, t: Tensor, dt: Tensor, *, generator=None, cost=None) -> Tensor:
        v_t = v(x, t)
        if self.eta == 0.0:
            return v_t
        y = _check_like("reference", self.reference, x)
        eta_t = self.eta * _in_window(t, self.window).to(x.dtype)
        if bool(((eta_t > 0) & (t >= 1)).any()):
            raise ValueError("the controlled editing field (y - x)/(1 - t) is singular at t = 1; use a rule whose "
                             "stages stay below t = 1 (euler, midpoint) or end the window before 1")
        one_minus_t = 1 - expand_t(t, x)
        u_cond = (y - x) / torch.where(one_minus_t > 0, one_minus_t, torch.ones_like(one_minus_t))
        return v_t + expand_t(eta_t, x) * (u_cond - v_t)


Diffusion = Callable[[Tensor], Tensor]


class RectifiedSDE(AbstractGuidance):
    """Euler–Maruyama for the SDE with the same marginals as the flow ODE (Song et al. 2021, eq. 6).

    ``dX = [v(X, t) + sign(dt) (g(t)² / 2) s(X, t)] dt + g(t) dW`` with the score
    ``s = path.score_from_velocity(v, x, t)`` (exact for a Gaussian source; for the linear path
    ``s = −(x − t v) / (1 − t)``). The ``velocity`` hook returns the corrected drift, ``after_step`` adds
    ``g(t) √|dt| ε`` with ``ε ~ N(0, I)`` drawn from the sampler's generator. On a decreasing grid
    (``sign(dt) = −1``) this is the time-reversed SDE, i.e. stochastic inversion with the same marginals.

    Args:
        diffusion: ``g`` — a non-negative number (constant) or a callable ``g(t) -> (b,)`` of ``t`` (b,).
        path: the path the velocity was trained on (default :class:`~steerflow.paths.LinearPath`).
        t_max: the score is singular at ``t = 1`` (``sigma_t = 0``); the correction and the noise are
            switched off for ``t > t_max`` (default ``1 − 1e-6``: only the endpoint itself).

    Use with ``method="euler"`` (one stage per step: Euler–Maruyama, strong order 1/2). Other rules still
    run but add the noise once per step with the left-point ``g``.
    """

    def __init__(self, diffusion: float | Diffusion = 1.0, *, path: AffinePath | None = None,
                 t_max: float = 1 - 1e-6) -> None:
        if callable(diffusion):
            self.g = diffusion
        else:
            if isinstance(diffusion, bool) or not isinstance(diffusion, (int, float)) or not diffusion >= 0:
                raise ValueError(f"diffusion must be a non-negative number or a callable g(t), got {diffusion!r}")
            const = float(diffusion)
            self.g = lambda t: torch.full_like(t, const)
        self.path = path if path is not None else LinearPath()
        if not 0 < t_max <= 1:
            raise ValueError(f"t_max must lie in (0, 1], got {t_max}")
        self.t_max = float(t_max)

    def __repr__(self) -> str:
        return f"RectifiedSDE(path={self.path!r})"

    def _g(self, t: Tensor, x: Tensor) -> Tensor:
        g = torch.as_tensor(self.g(t), dtype=x.dtype, device=x.device)
        if g.ndim == 0:
            g = g.expand(x.shape[0])
        if g.shape != (x.shape[0],) or (g < 0).any() or not torch.isfinite(g).all():
            raise ValueError(f"diffusion g(t) must return finite non-negative values of shape ({x.shape[0]},)")
        return torch.where(t <= self.t_max, g, torch.zeros_like(g))

    def velocity(self, v: Field, x: Tensor, t: Tensor, dt: Tensor, *, generator=None, cost=None) -> Tensor:
        v_t = v(x, t)
        g = self._g(t, x)
        if not bool((g > 0).any()):
            return v_t
        safe_t = torch.where(g > 0, t, torch.zeros_like(t))  # keep the score finite where it is switched off
        score = self.path.score_from_velocity(v_t, x, safe_t)
        sign = 1.0 if float(dt) > 0 else -1.0
        return v_t + sign * 0.5 * expand_t(g**2, x) * score

    def after_step(self, v: Field, x: Tensor, t_next: Tensor, *, t: Tensor, generator=None, cost=None) -> Tensor:
        g = self._g(t, x)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return x + expand_t(g * (t_next - t).abs().sqrt(), x) * eps


# --- convenience functions -----------------------------------------------------------------------

def _grid(steps: int, ts: Tensor | None) -> Tensor:
    return ts if ts is not None else uniform_grid(steps)


def invert(v, x_1: Tensor, *, steps: int = 100, gamma: float = 0.0, target_noise: Tensor | None = None,
           window: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None,
           method: str = "euler", ts: Tensor | None = None, cond: Any = None, cost: Cost | None = None,
           return_trajectory: bool = False, progress: bool = False):
    """Invert data ``x_1`` (b, *d) to noise (b, *d): ``sample`` on the decreasing grid ``1 → 0``.

    ``gamma = 0`` is plain ODE inversion (``sample(v, x_1, ts=uniform_grid(steps).flip(0))``); ``gamma > 0``
    steers toward ``target_noise`` (drawn from ``generator`` as ``N(0, I)`` when not given) with
    :class:`ControlledInversion` (Rout et al. 2024, Algorithm 1). ``ts`` overrides the grid and must be
    increasing (it is flipped here). Returns the noise, or a :class:`~steerflow.solvers.Trajectory`.
    """
    grid = _grid(steps, ts)
    if grid[0] > grid[-1]:
        raise ValueError("pass an increasing grid ts (0 → 1); invert flips it")
    guidance = None
    if gamma != 0:
        if target_noise is None:
            target_noise = torch.randn(x_1.shape, generator=generator, dtype=x_1.dtype, device=x_1.device)
        guidance = ControlledInversion(target_noise, gamma, window)
    return sample(v, x_1, ts=grid.flip(0), method=method, generator=generator, guidance=guidance, cond=cond,
                  cost=cost, return_trajectory=return_trajectory, progress=progress)


def edit(v, x_0: Tensor, reference: Tensor, *, eta: float, window: tuple[float, float] = (0.0, 1.0),
         steps: int = 100, method: str = "euler", generator: torch.Generator | None = None,
         ts: Tensor | None = None, cond: Any = None, cost: Cost | None = None, return_trajectory: bool = False,
         progress: bool = False):
    """Generate from ``x_0`` (b, *d) (usually ``invert(v, reference, ...)``) while staying faithful to
    ``reference`` (b, *d): ``sample`` on ``0 → 1`` with :class:`ControlledEditing` (Rout et al. 2024,
    Algorithm 2). ``cond`` is the (new) condition of the edit, e.g. a class label.
    """
    grid = _grid(steps, ts)
    if grid[0] > grid[-1]:
        raise ValueError("edit integrates 0 → 1; pass an increasing grid ts")
    guidance = ControlledEditing(reference, eta, window) if eta != 0 else None
    return sample(v, x_0, ts=grid, method=method, generator=generator, guidance=guidance, cond=cond, cost=cost,
                  return_trajectory=return_trajectory, progress=progress)
