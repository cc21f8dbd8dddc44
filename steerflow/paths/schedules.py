"""Schedules ``(alpha_t, sigma_t)`` of affine probability paths ``x_t = alpha_t x_1 + sigma_t x_0``.

Time convention: ``t = 0`` noise (``alpha_0 = 0, sigma_0 = 1``), ``t = 1`` data
(``alpha_1 = 1, sigma_1 = 0``), as in Lipman et al., "Flow Matching for Generative Modeling" and
facebookresearch/flow_matching's ``CondOTScheduler``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ScheduleValues:
    """``alpha_t, sigma_t`` and their time derivatives, each broadcastable against the state."""

    alpha_t: Tensor
    sigma_t: Tensor
    d_alpha_t: Tensor
    d_sigma_t: Tensor


class AbstractSchedule(ABC):
    """A differentiable schedule with ``alpha_0 = 0, sigma_0 = 1, alpha_1 = 1, sigma_1 = 0``."""

    name: str = "abstract"

    @abstractmethod
    def __call__(self, t: Tensor) -> ScheduleValues: ...


class LinearSchedule(AbstractSchedule):
    """Rectified flow / conditional OT: ``alpha_t = t``, ``sigma_t = 1 - t`` (Liu et al. 2022)."""

    name = "linear"

    def __call__(self, t: Tensor) -> ScheduleValues:
        one = torch.ones_like(t)
        return ScheduleValues(t, 1 - t, one, -one)


class CosineSchedule(AbstractSchedule):
    """``alpha_t = sin(pi t / 2)``, ``sigma_t = cos(pi t / 2)`` (variance preserving, trigonometric)."""

    name = "cosine"

    def __call__(self, t: Tensor) -> ScheduleValues:
        h = 0.5 * math.pi
        return ScheduleValues(torch.sin(h * t), torch.cos(h * t), h * torch.cos(h * t), -h * torch.sin(h * t))


@dataclass(frozen=True)
class PolynomialSchedule(AbstractSchedule):
    """``alpha_t = t^n``, ``sigma_t = 1 - t^n`` (flow_matching's ``PolynomialConvexScheduler``)."""

    n: float = 2.0
    name = "polynomial"

    def __post_init__(self) -> None:
        if not self.n > 0:
            raise ValueError(f"PolynomialSchedule needs n > 0, got {self.n}")

    def __call__(self, t: Tensor) -> ScheduleValues:
        a = t**self.n
        da = self.n * t ** (self.n - 1)
        return ScheduleValues(a, 1 - a, da, -da)


@dataclass(frozen=True)
class VPSchedule(AbstractSchedule):
    """Variance-preserving SDE schedule (Song et al. 2021) reparametrised to ``t = 1`` data.

    With ``s = 1 - t`` and ``T(s) = beta_min s + (beta_max - beta_min) s^2 / 2``:
    ``alpha_t = exp(-T(s) / 2)``, ``sigma_t = sqrt(1 - alpha_t^2)``. ``sigma`` vanishes only in the limit,
    so ``t`` is clamped to ``1 - eps`` wherever ``sigma_t`` is divided by.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    name = "vp"

    def __call__(self, t: Tensor) -> ScheduleValues:
        s = 1 - t
        T = self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2
        dT_dt = -(self.beta_min + (self.beta_max - self.beta_min) * s)
        alpha = torch.exp(-0.5 * T)
        d_alpha = -0.5 * dT_dt * alpha
        sigma = torch.sqrt(torch.clamp(1 - alpha**2, min=0.0))
        d_sigma = -alpha * d_alpha / torch.clamp(sigma, min=1e-12)
        return ScheduleValues(alpha, sigma, d_alpha, d_sigma)


SCHEDULES: dict[str, type[AbstractSchedule]] = {
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "polynomial": PolynomialSchedule,
    "vp": VPSchedule,
}


def get_schedule(name: str | AbstractSchedule) -> AbstractSchedule:
    """Look a schedule up by name (or pass one through)."""
    if isinstance(name, AbstractSchedule):
        return name
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[name]()
