"""The exact posterior velocity of a Gaussian-mixture prior: the oracle the other methods are measured against."""
from __future__ import annotations

import torch

from ...paths.affine import AffinePath
from .._common import _At, _number, _Steering, _t0
from ..base import check_path, check_window
from ..operators import AbstractLinearOperator

__all__ = ["ExactPosteriorGuidance"]


class ExactPosteriorGuidance(_Steering):
    """The oracle ``v_y = v + ((1 − t) / t) ∇_x log p(y | x_t)`` for a :class:`GaussianMixture` prior.

    ``log p(y | x_t)`` is exact (``GaussianMixture.measurement_log_likelihood``), so up to discretisation this
    ODE transports ``N(0, I)`` onto the exact posterior. At ``t = 0`` the limit is used:
    ``v_y(x, 0) = E[x_1 | y] − x``. The gradient is analytic and is not counted as a network VJP.

    On an affine path ``x_t = α x_1 + σ x_0`` the factor is ``b_t`` and ``log p(y | x_t = x)`` is the linear
    path's at ``s = α / (α + σ)``, ``x / (α + σ)`` (``x_t / (α + σ)`` is the linear path's ``x_s``); while
    ``α < t_min`` the limit ``v_y = α̇ E[x_1 | y] + σ̇ x / σ`` is used.

    Args: ``mixture`` the prior; ``A`` (m, d) matrix or linear operator on (d,) vectors; ``y`` (m,); ``sigma``;
    ``path`` the path of the velocity (default: the model's, else linear).
    """

    def __init__(self, mixture, A, y, sigma: float, *, t_min: float = 1e-6,
                 path: AffinePath | str | None = None,
                 window: tuple[float, float] = (0.0, 1.0)) -> None:
        self.path = check_path(path)
        self.window = check_window(window)
        if isinstance(A, AbstractLinearOperator):
            A = A.matrix((mixture.dim,))
        A = torch.as_tensor(A, dtype=mixture.dtype)
        y = torch.as_tensor(y, dtype=mixture.dtype).reshape(-1)
        if not torch.isfinite(y).all():
            raise ValueError("the measurement y holds NaN or inf")
        post = mixture.posterior(A, y, sigma)  # checks the shapes of A and y and sigma > 0
        t_min = _number(t_min, "t_min", high=1.0, open_low=True, open_high=True)
        self.mixture, self.A, self.y, self.sigma, self.t_min = mixture, A, y, float(sigma), t_min
        self.posterior_mean = (post.weights[:, None] * post.means).sum(0)

    def guided_velocity(self, v, x, t, dt, *, generator=None, cost=None):
        c = _At.of(self._path_for(v), _t0(t))
        if c.alpha < self.t_min:
            return c.d_alpha * self.posterior_mean.to(x.dtype) + (c.d_sigma / c.sigma) * x
        k = c.alpha + c.sigma
        s = torch.full((x.shape[0],), c.alpha / k, dtype=self.mixture.dtype, device=x.device)
        with torch.enable_grad():
            x_ = x.detach().to(self.mixture.dtype).requires_grad_(True)
            ll = self.mixture.measurement_log_likelihood(x_ / k, s, self.A, self.y, self.sigma)
            (g,) = torch.autograd.grad(ll.sum(), x_)
        return v(x, t) + c.score_factor * g.to(x.dtype)
