"""Multilayer-perceptron velocity fields for low-dimensional data."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from .._types import expand_t
from .base import AbstractVelocityModel, LabelEmbedding, SinusoidalTimeEmbedding, check_time, get_activation


class MLPVelocity(AbstractVelocityModel):
    """``v_θ(x, t, y) = MLP([x, φ(t), e(y)])`` for states of shape (b, dim) (or (b, *d) with ``prod d = dim``).

    ``φ`` is the sinusoidal time embedding (:class:`SinusoidalTimeEmbedding`, width ``time_embed_dim``),
    ``e`` the optional class embedding with a null token (``n_classes`` set; ``cond=None`` is the null
    class, and ``label_dropout`` drops labels during training for classifier-free guidance).
    ``depth`` hidden layers of width ``hidden`` with ``activation``; linear output of size ``dim``.
    ``in_dim`` (default ``dim``) is the width of the input features when they differ from the output, e.g. the
    ``(cos θ, sin θ)`` features of angles on a torus; the output is then ``(b, dim)``.
    """

    name: ClassVar[str] = "mlp"

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, time_embed_dim: int = 64,
                 activation: str = "silu", n_classes: int | None = None, label_dropout: float = 0.0,
                 in_dim: int | None = None) -> None:
        super().__init__()
        in_width = dim if in_dim is None else in_dim
        for key, val in (("dim", dim), ("hidden", hidden), ("depth", depth), ("in_dim", in_width)):
            if not (isinstance(val, int) and val >= 1):
                raise ValueError(f"{key} must be a positive int, got {val!r}")
        self._set_config(dim=dim, hidden=hidden, depth=depth, time_embed_dim=time_embed_dim,
                         activation=activation, n_classes=n_classes, label_dropout=label_dropout,
                         **({} if in_dim is None else {"in_dim": in_dim}))  # (older configs have no in_dim)
        self.dim = dim
        self.in_dim = in_width
        self.time_embed = SinusoidalTimeEmbedding(time_embed_dim)
        self.label_embed = (LabelEmbedding(n_classes, time_embed_dim, label_dropout)
                            if n_classes is not None else None)
        width_in = self.in_dim + time_embed_dim * (2 if n_classes is not None else 1)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(width_in if i == 0 else hidden, hidden), get_activation(activation)]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def zero_output_(self) -> MLPVelocity:
        """Zero the weights and bias of the output layer, in place: ``v_θ ≡ 0`` until trained (the flow is the
        identity, its density the source's), while the hidden layers keep their initialisation so the first
        gradient step reaches the output layer. Returns ``self``."""
        with torch.no_grad():
            self.net[-1].weight.zero_()
            self.net[-1].bias.zero_()
        return self

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x`` (b, dim) or (b, *d), ``t`` (b,), ``cond`` (b,) integer labels or None -> (b, *d)
        (with ``in_dim``: ``x`` (b, in_dim) -> (b, dim))."""
        shape = x.shape
        h = x.reshape(shape[0], -1)
        if h.shape[1] != self.in_dim:
            size = f"dim={self.dim}" if self.in_dim == self.dim else f"in_dim={self.in_dim}"
            raise ValueError(f"MLPVelocity({size}) got x of shape {tuple(shape)}")
        if self.in_dim != self.dim:
            shape = (shape[0], self.dim)
        t = check_time(t, x)
        feats = [h, self.time_embed(t).to(h.dtype)]
        if self.label_embed is not None:
            feats.append(self.label_embed(cond, shape[0], x.device).to(h.dtype))
        elif cond is not None:
            raise ValueError("cond was given but the model was built with n_classes=None")
        return self.net(torch.cat(feats, dim=-1)).reshape(shape)


class SeluMLP(AbstractVelocityModel):
    """torchcfm's benchmark network: ``MLP([x, t])``, three hidden layers of ``width`` with SELU.

    Same layer sequence and parameter order as ``torchcfm.models.models.MLP(dim, w=width,
    time_varying=True)`` (Tong et al. 2024), so a shared seed gives identical weights: used for parity
    benchmarks against torchcfm and flow_matching. Unconditional.
    """

    name: ClassVar[str] = "mlp-selu"

    def __init__(self, dim: int, width: int = 64) -> None:
        super().__init__()
        if not (isinstance(dim, int) and dim >= 1 and isinstance(width, int) and width >= 1):
            raise ValueError(f"dim and width must be positive ints, got dim={dim!r}, width={width!r}")
        self._set_config(dim=dim, width=width)
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.SELU(), nn.Linear(width, width), nn.SELU(),
                                 nn.Linear(width, width), nn.SELU(), nn.Linear(width, dim))

    @property
    def event_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x`` (b, dim), ``t`` (b,) -> (b, dim)."""
        if cond is not None:
            raise ValueError("SeluMLP is unconditional; got cond")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"SeluMLP(dim={self.dim}) expects x of shape (b, {self.dim}), got {tuple(x.shape)}")
        if t.shape != x.shape[:1]:  # the common case skips the full check (this net is benchmarked)
            t = check_time(t, x)
        t = t[:, None] if t.dtype == x.dtype else t[:, None].to(x.dtype)
        return self.net(torch.cat([x, t], dim=-1))


class EndpointMLP(MLPVelocity):
    """A velocity network that predicts the end point: ``x̂₁(x, t) = MLP([x, φ(t), e(y)])`` and
    ``v(x, t) = (x̂₁(x, t) − x) / (1 − t)``, the linear path's velocity towards that prediction.

    One Euler step from ``t`` lands exactly on ``x̂₁(x, t)``, so as a one-step generator (a distillation
    student, ``x_0 + v(x_0, 0) = x̂₁(x_0, 0)``) the map has no identity skip: a velocity MLP's map
    ``x_0 + MLP(x_0)`` must learn to cancel the identity, and where it does not — the source's tails, seldom
    seen in training — its samples stick out past the data. With ``bounded=True`` the last hidden layer is
    ``tanh``, so ``x̂₁`` stays in a bounded set (the image of a cube under the linear head) wherever ``x``
    goes: right for data with compact support (the two moons), wrong for heavy-tailed data.

    ``1 − t`` is clamped at ``min_remaining`` so that ``t = 1`` (a solver's last stage) gives a finite
    velocity. Same arguments as :class:`MLPVelocity` otherwise.
    """

    name: ClassVar[str] = "mlp-endpoint"

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, time_embed_dim: int = 64,
                 activation: str = "silu", n_classes: int | None = None, label_dropout: float = 0.0,
                 bounded: bool = False, min_remaining: float = 1e-3) -> None:
        super().__init__(dim, hidden, depth, time_embed_dim, activation, n_classes, label_dropout)
        if not isinstance(bounded, bool):
            raise ValueError(f"bounded must be a bool, got {bounded!r}")
        if not (isinstance(min_remaining, (int, float)) and 0 < min_remaining < 1):
            raise ValueError(f"min_remaining must lie in (0, 1), got {min_remaining!r}")
        self._set_config(**self._config, bounded=bounded, min_remaining=float(min_remaining))
        self.min_remaining = float(min_remaining)
        if bounded:
            self.net[-2] = nn.Tanh()  # the activation of the last hidden layer

    def endpoint(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The network's prediction ``x̂₁(x, t)`` (same shape as ``x``)."""
        return super().forward(x, t, cond)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x`` (b, dim) or (b, *d), ``t`` (b,), ``cond`` (b,) or None -> ``(x̂₁ − x) / (1 − t)`` (b, *d)."""
        x1 = self.endpoint(x, t, cond)
        t = check_time(t, x)
        return (x1 - x) / expand_t((1.0 - t).clamp_min(self.min_remaining).to(x.dtype), x)
