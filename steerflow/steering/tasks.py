"""Inverse tasks and steering methods by name: the measurement operator of a task (:func:`build_task`) and a
guidance for it (:func:`build_method`), as ``steerflow steer`` and the benchmarks build them.

Both are library functions that raise ``ValueError`` on bad input (the CLI reports it as a usage error).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .operators import AvgPool, Blur, Colorize, Identity, Mask
from .registry import GUIDANCES, get_guidance

__all__ = ["INVERSE_TASKS", "INVERSE_METHODS", "METHODS", "build_task", "build_method", "freeform_mask"]

INVERSE_TASKS = ("inpaint", "box", "freeform", "random", "superres", "deblur", "colorize", "denoise")
"""Operator names of :func:`build_task` (``inpaint`` is box inpainting)."""
INVERSE_METHODS = ("unguided", "flowchef", "dps", "dds", "enkg", "otode", "pnpflow", "default")
"""The methods the benchmark compares; :func:`build_method` accepts these and the rest of :data:`METHODS`."""
METHODS = ("unguided",) + tuple(sorted(k for k in GUIDANCES if k != "exact"))
"""Every name :func:`build_method` accepts: ``unguided`` and the registry's methods that need only ``(A, y, σ)``."""
_PRIMARY = {"flowchef": "step_size", "pnpflow": "step_size", "dps": "scale", "lookahead": "scale",
            "dreamguider": "scale", "enkg": "scale", "otode": "scale", "default": "scale"}


def freeform_mask(height: int, width: int, generator: torch.Generator | None = None, *,
                  coverage: tuple[float, float] = (0.2, 0.4), max_tries: int = 200) -> torch.Tensor:
    """A free-form brush-stroke mask (h, w) bool, ``True`` = observed, with ``coverage[0] ≤`` hidden fraction
    ``≤ coverage[1]``, drawn from ``generator`` (the same seed gives the same mask).

    Irregular holes in the manner of free-form inpainting masks (Yu et al. 2019, "Free-form image inpainting
    with gated convolution"): a target hidden fraction ``ρ ~ U(coverage)`` is drawn; strokes are added until
    the hidden fraction reaches ``ρ``. A stroke is a polyline of 2–5 segments from a uniform random start,
    each segment of length ``U(s/10, s/4)`` (``s = min(h, w)``) in a direction that turns by ``U(−π/2, π/2)``
    from the previous one (the first uniform in ``[0, 2π)``), drawn with a round brush of radius
    ``U(s/24, s/12)`` (at least 1 pixel): a pixel is hidden when its centre lies within the radius of a
    segment. A segment that would push the hidden fraction above ``coverage[1]`` is not drawn: the mask is
    returned as it is when it already hides ``≥ coverage[0]``, otherwise that stroke ends and another starts
    (at most ``max_tries`` strokes in all).

    Raises:
        ValueError: bad sizes or coverage, or no mask within ``coverage`` after ``max_tries`` strokes.
    """
    for name, v in (("height", height), ("width", width), ("max_tries", max_tries)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    lo, hi = (float(c) for c in coverage)
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(f"coverage must be (lo, hi) with 0 < lo <= hi < 1, got {coverage!r}")
    g = generator
    s = min(height, width)
    rows = torch.arange(height, dtype=torch.float64)[:, None, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :, None]

    def u(a: float, b: float) -> float:
        return a + (b - a) * float(torch.rand((), generator=g, dtype=torch.float64))

    rho = u(lo, hi)
    hidden = torch.zeros(height, width, dtype=torch.bool)
    for _ in range(max_tries):
        radius = max(1.0, u(s / 24, s / 12))
        y, x = u(0, height - 1), u(0, width - 1)
        angle = u(0, 2 * math.pi)
        for _ in range(int(torch.randint(2, 6, (), generator=g))):
            length = u(s / 10, s / 4)
            y1, x1 = y + length * math.sin(angle), x + length * math.cos(angle)
            # the segment's points at spacing ≤ 0.25 px; a pixel is hit when its centre is within the radius
            w = torch.linspace(0, 1, max(2, math.ceil(4 * length) + 1), dtype=torch.float64)
            d2 = (rows - (y + (y1 - y) * w)) ** 2 + (cols - (x + (x1 - x) * w)) ** 2
            trial = hidden | (d2 <= radius**2).any(-1)
            frac = float(trial.double().mean())
            if frac > hi:
                if float(hidden.double().mean()) >= lo:
                    return ~hidden
                break  # the stroke ends here; the next one starts elsewhere
            hidden = trial
            if frac >= rho:
                return ~hidden
            y, x, angle = y1, x1, angle + u(-math.pi / 2, math.pi / 2)
    raise ValueError(f"no free-form mask with hidden fraction in [{lo}, {hi}] after {max_tries} strokes "
                     f"for a {height}x{width} image")


def build_task(name: str, shape: Sequence[int], *, generator: torch.Generator | None = None,
               p_observed: float = 0.4, blur_size: int = 5, blur_std: float = 1.0, factor: int = 2,
               blur: str = "gaussian", blur_angle: float = 0.0, coverage: tuple[float, float] = (0.2, 0.4)):
    """The measurement operator of an inverse task for images of shape ``(C, H, W)``.

    ``inpaint``/``box``: the centre ``H/2 × W/2`` box hidden; ``freeform``: brush strokes hiding a fraction
    in ``coverage`` of the pixels (:func:`freeform_mask`, drawn from ``generator``; all channels of a pixel
    alike); ``random``: each pixel observed with probability ``p_observed`` (drawn from ``generator``; 70 %
    missing is ``p_observed=0.3``); ``superres``: ``factor × factor`` average
    pooling; ``deblur``: a ``blur_size`` Gaussian blur of std ``blur_std`` (``blur="motion"``: a linear motion
    blur of length ``blur_size`` at ``blur_angle`` degrees); ``colorize``: the grey image of an RGB image;
    ``denoise``: the identity.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"tasks act on images (C, H, W), got shape {shape}")
    _, H, W = shape
    if name in ("inpaint", "box"):
        return Mask.box(shape, H // 4, W // 4, max(1, H // 2), max(1, W // 2))
    if name == "freeform":
        m = freeform_mask(H, W, generator, coverage=coverage)
        return Mask(m.expand(shape).clone())
    if name == "random":
        return Mask.random(shape, p_observed, generator)
    if name == "superres":
        if H % factor or W % factor:
            raise ValueError(f"superres by {factor} needs H and W divisible by {factor}, got {H}x{W}")
        return AvgPool(factor, shape)
    if name == "deblur":
        if blur not in ("gaussian", "motion"):
            raise ValueError(f"unknown blur {blur!r}; expected 'gaussian' or 'motion'")
        if blur == "motion":
            return Blur.motion(blur_size, blur_angle, shape)
        return Blur.gaussian(blur_size, blur_std, shape)
    if name == "colorize":
        return Colorize(shape)
    if name == "denoise":
        return Identity(shape)
    raise ValueError(f"unknown task {name!r}; expected one of {list(INVERSE_TASKS)}")


def build_method(name: str, operator, y: torch.Tensor, sigma: float, *, scale: float | None = None,
                 ensemble_size: int | None = None, path=None, window: tuple[float, float] | None = None):
    """A guidance for ``y = operator(x) + N(0, sigma²)`` by name; ``unguided`` is ``None``.

    ``scale`` sets the method's main strength (``step_size`` for FlowChef and PnP-Flow, ``scale`` for the
    others that have one); ``ensemble_size`` is EnKG's particles per image (the batch holds them in
    consecutive groups); ``path`` the path the model was trained with (x̂₁ and x̂₀ are read from it);
    ``window`` the times ``(start, stop)`` where the method acts (default: all of ``[0, 1]``).
    """
    if name == "unguided":
        return None
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {list(METHODS)}")
    kwargs = {}
    if scale is not None:
        if name not in _PRIMARY:
            raise ValueError(f"method {name!r} has no scale to set")
        kwargs[_PRIMARY[name]] = float(scale)
    if name == "enkg" and ensemble_size is not None:
        kwargs["ensemble_size"] = int(ensemble_size)
    if path is not None:
        kwargs["path"] = path
    if window is not None:
        kwargs["window"] = window
    return get_guidance(name, operator, y, sigma, **kwargs)
