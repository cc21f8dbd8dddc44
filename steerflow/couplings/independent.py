"""The independent coupling ``π = μ_0 ⊗ μ_1`` (I-CFM; Lipman et al. 2023, Liu et al. 2022)."""
from __future__ import annotations

import torch

from .base import AbstractIndexCoupling, _random_device


class Independent(AbstractIndexCoupling):
    """Keep the batch as drawn: ``(x_0, x_1)`` with ``x_0 ⟂ x_1`` (identity pairing ``σ = id``).

    Args:
        shuffle: re-order ``x_0`` by a uniformly random permutation drawn with the generator (useful when
            ``x_0`` was not drawn independently of ``x_1``'s order).
    """

    def __init__(self, *, shuffle: bool = False) -> None:
        self.shuffle = bool(shuffle)

    def __repr__(self) -> str:
        return f"Independent(shuffle={self.shuffle})"

    def _indices(self, x_0, x_1, labels, generator):
        b = x_0.shape[0]
        if not self.shuffle:
            return torch.arange(b, device=x_0.device)
        return torch.randperm(b, generator=generator, device=_random_device(generator, x_0.device)).to(x_0.device)
