"""Learning and using the conditional means of a multimarginal stochastic interpolant (Albergo et al. 2023).

:class:`ConditionalMeansNet` predicts ``g_k(α, x) = E[x_k | x(α) = x]`` (and ``g_z``) with the identity
``Σ_k α_k g_k + γ(α) g_z = x`` enforced by construction: raw outputs ``h`` are projected onto the affine set
``{g : Σ_k w_k g_k = x}`` with ``w = (α, γ)``, i.e. ``g_k = h_k + (w_k / |w|²) (x - Σ_j w_j h_j)``
(the minimal-norm correction, exact for every input). :func:`train_conditional_means` regresses it on draws
of the interpolant (paper eq. 2.8); :func:`transport` moves samples along any simplex path.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor, nn

from ..paths.multimarginal import AbstractSimplexPath, ConditionalMeans, MultimarginalInterpolant, MultimarginalSample
from ..solvers.sample import sample
from ..training import train
from ..training.loss import AbstractTrainingLoss
from ..training.pairs import seed_from
from ..models.pretrained import PretrainedMixin


class ConditionalMeansNet(PretrainedMixin, nn.Module):
    """MLP on ``[x, α]`` predicting ``K`` (``K + 1`` with a latent) conditional means of dimension ``dim``.

    Saved as ``conditional_means`` (``save_pretrained`` / ``from_pretrained``; the interpolant is stored by its
    ``K`` and ``gamma_scale``).

    Args:
        dim: state dimension (inputs (b, dim)). interpolant: fixes ``K`` and ``γ``.
        hidden, depth: width and number of hidden layers.
    """

    name = "conditional_means"

    def __init__(self, dim: int, interpolant: MultimarginalInterpolant, hidden: int = 128, depth: int = 3) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(interpolant, MultimarginalInterpolant):
            raise TypeError(f"interpolant must be a MultimarginalInterpolant, got {type(interpolant).__name__}")
        self._set_config(dim=dim, interpolant={"K": interpolant.K, "gamma_scale": interpolant.a}, hidden=hidden,
                         depth=depth)
        self.dim, self.interpolant = dim, interpolant
        self.n_out = interpolant.K + (1 if interpolant.latent else 0)
        layers: list[nn.Module] = []
        width = dim + interpolant.K
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, self.n_out * dim))
        self.net = nn.Sequential(*layers)

    @classmethod
    def from_config(cls, config: dict, **children) -> "ConditionalMeansNet":
        if children:
            raise TypeError(f"ConditionalMeansNet takes no {sorted(children)}")
        config = dict(config)
        config["interpolant"] = MultimarginalInterpolant(**config["interpolant"])
        return cls(**config)

    def forward(self, alpha: Tensor, x: Tensor) -> Tensor:
        """``g`` (K[+1], b, dim) with ``Σ_k α_k g_k + γ g_z = x`` exactly."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (b, {self.dim}), got {tuple(x.shape)}")
        h = self.net(torch.cat([x, alpha.to(x)], dim=-1)).reshape(x.shape[0], self.n_out, self.dim).transpose(0, 1)
        w = alpha.to(x)
        if self.interpolant.latent:
            w = torch.cat([w, self.interpolant.gamma(w)[:, None]], dim=-1)        # (b, K+1)
        residual = x - torch.einsum("bk,kbd->bd", w, h)
        return h + (w / w.pow(2).sum(-1, keepdim=True)).T[..., None] * residual


@dataclass(frozen=True)
class ConditionalMeansLoss(AbstractTrainingLoss):
    """:meth:`MultimarginalInterpolant.loss` on a batch that is a draw of the interpolant, as a training loss
    (the draw is moved to the device of the loop's generator)."""

    interpolant: MultimarginalInterpolant

    def __call__(self, model: ConditionalMeans, batch: MultimarginalSample, generator: torch.Generator) -> Tensor:
        dev = generator.device
        batch = replace(batch, x=batch.x.to(dev), alpha=batch.alpha.to(dev), xs=batch.xs.to(dev),
                        z=None if batch.z is None else batch.z.to(dev))
        return self.interpolant.loss(model, batch)


def train_conditional_means(g: nn.Module, interpolant: MultimarginalInterpolant,
                            marginals: Callable[[int, torch.Generator | None], Tensor], *, steps: int = 2000,
                            batch_size: int = 256, lr: float = 1e-3, edge_fraction: float = 0.5,
                            generator: torch.Generator | None = None, log: list | None = None) -> nn.Module:
    """Regress ``g`` on ``Σ_k |ĝ_k(α, x(α)) - x_k|² (+ |ĝ_z - z|²)`` (Albergo et al. 2023, eq. 2.8) by
    :func:`~steerflow.training.train` (Adam at the constant learning rate ``lr``).

    Args:
        marginals: ``(n, generator) -> (K, n, d)``: independent draws of every marginal (a coupling across
            marginals may be used instead; the means are then those of the coupled interpolant).
        generator: seeds the run (one draw; torch's global RNG when None).
        log: a list that receives the loss of every step.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")

    def draw(n: int, gen: torch.Generator) -> MultimarginalSample:
        return interpolant.sample(marginals(n, gen), generator=gen, edge_fraction=edge_fraction)

    p = next(g.parameters(), None)
    res = train(g, draw, loss=ConditionalMeansLoss(interpolant), steps=steps, batch_size=batch_size, lr=lr,
                lr_schedule="constant", seed=seed_from(generator), device=p.device if p is not None else "cpu",
                progress=False, distributed=False)
    if log is not None:
        log.extend(res.losses.tolist())
    g.eval()
    return g


def transport(g: ConditionalMeans, interpolant: MultimarginalInterpolant, x: Tensor, path: AbstractSimplexPath,
              *, steps: int = 50, method: str = "rk4") -> Tensor:
    """Integrate ``dx/ds = Σ_k α̇_k g_k(α(s), x) (+ γ̇ g_z)`` over ``s ∈ [0, 1]`` from samples ``x`` of the
    marginal at ``α(0)`` (b, d); returns samples of the marginal at ``α(1)``."""
    return sample(interpolant.velocity(g, path), x, steps=steps, method=method)


__all__ = ["ConditionalMeansNet", "ConditionalMeansLoss", "train_conditional_means", "transport"]
