"""Networks as tangent vector fields (Chen & Lipman 2024, §3.2)."""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from .base import AbstractManifold


class TangentVelocity(nn.Module):
    """``v_θ(x, t) = P_x f_θ(x, t)``: any network's output projected onto ``T_x M``.

    Chen & Lipman (2024, §3.2) parameterise the vector field on an embedded manifold by an ambient
    network followed by the orthogonal projection onto the tangent space, so the field is tangent by
    construction and the flow stays on ``M``.

    Args:
        model: ``f(inp, t[, cond]) -> (b, D)`` or ``(b, *M.shape)``.
        manifold: the manifold ``M``.
        embed: optional ``x ↦ inp`` fed to the network instead of ``x`` (e.g.
            ``FlatTorus.periodic_features`` so the network is periodic in the angles).
        flatten: feed ``x`` flattened to ``(b, D)`` (default: when ``M.shape`` has several axes, e.g. SO(3)).
    """

    def __init__(self, model: Callable[..., Tensor], manifold: AbstractManifold,
                 embed: Callable[[Tensor], Tensor] | None = None, flatten: bool | None = None) -> None:
        super().__init__()
        if not isinstance(manifold, AbstractManifold):
            raise TypeError(f"manifold must be an AbstractManifold, got {type(manifold).__name__}")
        self.model, self.manifold, self.embed = model, manifold, embed
        self.flatten = len(manifold.shape) > 1 if flatten is None else bool(flatten)

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        inp = self.embed(x) if self.embed is not None else x
        if self.flatten:
            inp = inp.reshape(x.shape[0], -1)
        out = self.model(inp, t) if cond is None else self.model(inp, t, cond)
        if out.numel() != x.numel():
            raise ValueError(f"the network returned shape {tuple(out.shape)}; expected {x.shape[0]} vectors "
                             f"of ambient shape {tuple(self.manifold.shape)}")
        return self.manifold.proju(x, out.reshape(x.shape))

    def extra_repr(self) -> str:
        return f"manifold={self.manifold!r}"
