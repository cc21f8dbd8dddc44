"""Image quality: PSNR and SSIM for batches of images (b, c, h, w)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_REDUCTIONS = ("mean", "none")


def _check_images(x: Tensor, y: Tensor, data_range: float, reduction: str) -> tuple[Tensor, Tensor]:
    for name, a in (("x", x), ("y", y)):
        if not torch.is_tensor(a):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
        if a.ndim != 4:
            raise ValueError(f"{name} must have shape (b, c, h, w), got {tuple(a.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not (isinstance(data_range, (int, float)) and data_range > 0 and math.isfinite(data_range)):
        raise ValueError(f"data_range must be a positive number (e.g. 2.0 for [-1, 1], 1.0 for [0, 1]), "
                         f"got {data_range!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {list(_REDUCTIONS)}")
    return x.detach().to(torch.float64), y.detach().to(torch.float64)


def _reduce(per_image: Tensor, reduction: str) -> float | Tensor:
    return float(per_image.mean()) if reduction == "mean" else per_image


def psnr(x: Tensor, y: Tensor, data_range: float, *, reduction: str = "mean") -> float | Tensor:
    """Peak signal-to-noise ratio ``PSNR = 10 log₁₀(R² / MSE)`` in dB, ``R`` = ``data_range``.

    The MSE is taken per image over ``(c, h, w)``; ``reduction="mean"`` averages the per-image PSNR
    over the batch (a float), ``"none"`` returns them (b,). Identical images give ``inf``. A constant
    offset ``δ`` gives exactly ``20 log₁₀(R / |δ|)``.

    Args:
        x, y: images (b, c, h, w).
        data_range: ``max - min`` of the pixel range (2 for ``[-1, 1]``, 1 for ``[0, 1]``, 255 for bytes).
    """
    x, y = _check_images(x, y, data_range, reduction)
    mse = (x - y).square().flatten(1).mean(1)
    per_image = 10.0 * torch.log10(data_range**2 / mse)  # mse = 0 -> inf
    return _reduce(per_image, reduction)


def _window(window_size: int, gaussian: bool, sigma: float) -> Tensor:
    if gaussian:
        r = torch.arange(window_size, dtype=torch.float64) - (window_size - 1) / 2
        g = torch.exp(-r**2 / (2 * sigma**2))
    else:
        g = torch.ones(window_size, dtype=torch.float64)
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, y: Tensor, data_range: float, window_size: int = 7, gaussian: bool = True,
         sigma: float = 1.5, *, padding: str = "valid", k1: float = 0.01, k2: float = 0.03,
         reduction: str = "mean") -> float | Tensor:
    """Structural similarity (Wang, Bovik, Sheikh & Simoncelli 2004, eq. 13), mean over the SSIM map.

    With local statistics under a normalised window ``w`` (Gaussian of std ``sigma`` (eq. 14 uses 11×11,
    σ = 1.5) or uniform), per channel:
    ``μ_x = w ⋆ x``, ``σ_x² = w ⋆ x² - μ_x²``, ``σ_xy = w ⋆ (x y) - μ_x μ_y`` (weighted moments, no
    ``n/(n-1)`` correction), and

        ``SSIM = (2 μ_x μ_y + C₁)(2 σ_xy + C₂) / ((μ_x² + μ_y² + C₁)(σ_x² + σ_y² + C₂))``,
        ``C₁ = (k₁ R)²``, ``C₂ = (k₂ R)²``, ``R`` = ``data_range``.

    The map is averaged over all positions and channels of an image (MSSIM, eq. 17).

    With ``window_size=11``, ``sigma=1.5`` (the paper's window) and ``padding="valid"`` this is what
    ``skimage.metrics.structural_similarity(x, y, data_range=R, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)`` computes (``channel_axis`` for colour): skimage filters the whole image and
    then drops the ``(ws − 1) / 2`` border positions, which leaves exactly the valid positions (agreement to
    ~1e-15 in float64, tested).

    Args:
        x, y: images (b, c, h, w); the window must fit: ``window_size ≤ min(h, w)``.
        data_range: ``max - min`` of the pixel range.
        window_size: odd side of the window (7 default; 3 or 5 for 8×8 digits).
        gaussian: Gaussian window (True) or uniform (False).
        sigma: the Gaussian window's standard deviation.
        padding: ``"valid"`` — only positions where the window fits entirely (map of size
            ``(h - ws + 1, w - ws + 1)``; like the paper and ``skimage``'s cropping); ``"reflect"`` —
            reflect-pad by ``ws // 2`` so the map is ``(h, w)`` (needs ``ws // 2 < min(h, w)``).
        reduction: ``"mean"`` over the batch (float) or ``"none"`` (b,).
    """
    x, y = _check_images(x, y, data_range, reduction)
    if not isinstance(window_size, int) or window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size!r}")
    h, w = x.shape[-2:]
    if window_size > min(h, w):
        raise ValueError(f"window_size {window_size} does not fit images of size {h}×{w}; use a smaller window")
    if gaussian and not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if padding not in ("valid", "reflect"):
        raise ValueError(f"unknown padding {padding!r}; expected 'valid' or 'reflect'")
    c = x.shape[1]
    win = _window(window_size, gaussian, sigma).to(x.device).expand(c, 1, window_size, window_size)
    if padding == "reflect":
        p = window_size // 2
        x, y = F.pad(x, (p, p, p, p), mode="reflect"), F.pad(y, (p, p, p, p), mode="reflect")

    def filt(a: Tensor) -> Tensor:
        return F.conv2d(a, win, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov_xy = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return _reduce(ssim_map.flatten(1).mean(1), reduction)
