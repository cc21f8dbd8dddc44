"""Networks as tangent vector fields (Chen & Lipman 2024, §3.2)."""
from __future__ import annotations

from typing import Any, Callable, ClassVar

from torch import Tensor, nn

from ..models.pretrained import PretrainedMixin, build_from_spec, model_spec
from .base import AbstractManifold

EMBEDS = ("periodic",)
"""Input features a network may see instead of raw coordinates, by name: ``"periodic"`` is
``manifold.periodic_features`` (``cos θ, sin θ`` of a torus's angles)."""


class TangentVelocity(PretrainedMixin, nn.Module):
    """``v_θ(x, t) = P_x f_θ(x, t)``: any network's output projected onto ``T_x M``.

    Chen & Lipman (2024, §3.2) parameterise the vector field on an embedded manifold by an ambient
    network followed by the orthogonal projection onto the tangent space, so the field is tangent by
    construction and the flow stays on ``M``.

    Args:
        model: ``f(inp, t[, cond]) -> (b, D)`` or ``(b, *M.shape)``.
        manifold: the manifold ``M``.
        embed: optional ``x ↦ inp`` fed to the network instead of ``x``: ``"periodic"`` (or
            ``M.periodic_features``) so that the network is periodic in a torus's angles, or any callable.
        flatten: feed ``x`` flattened to ``(b, D)`` (default: when ``M.shape`` has several axes, e.g. SO(3)).

    Saved (``save_pretrained``) as the network's spec, the manifold's spec name (``"sphere2"``) and the embed's
    name; a callable embed other than ``"periodic"`` cannot be saved.
    """

    name: ClassVar[str] = "tangent"

    def __init__(self, model: Callable[..., Tensor], manifold: AbstractManifold,
                 embed: str | Callable[[Tensor], Tensor] | None = None, flatten: bool | None = None) -> None:
        super().__init__()
        if not isinstance(manifold, AbstractManifold):
            raise TypeError(f"manifold must be an AbstractManifold, got {type(manifold).__name__}")
        self.embed_name: str | None = None
        if isinstance(embed, str):
            if embed not in EMBEDS:
                raise ValueError(f"unknown embed {embed!r}; expected one of {list(EMBEDS)} or a callable")
            if not hasattr(manifold, "periodic_features"):
                raise ValueError(f"embed 'periodic' needs a torus (or a product with a torus factor), got "
                                 f"{manifold.name}")
            self.embed_name, embed = embed, manifold.periodic_features
        elif embed is not None and _is_periodic_features(embed, manifold):
            self.embed_name = "periodic"
        elif embed is not None and not callable(embed):
            raise TypeError(f"embed must be None, 'periodic' or a callable, got {type(embed).__name__}")
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

    @property
    def config(self) -> dict[str, Any]:
        """``{"model": spec, "manifold": "sphere2", "embed": None | "periodic", "flatten": bool}``."""
        if self.embed is not None and self.embed_name is None:
            raise TypeError(f"the embed {self.embed!r} cannot be saved; use embed='periodic' or None")
        return {"model": model_spec(self.model), "manifold": manifold_spec(self.manifold),
                "embed": self.embed_name, "flatten": self.flatten}

    @classmethod
    def from_config(cls, config: dict[str, Any], **children: Any) -> "TangentVelocity":
        from .registry import get_manifold

        config = dict(config)
        model = build_from_spec(config.pop("model", None), "model", **children)
        spec = config.pop("manifold", None)
        if not isinstance(spec, str):
            raise TypeError(f"manifold must be a spec string such as 'sphere2', got {spec!r}")
        return cls(model, get_manifold(spec), **config)

    def extra_repr(self) -> str:
        return f"manifold={self.manifold!r}" + (f", embed={self.embed_name!r}" if self.embed_name else "")


def manifold_spec(manifold: AbstractManifold) -> str:
    """The spec name that :func:`~steerflow.manifolds.get_manifold` rebuilds ``manifold`` from (``"sphere2"``);
    ``TypeError`` for a manifold with settings its name does not carry (e.g. a hyperbolic base scale)."""
    from .registry import get_manifold

    name = getattr(manifold, "name", None)
    try:
        rebuilt = get_manifold(name) if isinstance(name, str) else None
    except (ValueError, TypeError):
        rebuilt = None
    if rebuilt is None or _settings(rebuilt) != _settings(manifold):
        raise TypeError(f"the manifold {manifold!r} cannot be saved by its spec name {name!r}")
    return name


def _settings(m: Any) -> Any:
    """A manifold's type and scalar settings, factors included: what its spec must reproduce."""
    plain = {k: v for k, v in vars(m).items() if _is_plain(v)}
    factors = getattr(m, "factors", None)
    return type(m), plain, [_settings(f) for f in factors] if isinstance(factors, (list, tuple)) else None


def _is_plain(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return all(map(_is_plain, v))
    return isinstance(v, (bool, int, float, str, slice)) or v is None


def _is_periodic_features(embed: Any, manifold: AbstractManifold) -> bool:
    """Whether ``embed`` is ``periodic_features`` of ``manifold`` (or of a manifold with the same settings)."""
    owner = getattr(embed, "__self__", None)
    return (getattr(embed, "__name__", None) == "periodic_features" and owner is not None
            and hasattr(manifold, "periodic_features") and _settings(owner) == _settings(manifold))


def network_embed(manifold: AbstractManifold) -> str | None:
    """The input features ``steerflow train --manifold`` gives its network: ``"periodic"`` (``cos θ, sin θ``,
    :meth:`FlatTorus.periodic_features`) on a torus or a product with a torus factor, whose raw angles jump by 2π
    at the seam; None (the ambient coordinates, continuous already) elsewhere."""
    from .product import Product
    from .torus import FlatTorus

    def has_torus(m) -> bool:
        return isinstance(m, FlatTorus) or (isinstance(m, Product) and any(map(has_torus, m.factors)))

    return "periodic" if has_torus(manifold) else None


def build_manifold_model(manifold: AbstractManifold, network: dict[str, Any]) -> TangentVelocity:
    """``TangentVelocity(build_model(network["name"], **network["config"]), manifold, embed=...)``; ``network``'s
    optional ``"embed"`` (``"periodic"``) names the input features (runs without it saw raw coordinates)."""
    from ..models import build_model

    embed = network.get("embed")
    if embed not in (None, *EMBEDS):
        raise ValueError(f"unknown network embed {embed!r}; expected one of {list(EMBEDS)}")
    if embed == "periodic" and not hasattr(manifold, "periodic_features"):
        raise ValueError(f"network embed 'periodic' needs a torus, got {manifold.name}")
    return TangentVelocity(build_model(network["name"], **network["config"]), manifold, embed=embed)


__all__ = ["TangentVelocity", "EMBEDS", "manifold_spec", "network_embed", "build_manifold_model"]
