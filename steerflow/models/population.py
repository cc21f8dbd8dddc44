"""Population-conditioned velocity fields (Atanackovic et al. 2024, "Meta Flow Matching").

Meta Flow Matching learns one vector field ``v(x, t | φ(P_0))`` for a whole family of populations: the
initial population ``P_0 = {x^(1), ..., x^(n)}`` is embedded by a permutation-invariant set encoder ``φ``
(DeepSets, Zaheer et al. 2017: ``φ(P) = ρ(pool_i ψ(x^(i)))`` with mean or attention pooling), and the field
transports ``P_0`` to its own future ``P_1``. It generalises to populations never seen in training, where a
per-population label cannot.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .potential import _time_features
from .pretrained import PretrainedMixin, build_from_spec, model_spec

POOLINGS = ("mean", "attention")


def _mlp(width_in: int, hidden: int, width_out: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    w = width_in
    for _ in range(depth):
        layers += [nn.Linear(w, hidden), nn.SiLU()]
        w = hidden
    layers.append(nn.Linear(w, width_out))
    return nn.Sequential(*layers)


class SetEncoder(PretrainedMixin, nn.Module):
    """Permutation-invariant embedding ``φ(P) = ρ(pool_i ψ(x^(i)))`` of point clouds (P, n, d) → (P, e).

    Args:
        dim: point dimension ``d``. hidden: width of ``ψ`` and ``ρ``. embed_dim: ``e``.
        pooling: ``mean`` (masked mean of ``ψ``) or ``attention`` (``heads`` learned queries attend over the
            points, softmax over the set: ``Σ_i softmax_i(q·k_i/√h) v_i``; invariant because the softmax and the
            sum run over the set).
        depth: hidden layers of ``ψ`` and of ``ρ``.
        moments: also feed ``ρ`` the set's mean and covariance (exact permutation-invariant statistics; the
            population's location and spread then need not be learned through ``ψ``).
    """

    name: ClassVar[str] = "set-encoder"

    def __init__(self, dim: int, hidden: int = 64, embed_dim: int = 32, *, pooling: str = "mean", depth: int = 2,
                 heads: int = 4, moments: bool = True) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {list(POOLINGS)}")
        for name, v in (("dim", dim), ("hidden", hidden), ("embed_dim", embed_dim), ("depth", depth), ("heads", heads)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self._set_config(dim=dim, hidden=hidden, embed_dim=embed_dim, pooling=pooling, depth=depth, heads=heads,
                         moments=bool(moments))
        self.dim, self.embed_dim, self.pooling, self.heads, self.hidden = dim, embed_dim, pooling, heads, hidden
        self.moments = moments
        self.psi = _mlp(dim, hidden, hidden, depth)
        if pooling == "attention":
            self.query = nn.Parameter(torch.randn(heads, hidden) / math.sqrt(hidden))
            self.key = nn.Linear(hidden, hidden)
            self.value = nn.Linear(hidden, hidden)
            pooled = heads * hidden
        else:
            pooled = hidden
        if moments:
            pooled += dim + dim * (dim + 1) // 2
        self.rho = _mlp(pooled, hidden, embed_dim, depth)

    def forward(self, points: Tensor, mask: Tensor | None = None) -> Tensor:
        """``φ(P)`` (P, e) for ``points`` (P, n, d); ``mask`` (P, n) marks real points (padding excluded)."""
        if points.ndim != 3 or points.shape[-1] != self.dim:
            raise ValueError(f"points must have shape (P, n, {self.dim}), got {tuple(points.shape)}")
        if mask is None:
            mask = torch.ones(points.shape[:2], dtype=torch.bool, device=points.device)
        elif mask.shape != points.shape[:2]:
            raise ValueError(f"mask must have shape {tuple(points.shape[:2])}, got {tuple(mask.shape)}")
        h = self.psi(points)                                                   # (P, n, hidden)
        m = mask.to(h.dtype)[..., None]
        if self.pooling == "mean":
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        else:
            k, v = self.key(h), self.value(h)
            logits = torch.einsum("qh,pnh->pqn", self.query, k) / math.sqrt(self.hidden)
            logits = logits.masked_fill(~mask[:, None, :], -math.inf)
            pooled = torch.einsum("pqn,pnh->pqh", logits.softmax(-1), v).reshape(points.shape[0], -1)
        if self.moments:
            count = m.sum(1).clamp_min(1.0)
            mean = (points * m).sum(1) / count
            centred = (points - mean[:, None]) * m
            cov = torch.einsum("pni,pnj->pij", centred, centred) / count[..., None]
            iu = torch.triu_indices(self.dim, self.dim, device=points.device)
            pooled = torch.cat([pooled, mean, cov[:, iu[0], iu[1]]], dim=-1)
        return self.rho(pooled)


def _rows(cond: Tensor, b: int) -> Tensor:
    """Repeat population-level conditions (P, ...) to per-point rows (b, ...), population-major."""
    if cond.shape[0] == b:
        return cond
    if b % cond.shape[0]:
        raise ValueError(f"a batch of {b} points cannot be split evenly over {cond.shape[0]} conditions")
    return cond.repeat_interleave(b // cond.shape[0], dim=0)


class ConditionedVelocityMLP(PretrainedMixin, nn.Module):
    """``v(x, t, c)`` (b, d): an MLP on ``[x, time features, c]`` for a vector condition ``c`` (b, c_dim) or
    (P, c_dim) repeated over ``b / P`` consecutive rows. ``cond_dim = 0`` gives an unconditional field.
    """

    name: ClassVar[str] = "conditioned-mlp"

    def __init__(self, dim: int, cond_dim: int = 0, hidden: int = 128, depth: int = 3, *, n_freq: int = 4) -> None:
        super().__init__()
        if not isinstance(cond_dim, int) or cond_dim < 0:
            raise ValueError(f"cond_dim must be a non-negative integer, got {cond_dim!r}")
        self._set_config(dim=dim, cond_dim=cond_dim, hidden=hidden, depth=depth, n_freq=n_freq)
        self.dim, self.cond_dim, self.n_freq = dim, cond_dim, n_freq
        self.net = _mlp(dim + 1 + 2 * n_freq + cond_dim, hidden, dim, depth)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (b, {self.dim}), got {tuple(x.shape)}")
        parts = [x, _time_features(t, x, self.n_freq)]
        if self.cond_dim:
            if cond is None:
                raise ValueError(f"this field needs a condition of dimension {self.cond_dim}")
            c = _rows(cond.to(x), x.shape[0])
            if c.shape != (x.shape[0], self.cond_dim):
                raise ValueError(f"cond must have shape (b or P, {self.cond_dim}), got {tuple(cond.shape)}")
            parts.append(c)
        return self.net(torch.cat(parts, dim=-1))


class PopulationVelocity(PretrainedMixin, nn.Module):
    """Meta Flow Matching field ``v(x, t | φ(P_0))``: a :class:`SetEncoder` feeding a
    :class:`ConditionedVelocityMLP`.

    ``cond`` is either the initial populations (P, n, d), embedded here and repeated over ``b / P``
    consecutive rows of ``x`` (population-major), or precomputed embeddings (b or P, e) from :meth:`embed`.
    """

    name: ClassVar[str] = "population"

    def __init__(self, encoder: SetEncoder, velocity: ConditionedVelocityMLP) -> None:
        super().__init__()
        if velocity.cond_dim != encoder.embed_dim:
            raise ValueError(f"the velocity's cond_dim ({velocity.cond_dim}) must equal the encoder's "
                             f"embed_dim ({encoder.embed_dim})")
        self.encoder, self.velocity = encoder, velocity

    @property
    def config(self) -> dict[str, Any]:
        """``{"encoder": spec, "velocity": spec}``."""
        return {"encoder": model_spec(self.encoder), "velocity": model_spec(self.velocity)}

    @classmethod
    def from_config(cls, config: dict[str, Any], **children: Any) -> "PopulationVelocity":
        if set(config) != {"encoder", "velocity"}:
            raise TypeError(f"expected the keys ['encoder', 'velocity'], got {sorted(config)}")
        return cls(build_from_spec(config["encoder"], "encoder", **children),
                   build_from_spec(config["velocity"], "velocity", **children))

    @classmethod
    def build(cls, dim: int, *, embed_dim: int = 32, hidden: int = 128, depth: int = 3, pooling: str = "mean",
              encoder_hidden: int = 64) -> "PopulationVelocity":
        """A default encoder + velocity pair for ``dim``-dimensional points."""
        return cls(SetEncoder(dim, encoder_hidden, embed_dim, pooling=pooling),
                   ConditionedVelocityMLP(dim, embed_dim, hidden, depth))

    def embed(self, populations: Tensor, mask: Tensor | None = None) -> Tensor:
        """``φ(P_0)`` (P, e)."""
        return self.encoder(populations, mask)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError("PopulationVelocity needs cond: the initial populations (P, n, d) or embeddings (P, e)")
        emb = self.embed(cond) if cond.ndim == 3 else cond
        return self.velocity(x, t, emb)


__all__ = ["SetEncoder", "ConditionedVelocityMLP", "PopulationVelocity", "POOLINGS"]
