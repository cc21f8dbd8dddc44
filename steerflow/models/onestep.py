"""The one-step generator of a distilled velocity network (Liu et al. 2022, §2.3)."""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from .pretrained import PretrainedMixin, build_from_spec, model_spec


def one_step(v: Callable[..., Tensor], x_0: Tensor) -> Tensor:
    """``x_0 + v(x_0, 0)`` (b, *d): one Euler step of size 1 from ``t = 0``."""
    return x_0 + v(x_0, torch.zeros(x_0.shape[0], dtype=x_0.dtype, device=x_0.device))


class OneStep(PretrainedMixin, nn.Module):
    """The one-step generator ``T(x_0) = x_0 + v(x_0, 0)`` of a distilled velocity network ``v``.

    Saved (``save_pretrained``) as the student's spec; its weights keep the ``v.`` prefix of this module.
    """

    name: ClassVar[str] = "one-step"

    def __init__(self, v: nn.Module) -> None:
        super().__init__()
        self.v = v

    def forward(self, x_0: Tensor) -> Tensor:
        return one_step(self.v, x_0)

    @property
    def config(self) -> dict[str, Any]:
        """``{"v": spec}`` of the student network."""
        return {"v": model_spec(self.v)}

    @classmethod
    def from_config(cls, config: dict[str, Any], **children: Any) -> "OneStep":
        if set(config) != {"v"}:
            raise TypeError(f"expected the key ['v'], got {sorted(config)}")
        return cls(build_from_spec(config["v"], "v", **children))


__all__ = ["OneStep", "one_step"]
