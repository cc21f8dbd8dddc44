"""The contract every steerflow network follows, and the embeddings they share.

A velocity model is an ``nn.Module`` with ``forward(x, t, cond=None) -> v`` where ``x`` is (b, *d),
``t`` is (b,) in ``[0, 1]`` (``t = 0`` noise, ``t = 1`` data) and ``v`` has the shape of ``x``. It carries
``name`` (its key in :data:`steerflow.models.MODELS`) and ``config`` (a JSON-able dict) so that
``build_model(model.name, **model.config)`` rebuilds the same architecture — the contract that lets
checkpoints store weights and a config, never a pickled module.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from .pretrained import PretrainedMixin


class AbstractVelocityModel(PretrainedMixin, nn.Module, ABC):
    """Abstract base: concrete subclasses set ``name`` and call ``_set_config`` in ``__init__``
    (``save_pretrained`` / ``from_pretrained`` come from :class:`~steerflow.models.pretrained.PretrainedMixin`)."""

    name: ClassVar[str] = "abstract"

    @property
    @abstractmethod
    def event_shape(self) -> tuple[int, ...]:
        """Shape ``d`` of one state; noise for sampling is ``torch.randn(b, *event_shape)``."""

    @abstractmethod
    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor: ...


def check_time(t: Tensor, x: Tensor) -> Tensor:
    """Validate ``t`` against the batch of ``x``; a scalar is broadcast to (b,)."""
    if not torch.is_tensor(t):
        raise TypeError(f"t must be a tensor of shape (b,), got {type(t).__name__}")
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape ({x.shape[0]},) to match x {tuple(x.shape)}, got {tuple(t.shape)}")
    return t


class SinusoidalTimeEmbedding(nn.Module):
    """Fixed sinusoidal features of ``t`` (Vaswani et al. 2017; DDPM, Ho et al. 2020).

    ``φ(t) = [cos(s t ω_k), sin(s t ω_k)]_k`` with ``ω_k = max_period^(-k / (D/2))``, ``k = 0..D/2-1``
    and ``s = 1000`` so that ``t ∈ [0, 1]`` spans the frequencies the DDPM embedding was designed for.
    ``t`` (b,) -> (b, D).
    """

    def __init__(self, dim: int, *, scale: float = 1000.0, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"time embedding dim must be an even integer >= 2, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs * scale, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        args = t.to(self.freqs.dtype)[:, None] * self.freqs
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LabelEmbedding(nn.Module):
    """Class embedding with a null token for classifier-free guidance (Ho & Salimans 2022).

    Index ``n_classes`` is the null class. During training each label is replaced by the null class
    with probability ``dropout`` (torch's global RNG; the trainer seeds and checkpoints it); ``cond=None``
    means "unconditional" and embeds the null class for the whole batch.
    """

    def __init__(self, n_classes: int, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(n_classes, int) and n_classes >= 1):
            raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"label dropout must lie in [0, 1), got {dropout}")
        self.n_classes, self.dropout = n_classes, dropout
        self.table = nn.Embedding(n_classes + 1, dim)

    @property
    def null_index(self) -> int:
        return self.n_classes

    def forward(self, cond: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if cond is None:
            labels = torch.full((batch,), self.n_classes, dtype=torch.long, device=device)
        else:
            if not torch.is_tensor(cond) or cond.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise TypeError(f"cond must be an integer label tensor of shape ({batch},), got "
                                f"{getattr(cond, 'dtype', type(cond).__name__)}")
            if cond.shape != (batch,):
                raise ValueError(f"cond must have shape ({batch},), got {tuple(cond.shape)}")
            labels = cond.to(device=device, dtype=torch.long)
            if self.training and self.dropout > 0:
                drop = torch.rand(batch, device=device) < self.dropout
                labels = torch.where(drop, torch.full_like(labels, self.n_classes), labels)
        return self.table(labels)


ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "selu": nn.SELU, "tanh": nn.Tanh,
               "softplus": nn.Softplus, "elu": nn.ELU}


def get_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()
