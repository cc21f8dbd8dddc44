"""A network of your own as a steerflow velocity model, saved so that its own code can load the weights."""
from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from .pretrained import PretrainedMixin, load_checked


class ExternalVelocity(PretrainedMixin, nn.Module):
    """``v(x, t, cond) = network(x, time_scale · t[, cond])``: any ``nn.Module`` with steerflow's model signature.

    ``t`` keeps steerflow's convention (``t = 0`` noise, ``t = 1`` data); ``time_scale`` only rescales it for
    networks whose time embedding expects another range (e.g. 1000 for embeddings built for DDPM timesteps).
    ``cond_keyword`` passes ``cond`` as that keyword argument instead of the third positional one (e.g.
    ``"class_labels"``); ``output`` reads that attribute of the network's return value (e.g. ``"sample"`` for a
    diffusers ``UNet2DModel``, whose forward returns an output object).

    ``save_pretrained(dir)`` writes ``model.safetensors`` with the *network's own* ``state_dict`` keys (no
    wrapper prefix), so ``network.load_state_dict(safetensors.torch.load_file(dir + "/model.safetensors"))`` reads
    it in the network's own library; training checkpoints store it the same way. The network's class cannot be
    rebuilt from JSON: ``ExternalVelocity.from_pretrained(dir, network=MyNet(...))`` loads the weights into a
    network you construct (``config.json`` records its class name).

    The trained network follows steerflow's convention (``t = 0`` noise, output ``dx/dt``); a diffusers scheduler
    loop calls it through :func:`steerflow.adapters.diffusers_from_velocity`, where the conventions are converted.
    """

    name: ClassVar[str] = "external"

    def __init__(self, network: nn.Module, *, time_scale: float = 1.0, cond_keyword: str | None = None,
                 output: str | None = None) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
        if isinstance(time_scale, bool) or not isinstance(time_scale, (int, float)) or not time_scale > 0:
            raise ValueError(f"time_scale must be a positive number, got {time_scale!r}")
        for key, val in (("cond_keyword", cond_keyword), ("output", output)):
            if val is not None and not (isinstance(val, str) and val.isidentifier()):
                raise ValueError(f"{key} must be None or an identifier, got {val!r}")
        self.network = network
        self.time_scale, self.cond_keyword, self.output = float(time_scale), cond_keyword, output
        self._set_config(network_class=f"{type(network).__module__}.{type(network).__qualname__}",
                         time_scale=float(time_scale), cond_keyword=cond_keyword, output=output)

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """``x`` (b, *d), ``t`` (b,) -> the network's output (b, *d)."""
        ts = t if self.time_scale == 1.0 else t * self.time_scale
        if cond is None:
            out = self.network(x, ts)
        elif self.cond_keyword is not None:
            out = self.network(x, ts, **{self.cond_keyword: cond})
        else:
            out = self.network(x, ts, cond)
        if self.output is not None:
            out = getattr(out, self.output)
        if not isinstance(out, Tensor):
            raise TypeError(f"{type(self.network).__name__} returned a {type(out).__name__}, not a tensor; "
                            "name the attribute holding the velocity with output= (e.g. output='sample')")
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any], *, network: nn.Module | None = None) -> "ExternalVelocity":
        config = dict(config)
        stored = config.pop("network_class", None)
        if network is None:
            raise ValueError(f"the saved model wraps a network of your own ({stored}); load it with "
                             f"from_pretrained(path, network=<a freshly built {str(stored).rsplit('.', 1)[-1]}>)")
        return cls(network, **config)

    def pretrained_state_dict(self) -> dict[str, Tensor]:
        """The network's own ``state_dict`` (keys without the ``network.`` prefix)."""
        return self.network.state_dict()

    def load_pretrained_state_dict(self, tensors: dict[str, Tensor], what: str = "weights") -> None:
        load_checked(self.network, tensors, what)


__all__ = ["ExternalVelocity"]
