"""Gaussian mixtures: exact velocity field, score and posterior — the test oracles of steerflow.

Source ``x_0 ~ N(0, I)``, data ``x_1 ~ Σ_k w_k N(μ_k, Σ_k)``, linear path ``x_t = t x_1 + (1 - t) x_0``.
Given component ``k``, ``(x_1, x_t)`` is jointly Gaussian with ``C_k(t) = t² Σ_k + (1 - t)² I`` the
covariance of ``x_t``, so

* ``E[x_1 | x_t, k] = μ_k + t Σ_k C_k⁻¹ (x - t μ_k)``, ``E[x_0 | x_t, k] = (1 - t) C_k⁻¹ (x - t μ_k)``,
* ``Cov[x_1 | x_t, k] = Σ_k - t² Σ_k C_k⁻¹ Σ_k``,
* responsibilities ``r_k(x) ∝ w_k N(x; t μ_k, C_k)``,

and the marginal velocity is ``v(x, t) = Σ_k r_k (E[x_1 | x, k] - E[x_0 | x, k])`` (the conditional
expectation of ``u_t = x_1 - x_0``; Liu et al. 2022, Lipman et al. 2023). Under a linear measurement
``y = A x_1 + N(0, σ² I)`` the posterior is again a mixture (Bishop, PRML §2.3.3).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


class GaussianMixture:
    """``Σ_k w_k N(μ_k, Σ_k)`` in ``d`` dimensions.

    Args:
        weights: (K,) non-negative, normalised on construction.
        means: (K, d).
        covs: (K, d, d) symmetric positive definite, or (K,) / scalar isotropic variances.
    """

    def __init__(self, weights, means, covs, *, dtype: torch.dtype = torch.float64) -> None:
        means = torch.as_tensor(means, dtype=dtype)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        K, d = means.shape
        weights = torch.as_tensor(weights, dtype=dtype)
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape ({K},), got {tuple(weights.shape)}")
        if (weights < 0).any() or not weights.sum() > 0:
            raise ValueError("weights must be non-negative with a positive sum")
        covs = torch.as_tensor(covs, dtype=dtype)
        if covs.ndim == 0:
            covs = covs.expand(K)
        if covs.ndim == 1:
            if covs.shape != (K,):
                raise ValueError(f"isotropic covs must have shape ({K},), got {tuple(covs.shape)}")
            covs = covs[:, None, None] * torch.eye(d, dtype=dtype)
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must have shape ({K}, {d}, {d}), got {tuple(covs.shape)}")
        if not torch.allclose(covs, covs.transpose(-1, -2), atol=1e-10):
            raise ValueError("covs must be symmetric")
        try:
            self._chol = torch.linalg.cholesky(covs)
        except RuntimeError as e:
            raise ValueError("covs must be positive definite") from e
        self.weights = weights / weights.sum()
        self.means, self.covs = means, covs
        self.dtype = dtype

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.n_components}, d={self.dim})"

    # --- sampling and densities --------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, *, return_labels: bool = False):
        """Draw ``n`` samples (n, d) in the mixture's dtype (CPU); optionally the component labels."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.dtype)
        x = self.means[k] + torch.einsum("nij,nj->ni", self._chol[k], z)
        return (x, k) if return_labels else x

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` (b,) of the mixture (the data distribution, ``t = 1``)."""
        return torch.logsumexp(self._component_log_prob(x.to(self.dtype), self.means, self.covs)
                               + self.weights.log(), dim=-1)

    @staticmethod
    def _component_log_prob(x: Tensor, means: Tensor, covs: Tensor) -> Tensor:
        """``log N(x; means_k, covs_k)`` for x (b, d), means (K, d) or (b, K, d), covs (K|b,K, d, d)."""
        diff = x[:, None, :] - means  # (b, K, d)
        L = torch.linalg.cholesky(covs)
        if L.ndim == 3:
            L = L.expand(x.shape[0], *L.shape)
        sol = torch.linalg.solve_triangular(L, diff[..., None], upper=False)[..., 0]
        d = x.shape[-1]
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        return -0.5 * (sol**2).sum(-1) - 0.5 * logdet - 0.5 * d * math.log(2 * math.pi)

    # --- the linear path ---------------------------------------------------------------------
    def _conditionals(self, x: Tensor, t: Tensor):
        """Responsibilities (b, K), E[x_1|x,k], E[x_0|x,k] (b, K, d) and C_k(t) (b, K, d, d)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (b, {self.dim}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, dtype=self.dtype, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        tt = t[:, None, None, None]
        eye = torch.eye(self.dim, dtype=self.dtype)
        C = tt**2 * self.covs + (1 - tt) ** 2 * eye  # (b, K, d, d)
        mean_t = t[:, None, None] * self.means  # (b, K, d)
        diff = x[:, None, :] - mean_t
        sol = torch.linalg.solve(C, diff[..., None])[..., 0]  # C^{-1}(x - t μ)
        e_x1 = self.means + t[:, None, None] * torch.einsum("kij,bkj->bki", self.covs, sol)
        e_x0 = (1 - t)[:, None, None] * sol
        logr = self._component_log_prob(x, mean_t, C) + self.weights.log()
        r = torch.softmax(logr, dim=-1)
        return r, e_x1, e_x0, C, sol

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """Exact marginal velocity ``v(x, t) = E[x_1 - x_0 | x_t = x]`` (b, d) for the linear path."""
        out_dtype = x.dtype
        r, e_x1, e_x0, _, _ = self._conditionals(x.to(self.dtype), t)
        return (r[..., None] * (e_x1 - e_x0)).sum(1).to(out_dtype)

    def denoiser(self, x: Tensor, t: Tensor) -> Tensor:
        """``E[x_1 | x_t = x]`` (b, d)."""
        r, e_x1, _, _, _ = self._conditionals(x.to(self.dtype), t)
        return (r[..., None] * e_x1).sum(1).to(x.dtype)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """``∇_x log p_t(x)`` (b, d) of the marginal at time ``t``."""
        r, _, _, _, sol = self._conditionals(x.to(self.dtype), t)
        return -(r[..., None] * sol).sum(1).to(x.dtype)

    def marginal(self, t: float) -> "GaussianMixture":
        """The law of ``x_t`` as a mixture: ``Σ w_k N(t μ_k, t² Σ_k + (1 - t)² I)``."""
        eye = torch.eye(self.dim, dtype=self.dtype)
        return GaussianMixture(self.weights, t * self.means, t**2 * self.covs + (1 - t) ** 2 * eye, dtype=self.dtype)

    # --- measurements ------------------------------------------------------------------------
    def posterior(self, A, y, noise_std: float) -> "GaussianMixture":
        """Exact posterior of ``x`` given ``y = A x + N(0, noise_std² I)``; ``A`` (m, d), ``y`` (m,)."""
        A = torch.as_tensor(A, dtype=self.dtype)
        y = torch.as_tensor(y, dtype=self.dtype).reshape(-1)
        if A.ndim != 2 or A.shape[1] != self.dim:
            raise ValueError(f"A must have shape (m, {self.dim}), got {tuple(A.shape)}")
        if y.shape != (A.shape[0],):
            raise ValueError(f"y must have shape ({A.shape[0]},), got {tuple(y.shape)}")
        if not noise_std > 0:
            raise ValueError(f"noise_std must be positive, got {noise_std}")
        s2 = noise_std**2
        m = A.shape[0]
        S = A @ self.covs @ A.T + s2 * torch.eye(m, dtype=self.dtype)  # (K, m, m)
        gain = self.covs @ A.T @ torch.linalg.inv(S)  # (K, d, m)
        resid = y - self.means @ A.T  # (K, m)
        post_means = self.means + torch.einsum("kdm,km->kd", gain, resid)
        post_covs = self.covs - gain @ A @ self.covs
        post_covs = 0.5 * (post_covs + post_covs.transpose(-1, -2))
        logw = self.weights.log() + self._component_log_prob(y[None], self.means @ A.T, S)[0]
        return GaussianMixture(torch.softmax(logw, 0), post_means, post_covs, dtype=self.dtype)

    def measurement_log_likelihood(self, x: Tensor, t: Tensor, A, y, noise_std: float) -> Tensor:
        """Exact ``log p(y | x_t = x)`` (b,), differentiable in ``x``.

        ``p(y | x_t) = Σ_k r_k(x) N(y; A E[x_1|x,k], A Cov[x_1|x,k] Aᵀ + σ² I)``. With it the guided
        velocity ``v + ((1 - t) / t) ∇_x log p(y | x_t)`` is the exact posterior velocity (linear path,
        Gaussian source).
        """
        A = torch.as_tensor(A, dtype=self.dtype)
        y = torch.as_tensor(y, dtype=self.dtype).reshape(-1)
        x64 = x.to(self.dtype)
        t = torch.as_tensor(t, dtype=self.dtype)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        r, e_x1, _, C, _ = self._conditionals(x64, t)
        tt = t[:, None, None, None]
        SC = torch.linalg.solve(C, self.covs.expand_as(C))  # C^{-1} Σ
        cov1 = self.covs - tt**2 * (self.covs @ SC)
        m = A.shape[0]
        S = A @ cov1 @ A.T + noise_std**2 * torch.eye(m, dtype=self.dtype)
        S = 0.5 * (S + S.transpose(-1, -2))
        my = e_x1 @ A.T  # (b, K, m)
        diff = y - my
        L = torch.linalg.cholesky(S)
        sol = torch.linalg.solve_triangular(L, diff[..., None], upper=False)[..., 0]
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        comp = -0.5 * (sol**2).sum(-1) - 0.5 * logdet - 0.5 * m * math.log(2 * math.pi)
        return torch.logsumexp(comp + torch.log(r.clamp_min(1e-300)), dim=-1).to(x.dtype)
