"""Two-dimensional toy densities, sampled in torch from a ``torch.Generator`` (no sklearn, no downloads).

Scales follow the conventions used in flow-matching benchmarks so figures are comparable:

* ``moons`` and ``8gaussians`` follow torchcfm (``torchcfm/utils.py``: ``sample_moons``,
  ``sample_8gaussians``), in distribution;
* ``checkerboard``, ``circles``, ``swissroll`` and ``spirals`` follow FFJORD's ``toy_data.py``
  (Grathwohl et al. 2019), which torchcfm's examples also use;
* ``gaussian`` is the standard normal ``N(0, I₂)`` (the usual source).

Every sampler returns an i.i.d. sample (mixture labels are drawn, not split deterministically).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


def _u(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _n2(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.randn(n, 2, generator=generator, dtype=torch.float64)


def gaussian(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal ``N(0, I₂)``."""
    return _n2(n, generator)


def moons(n: int, generator: torch.Generator | None = None, *, return_labels: bool = False) -> Tensor:
    """Two interleaved half circles, scaled as torchcfm's ``sample_moons`` (``3 z - 1``).

    Upper moon ``(cos φ, sin φ)``, lower moon ``(1 - cos φ, 1/2 - sin φ)``, ``φ ~ U[0, π]``, each moon
    with probability 1/2, jittered by ``(ε, ε)`` with ``ε ~ U[0, 0.2]`` (torchdyn's ``generate_moons``,
    which torchcfm calls with ``noise=0.2``, adds one uniform draw to both coordinates). Mean:
    ``3 (1/2 + 0.1, 1/4 + 0.1) - 1 = (0.8, 0.05)``. With ``return_labels`` also each point's moon (n,) long
    (0 upper, 1 lower), from the same draws.
    """
    phi = math.pi * _u(n, generator)
    lower = _u(n, generator) < 0.5
    x = torch.where(lower, 1.0 - torch.cos(phi), torch.cos(phi))
    y = torch.where(lower, 0.5 - torch.sin(phi), torch.sin(phi))
    eps = 0.2 * _u(n, generator)
    points = 3.0 * torch.stack([x + eps, y + eps], dim=1) - 1.0
    return (points, lower.long()) if return_labels else points


def eight_gaussians(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Eight Gaussians on a circle of radius 5, as torchcfm's ``sample_8gaussians``.

    Centres ``5 (cos(k π/4), sin(k π/4))``, equal weights; covariance ``√0.1 · I`` (torchcfm passes
    ``sqrt(var)`` with ``var = 0.1`` as the covariance matrix), i.e. per-coordinate std ``0.1^{1/4} ≈ 0.562``.
    """
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k.to(torch.float64) * (math.pi / 4)
    centres = 5.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centres + 0.1 ** 0.25 * _n2(n, generator)


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform on the 8 dark squares of a 4×4 checkerboard on ``[-4, 4]²`` (FFJORD)."""
    x1 = 4.0 * _u(n, generator) - 2.0
    x2 = _u(n, generator) - 2.0 * torch.randint(0, 2, (n,), generator=generator).to(torch.float64)
    x2 = x2 + torch.floor(x1) % 2
    return 2.0 * torch.stack([x1, x2], dim=1)


def circles(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Two concentric circles of radii 3 and 1.5 with Gaussian noise of std 0.24 (FFJORD: ``3 ×``
    sklearn's ``make_circles(factor=0.5, noise=0.08)``), each circle with probability 1/2."""
    phi = 2 * math.pi * _u(n, generator)
    radius = torch.where(_u(n, generator) < 0.5, 1.0, 0.5).to(torch.float64)
    z = radius[:, None] * torch.stack([torch.cos(phi), torch.sin(phi)], dim=1)
    return 3.0 * (z + 0.08 * _n2(n, generator))


def swissroll(n: int, generator: torch.Generator | None = None) -> Tensor:
    """The 2-D Swiss roll (FFJORD): ``(τ cos τ, τ sin τ) + N(0, I)``, ``τ ~ U[1.5π, 4.5π]``, divided by 5."""
    tau = 1.5 * math.pi * (1.0 + 2.0 * _u(n, generator))
    z = torch.stack([tau * torch.cos(tau), tau * torch.sin(tau)], dim=1) + _n2(n, generator)
    return z / 5.0


def spirals(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Two interleaved spirals (FFJORD's ``2spirals``): angle ``s = √u · 3π`` (540°), arm
    ``(-s cos s + 0.5 ε₁, s sin s + 0.5 ε₂)`` with ``ε ~ U[0, 1]``, the second arm negated, divided by 3,
    plus ``N(0, 0.1² I)``."""
    s = torch.sqrt(_u(n, generator)) * (540.0 * 2 * math.pi / 360)
    arm = torch.stack([-torch.cos(s) * s + 0.5 * _u(n, generator), torch.sin(s) * s + 0.5 * _u(n, generator)], dim=1)
    sign = torch.where(_u(n, generator) < 0.5, 1.0, -1.0).to(torch.float64)
    return sign[:, None] * arm / 3.0 + 0.1 * _n2(n, generator)


TOYS: dict[str, Callable[[int, torch.Generator | None], Tensor]] = {
    "gaussian": gaussian,
    "moons": moons,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "circles": circles,
    "swissroll": swissroll,
    "spirals": spirals,
}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``n`` i.i.d. samples (n, 2) float32 from the toy density ``name`` (a key of ``TOYS``).

    The same seeded ``generator`` gives the same samples every time (computed in float64 on the CPU,
    then cast).
    """
    if name not in TOYS:
        raise ValueError(f"unknown toy {name!r}; expected one of {sorted(TOYS)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return TOYS[name](n, generator).to(torch.float32)
