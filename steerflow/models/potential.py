"""Conservative velocity fields ``v = ∇_x f(x, t)`` (optionally ``v = ∇c*(∇_x f)``) and scalar potentials.

* :class:`PotentialVelocity` turns any scalar potential ``f(x, t) -> (b,)`` into a velocity model with the
  ``(x, t, cond=None)`` signature of steerflow models, by autograd. With a link ``∇c*`` (the gradient of
  the convex conjugate of a cost ``c``) it is the *c-conservative* field of Liu 2022, "Rectified Flow: A
  Marginal Preserving Approach to Optimal Transport", eq. (8): ``v = ∇c*(∇f)``.
* :class:`ICNN` is an input-convex network (Amos, Xu & Kolter 2017, "Input Convex Neural Networks"):
  ``z_1 = σ(W_0 x + b_0(t))``, ``z_{l+1} = σ(W^z_l z_l + W^x_l x + b_l(t))``, ``f = w^zᵀ z_L + w^xᵀ x +
  b_L(t) + (μ/2)|x|²`` with ``W^z_l ≥ 0`` (softplus-parameterised) and ``σ`` convex non-decreasing
  (softplus), so ``f(·, t)`` is convex for every ``t`` and ``∇f`` is a monotone map (Brenier's form).
* :class:`PotentialMLP` is an unconstrained scalar MLP; :class:`QuadraticPotential` is
  ``f = ½ xᵀ S(t) x + b(t)ᵀ x`` (the exact family for Gaussian-to-Gaussian transport).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .pretrained import PretrainedMixin, build_from_spec, model_spec


def _time_features(t: Tensor, x: Tensor, n_freq: int) -> Tensor:
    """``[t, sin(2^k π t), cos(2^k π t)]_{k<n_freq}`` of shape (b, 1 + 2 n_freq)."""
    if not torch.is_tensor(t):
        t = torch.tensor(float(t))
    t = t.to(dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    t = t[:, None]
    if n_freq == 0:
        return t
    k = (2.0 ** torch.arange(n_freq, dtype=x.dtype, device=x.device)) * math.pi
    return torch.cat([t, torch.sin(k * t), torch.cos(k * t)], dim=-1)


def _check_dims(dim: int, hidden: int, depth: int) -> None:
    for name, v, lo in (("dim", dim, 1), ("hidden", hidden, 1), ("depth", depth, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an integer ≥ {lo}, got {v!r}")


class PotentialMLP(PretrainedMixin, nn.Module):
    """Scalar potential ``f(x, t)`` (b,): an MLP on ``[x, time features]`` with smooth activations.

    Args:
        dim: flattened state dimension. hidden, depth: width and number of hidden layers.
        activation: ``softplus`` or ``silu`` (smooth, so ``∇f`` is Lipschitz and ``∇∇f`` exists).
        n_freq: sinusoidal time frequencies.
    """

    name: ClassVar[str] = "potential-mlp"

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, *, activation: str = "silu",
                 n_freq: int = 4) -> None:
        super().__init__()
        _check_dims(dim, hidden, depth)
        acts = {"softplus": nn.Softplus, "silu": nn.SiLU}
        if activation not in acts:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(acts)}")
        self._set_config(dim=dim, hidden=hidden, depth=depth, activation=activation, n_freq=n_freq)
        self.dim, self.n_freq = dim, n_freq
        layers: list[nn.Module] = []
        width = dim + 1 + 2 * n_freq
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), acts[activation]()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        xf = x.reshape(x.shape[0], -1)
        if xf.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim} features per sample, got {xf.shape[1]}")
        return self.net(torch.cat([xf, _time_features(t, xf, self.n_freq)], dim=-1)).squeeze(-1)


class QuadraticPotential(PretrainedMixin, nn.Module):
    """``f(x, t) = ½ xᵀ S(t) x + b(t)ᵀ x`` with ``S(t) = (M(t) + M(t)ᵀ)/2``; ``M, b`` from an MLP in ``t``.

    ``∇f = S(t) x + b(t)`` is every affine gradient field, the exact family of conservative flows between
    Gaussians (their Brenier maps are affine with symmetric positive-definite slope).
    """

    name: ClassVar[str] = "quadratic-potential"

    def __init__(self, dim: int, hidden: int = 32, depth: int = 2, *, n_freq: int = 2) -> None:
        super().__init__()
        _check_dims(dim, hidden, depth)
        self._set_config(dim=dim, hidden=hidden, depth=depth, n_freq=n_freq)
        self.dim, self.n_freq = dim, n_freq
        layers: list[nn.Module] = []
        width = 1 + 2 * n_freq
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        out = nn.Linear(width, dim * dim + dim)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        layers.append(out)
        self.net = nn.Sequential(*layers)

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``S(t)`` (b, d, d) and ``b(t)`` (b, d)."""
        h = self.net(_time_features(t, like, self.n_freq))
        M = h[:, : self.dim * self.dim].reshape(-1, self.dim, self.dim)
        return 0.5 * (M + M.transpose(-1, -2)), h[:, self.dim * self.dim:]

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        xf = x.reshape(x.shape[0], -1)
        if xf.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim} features per sample, got {xf.shape[1]}")
        S, b = self.coefficients(t, xf)
        return 0.5 * torch.einsum("bi,bij,bj->b", xf, S, xf) + (b * xf).sum(-1)


class ICNN(PretrainedMixin, nn.Module):
    """Input-convex neural network ``f(x, t)`` (b,), convex in ``x`` for every ``t`` (Amos et al. 2017).

    Convexity: each ``z_{l+1}`` is a convex non-decreasing function (softplus) of a non-negative combination
    of convex functions plus an affine function of ``x``; ``t`` enters only through the biases ``b_l(t)``.

    Args:
        dim: flattened state dimension. hidden, depth: width and number of convex layers (≥ 1).
        strong_convexity: ``μ ≥ 0``; adds ``(μ/2)|x|²`` so ``∇f`` is ``μ``-strongly monotone.
        time: whether biases depend on ``t`` (``False``: a static convex potential ``f(x)``; ``t`` ignored).
    """

    name: ClassVar[str] = "icnn"

    def __init__(self, dim: int, hidden: int = 64, depth: int = 3, *, strong_convexity: float = 0.0,
                 time: bool = True, n_freq: int = 2) -> None:
        super().__init__()
        _check_dims(dim, hidden, depth)
        if strong_convexity < 0:
            raise ValueError(f"strong_convexity must be ≥ 0, got {strong_convexity}")
        self._set_config(dim=dim, hidden=hidden, depth=depth, strong_convexity=float(strong_convexity),
                         time=bool(time), n_freq=n_freq)
        self.dim, self.depth, self.mu, self.time, self.n_freq = dim, depth, float(strong_convexity), time, n_freq
        self.Wx = nn.ModuleList([nn.Linear(dim, hidden, bias=False) for _ in range(depth)]
                                + [nn.Linear(dim, 1, bias=False)])
        # Raw parameters of the non-negative z-path weights W^z = softplus(raw).
        init = math.log(math.expm1(1.0 / hidden))
        self.Wz_raw = nn.ParameterList([nn.Parameter(init + 0.1 * torch.randn(hidden, hidden)) for _ in range(depth - 1)]
                                       + [nn.Parameter(init + 0.1 * torch.randn(1, hidden))])
        tf = 1 + 2 * n_freq
        self.bias = nn.Linear(tf, depth * hidden + 1) if time else None
        self.bias_static = nn.Parameter(torch.zeros(depth * hidden + 1))
        self.hidden = hidden

    def _biases(self, t: Tensor | None, xf: Tensor) -> list[Tensor]:
        b = self.bias_static.expand(xf.shape[0], -1)
        if self.bias is not None:
            if t is None:
                raise ValueError("this ICNN depends on time; call it as f(x, t)")
            b = b + self.bias(_time_features(t, xf, self.n_freq))
        h = self.hidden
        return [b[:, l * h:(l + 1) * h] for l in range(self.depth)] + [b[:, -1]]

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        xf = x.reshape(x.shape[0], -1)
        if xf.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim} features per sample, got {xf.shape[1]}")
        bs = self._biases(t, xf)
        z = F.softplus(self.Wx[0](xf) + bs[0])
        for l in range(1, self.depth):
            z = F.softplus(F.linear(z, F.softplus(self.Wz_raw[l - 1])) + self.Wx[l](xf) + bs[l])
        f = F.linear(z, F.softplus(self.Wz_raw[-1])).squeeze(-1) + self.Wx[-1](xf).squeeze(-1) + bs[-1]
        if self.mu > 0:
            f = f + 0.5 * self.mu * xf.pow(2).sum(-1)
        return f


class PotentialVelocity(PretrainedMixin, nn.Module):
    """Velocity model ``v(x, t) = link(∇_x f(x, t))`` from a scalar potential ``f`` (b,).

    ``link`` is the identity (a gradient field, e.g. ``∇`` of an :class:`ICNN`) or the gradient of a cost's
    convex conjugate ``∇c*`` (Liu 2022, eq. 8: the c-conservative field; see
    :mod:`steerflow.transport.crectified`). The gradient is built with ``create_graph=True`` whenever
    gradients are enabled and the module is training or ``x`` itself requires grad, so training through
    :func:`steerflow.training.train` (and guidance that differentiates through ``v``) works; in eval mode
    without ``x.requires_grad`` the result is detached, so sampling does not grow a graph.

    Args:
        potential: ``f(x, t) -> (b,)`` or ``(b, 1)``; called as ``f(x, t, cond)`` when ``cond`` is given.
        link: map applied to ``∇f`` (elementwise or vector), default identity. A cost's ``grad_conjugate``
            (:mod:`steerflow.transport.costs`) is saved by the cost's name and options; loading asks for it
            again (``from_pretrained(dir, link=cost.grad_conjugate)``), since costs live above the models.
    """

    name: ClassVar[str] = "potential-velocity"

    def __init__(self, potential: nn.Module | Callable[..., Tensor],
                 link: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        if not callable(potential):
            raise TypeError(f"potential must be callable f(x, t) -> (b,), got {type(potential).__name__}")
        self.potential = potential
        self.link = link

    @property
    def config(self) -> dict[str, Any]:
        """``{"potential": spec, "link": None | {"cost": name, "options": {...}}}``."""
        return {"potential": model_spec(self.potential), "link": _link_spec(self.link)}

    @classmethod
    def from_config(cls, config: dict[str, Any], *, link: Callable[[Tensor], Tensor] | None = None,
                    **children: Any) -> "PotentialVelocity":
        """Rebuild from ``config``; a stored cost link must be passed again as ``link=`` (the cost's
        ``grad_conjugate``, e.g. ``get_cost("lp", p=1.5).grad_conjugate``), and is checked against the record."""
        config = dict(config)
        potential = build_from_spec(config.pop("potential", None), "potential", **children)
        stored = config.pop("link", None)
        if config:
            raise TypeError(f"unexpected keys {sorted(config)}")
        if stored is not None and link is None:
            options = ", ".join(f"{k}={v!r}" for k, v in (stored.get("options") or {}).items())
            raise ValueError(f"this field's link is the gradient of the conjugate of the cost {stored.get('cost')!r}"
                             f"; pass link=get_cost({stored.get('cost')!r}{', ' + options if options else ''})"
                             ".grad_conjugate (steerflow.transport.costs)")
        if _link_spec(link) != stored:
            raise ValueError(f"link={link!r} is not the stored link {stored!r}")
        return cls(potential, link)

    def potential_value(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """``f(x, t)`` (b,)."""
        f = self.potential(x, t) if cond is None else self.potential(x, t, cond)
        if f.ndim == 2 and f.shape[1] == 1:
            f = f.squeeze(1)
        if f.shape != (x.shape[0],):
            raise ValueError(f"the potential must return shape ({x.shape[0]},) or ({x.shape[0]}, 1), got {tuple(f.shape)}")
        return f

    def gradient(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """``∇_x f(x, t)`` (b, *d)."""
        want_graph = torch.is_grad_enabled() and (self.training or x.requires_grad)
        with torch.enable_grad():
            xi = x if x.requires_grad else x.detach().requires_grad_(True)
            f = self.potential_value(xi, t, cond)
            (g,) = torch.autograd.grad(f.sum(), xi, create_graph=want_graph)
        return g if want_graph else g.detach()

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        g = self.gradient(x, t, cond)
        return g if self.link is None else self.link(g)


def _link_spec(link: Callable[[Tensor], Tensor] | None) -> dict[str, Any] | None:
    """A link stored by name: None, or a cost's bound ``grad_conjugate`` as the cost's name and init options."""
    if link is None:
        return None
    cost = getattr(link, "__self__", None)
    if cost is not None and getattr(link, "__name__", None) == "grad_conjugate" and isinstance(
            getattr(cost, "name", None), str):
        params = inspect.signature(type(cost).__init__).parameters
        options = {k: getattr(cost, k) for k in params if k != "self" and hasattr(cost, k)}
        return {"cost": cost.name, "options": options}
    raise TypeError(f"the link {link!r} cannot be saved: only None or a cost's grad_conjugate "
                    "(steerflow.transport.costs) is stored by name")


__all__ = ["PotentialMLP", "QuadraticPotential", "ICNN", "PotentialVelocity"]
