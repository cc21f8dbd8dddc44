"""Geodesic conditional paths on a manifold (Chen & Lipman 2024, "Flow Matching on General Geometries").

For a simple manifold (closed-form geodesics) Riemannian Flow Matching uses the premetric
``d(x, x_1)`` with scheduler ``κ(t) = 1 - t``; its conditional flow is the constant-speed geodesic

    ``x_t = exp_{x_0}(t log_{x_0} x_1)``,                                   (Chen & Lipman 2024, eq. 13)
    ``u_t = d/dt x_t = Γ_{0→t} log_{x_0} x_1 = log_{x_t}(x_1) / (1 - t)``,

the parallel transport of the initial velocity along the geodesic, which equals the closed form above
for ``t < 1``. Each manifold computes ``d/dt x_t`` in closed form (``Sⁿ``: ``-|u| sin(t|u|) x_0 +
cos(t|u|) u``; ``Hⁿ``: ``|u| sinh(t|u|) x_0 + cosh(t|u|) u``; ``SO(3)``: ``x_t Ω``; flat spaces: ``u``),
avoiding the division by ``1 - t``. The loss is the metric norm ``|v_θ(x_t, t) - u_t|²_{x_t}``.
On ``Euclidean(d)`` this is exactly :class:`~steerflow.paths.LinearPath`.

The manifold is any object with the interface of :class:`steerflow.manifolds.AbstractManifold` that this path
uses (``shape``, ``name``, ``geodesic``, ``inner``, ``expmap``): paths sit below the manifolds in the package
layers, so this module does not import them.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .._types import expand_t
from .affine import PathSample

_MANIFOLD_METHODS = ("geodesic", "inner", "expmap")


def _check_manifold(manifold: Any) -> None:
    """Refuse anything that is not a manifold (a name, a domain, ...) with a ``TypeError``."""
    ok = hasattr(manifold, "shape") and hasattr(manifold, "name") and all(
        callable(getattr(manifold, m, None)) for m in _MANIFOLD_METHODS)
    if not ok:
        raise TypeError(f"GeodesicPath needs a manifold (a steerflow.manifolds.AbstractManifold such as Sphere(2)), "
                        f"got {type(manifold).__name__}")


class GeodesicPath:
    """``x_t = exp_{x_0}(t log_{x_0} x_1)``, ``u_t = d/dt x_t`` on ``manifold``; same interface as ``LinearPath``.

    ``x_0, x_1`` are points of shape ``(b, *manifold.shape)``, ``t`` is (b,).
    """

    def __init__(self, manifold: Any) -> None:
        _check_manifold(manifold)
        self.manifold = manifold

    def __repr__(self) -> str:
        return f"GeodesicPath({self.manifold!r})"

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        """Return ``PathSample(x_t, u_t, t, x_0, x_1)`` along the minimising geodesic."""
        if x_0.shape != x_1.shape:
            raise ValueError(f"x_0 and x_1 must have the same shape, got {tuple(x_0.shape)} and {tuple(x_1.shape)}")
        if tuple(x_0.shape[1:]) != tuple(self.manifold.shape):
            shape = ", ".join(map(str, self.manifold.shape))
            raise ValueError(f"points on {self.manifold.name} must have shape (b, {shape}), got {tuple(x_0.shape)}")
        if t.shape != (x_0.shape[0],):
            raise ValueError(f"t must have shape ({x_0.shape[0]},), got {tuple(t.shape)}")
        x_t, u_t = self.manifold.geodesic(x_0, x_1, t)
        return PathSample(x_t=x_t, u_t=u_t, t=t, x_0=x_0, x_1=x_1)

    def sq_norm(self, x_t: Tensor, w: Tensor) -> Tensor:
        """``⟨w, w⟩_{x_t}`` (b,): the metric squared norm used by the Riemannian FM loss."""
        return self.manifold.inner(x_t, w, w)

    def x1_from_velocity(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Data prediction ``x̂_1 = exp_{x_t}((1 - t) v)`` (exact for the conditional geodesic field)."""
        return self.manifold.expmap(x_t, (1 - expand_t(t, x_t)) * v)

    def x0_from_velocity(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Source prediction ``x̂_0 = exp_{x_t}(-t v)``."""
        return self.manifold.expmap(x_t, -expand_t(t, x_t) * v)
