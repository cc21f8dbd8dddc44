"""The reflected conditional path of Reflected Flow Matching (Xie et al. 2024, "Reflected Flow Matching", §3).

``y_t = alpha_t x_1 + sigma_t x_0`` is any affine path, ``x_t = R(y_t)`` its fold into a constrained domain
and ``u_t = J_R(y_t) ẏ_t`` the unreflected velocity carried through the fold's Jacobian. The domain (a
:class:`steerflow.manifolds.Box` or :class:`~steerflow.manifolds.Simplex`) supplies ``R`` and ``J_R`` through
``reflect_velocity``; paths sit below the manifolds and domains in the package layers, so this module does not
import them (``steerflow.manifolds.ReflectedPath`` is this class).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .affine import AffinePath, PathSample, get_path


class ReflectedPath:
    """The reflected conditional path of Reflected Flow Matching (Xie et al. 2024, §3).

    ``y_t = alpha_t x_1 + sigma_t x_0`` (any affine path), ``x_t = R(y_t)``,
    ``u_t = J_R(y_t) (d_alpha_t x_1 + d_sigma_t x_0)``: the conditional flow is the reflected ODE, and the
    target velocity is the unreflected one with the reflected components flipped (for a box; the product of
    the billiard's Householder reflections for a simplex). ``x_1`` must lie in the domain; ``x_0`` may be a
    draw of the domain's ``random_source`` (an unfolded Gaussian is folded here, so ``x_{t=0}`` has the domain's
    base distribution).
    """

    def __init__(self, domain: Any, path: str | AffinePath = "linear") -> None:
        if not callable(getattr(domain, "reflect_velocity", None)):
            raise TypeError(f"domain must be a Box or Simplex (steerflow.manifolds), got {type(domain).__name__}")
        self.domain, self.path = domain, get_path(path)

    def __repr__(self) -> str:
        return f"ReflectedPath({self.domain!r}, {self.path!r})"

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        """``PathSample(x_t, u_t, t)`` (b, d) of the reflected path for pairs ``x_0, x_1`` (b, d), ``t`` (b,)."""
        if x_0.shape != x_1.shape:
            raise ValueError(f"x_0 and x_1 must have the same shape, got {tuple(x_0.shape)} and {tuple(x_1.shape)}")
        if t.shape != (x_0.shape[0],):
            raise ValueError(f"t must have shape ({x_0.shape[0]},), got {tuple(t.shape)}")
        c = self.path.coefficients(t, x_0)
        y_t = c.alpha_t * x_1 + c.sigma_t * x_0
        dy_t = c.d_alpha_t * x_1 + c.d_sigma_t * x_0
        x_t, u_t = self.domain.reflect_velocity(y_t, dy_t)
        return PathSample(x_t=x_t, u_t=u_t, t=t, x_0=x_0, x_1=x_1)
