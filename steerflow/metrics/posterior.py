"""Scores of steered samples against an exact (Gaussian-mixture) posterior: mode weights and spread."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..data.mixture import GaussianMixture


def _samples_2d(x, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (n, d) with n >= 1, got {tuple(x.shape)}")
    x = x.detach().to(torch.float64).cpu()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf")
    return x


def assign_components(samples: Tensor, mixture: GaussianMixture) -> Tensor:
    """Index (n,) of each sample's max-responsibility component, ``argmax_k w_k N(x; μ_k, Σ_k)``."""
    x = _samples_2d(samples, "samples")
    if x.shape[1] != mixture.dim:
        raise ValueError(f"samples must have dimension {mixture.dim} to match the mixture, got {x.shape[1]}")
    comps = torch.distributions.MultivariateNormal(mixture.means.to(torch.float64),
                                                   covariance_matrix=mixture.covs.to(torch.float64))
    log_r = comps.log_prob(x[:, None, :]) + mixture.weights.to(torch.float64).log()  # (n, K)
    return log_r.argmax(dim=1)


def mode_weight_tv(samples: Tensor, mixture: GaussianMixture) -> float:
    """Total variation between the empirical mode weights of ``samples`` and the mixture's weights.

    Each sample is assigned to its max-responsibility component (:func:`assign_components`); with
    ``p̂_k`` the fraction assigned to ``k``, returns ``TV = ½ Σ_k |p̂_k - w_k|`` ∈ [0, 1]. Against an exact
    posterior mixture (``GaussianMixture.posterior``) it measures whether a steering method puts the
    right mass on each mode. Overlapping components make it non-zero even for exact samples (the
    assignment is a hard classifier), so compare methods against the same floor: the score of exact
    samples ``mixture.sample(n)``.

    Args:
        samples: (n, d).
        mixture: a :class:`~steerflow.data.GaussianMixture` in ``d`` dimensions.
    """
    k = assign_components(samples, mixture)
    counts = torch.bincount(k, minlength=mixture.n_components).to(torch.float64)
    p_hat = counts / counts.sum()
    return float(0.5 * (p_hat - mixture.weights.to(torch.float64)).abs().sum())


def _trace_cov(x) -> float:
    if isinstance(x, GaussianMixture):
        w, mu, S = (a.to(torch.float64) for a in (x.weights, x.means, x.covs))
        mean = w @ mu
        # law of total covariance: Cov = Σ w_k (Σ_k + μ_k μ_kᵀ) - m mᵀ
        return float((w * (torch.diagonal(S, dim1=-2, dim2=-1).sum(-1) + mu.square().sum(-1))).sum()
                     - mean.square().sum())
    x = _samples_2d(x, "reference")
    if x.shape[0] < 2:
        raise ValueError("at least 2 samples are needed to estimate a covariance")
    return float(x.var(dim=0, unbiased=True).sum())


def trace_cov_ratio(samples: Tensor, reference) -> float:
    """``tr Cov(samples) / tr Cov(reference)``: 1 when the spread matches, < 1 for collapse, > 1 for blur.

    Sample covariances use the ``1/(n-1)`` normalisation. ``reference`` is either samples (m, d) or a
    :class:`~steerflow.data.GaussianMixture`, whose covariance is exact (law of total covariance).

    Args:
        samples: (n, d), n ≥ 2.
        reference: (m, d) samples or a GaussianMixture of dimension d.
    """
    x = _samples_2d(samples, "samples")
    d_ref = reference.dim if isinstance(reference, GaussianMixture) else _samples_2d(reference, "reference").shape[1]
    if x.shape[1] != d_ref:
        raise ValueError(f"samples have dimension {x.shape[1]} but the reference has {d_ref}")
    num = _trace_cov(x)
    den = _trace_cov(reference)
    if not den > 0:
        raise ValueError("the reference covariance has zero trace")
    return num / den
