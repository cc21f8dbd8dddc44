"""Closed forms of optimal transport between Gaussians (the test oracles of :mod:`steerflow.transport`).

For ``N(m_1, Σ_1) → N(m_2, Σ_2)`` under the quadratic cost the Brenier map is affine,
``T(x) = m_2 + A (x - m_1)``, ``A = Σ_1^{-1/2} (Σ_1^{1/2} Σ_2 Σ_1^{1/2})^{1/2} Σ_1^{-1/2}`` (symmetric
positive definite); its cost ``E|T(X) - X|²`` is ``W_2²`` (:func:`steerflow.metrics.w2_gaussian`)
(Dowson & Landau 1982; Peyré & Cuturi, "Computational Optimal Transport", Remark 2.31).
"""
from __future__ import annotations

import torch
from torch import Tensor


def sqrtm_psd(S: Tensor) -> Tensor:
    """Principal square root of a symmetric positive semi-definite matrix (d, d) by eigendecomposition."""
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(S.shape)}")
    w, V = torch.linalg.eigh(0.5 * (S + S.T))
    return (V * w.clamp_min(0).sqrt()) @ V.T


def brenier_map_gaussian(m_1: Tensor, S_1: Tensor, m_2: Tensor, S_2: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(A, b)`` with ``T(x) = A x + b`` the quadratic-cost OT map ``N(m_1, S_1) → N(m_2, S_2)``."""
    r1 = sqrtm_psd(S_1)
    r1_inv = torch.linalg.inv(r1)
    A = r1_inv @ sqrtm_psd(r1 @ S_2 @ r1) @ r1_inv
    A = 0.5 * (A + A.T)
    return A, m_2 - A @ m_1

