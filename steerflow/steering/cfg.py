"""Class guidance for flows: classifier-free guidance and classifier guidance, as guidances.

Classifier-free guidance (Ho & Salimans 2022, eq. 6, written for velocities as in Zheng et al. 2023,
"Guided Flows for Generative Modeling and Decision Making")::

    ṽ(x, t) = v(x, t | ∅) + w (v(x, t | c) − v(x, t | ∅)),

one network call on the doubled batch ``[x, x]`` with conditions ``[c, ∅]``.

Classifier guidance (Dhariwal & Nichol 2021, eq. 10; Song et al. 2021, eq. 14) adds ``s ∇_x log p(c | x_t)``
to the score. A velocity and the score are affine in each other for a Gaussian source
(``v = a_t x + b_t ∇log p_t``; for the linear path ``b_t = (1 − t) / t``), so::

    ṽ(x, t) = v(x, t) + s b_t ∇_x log p(c | x_t = x).

With the exact posterior ``p(c | x_t)`` and ``s = 1``, ``ṽ`` is exactly the velocity of the class-``c``
conditional flow. ``p(c | x_t)`` is either a time-dependent classifier ``classifier(x, t)`` or a clean-image
classifier read at the data prediction ``x̂_1(x_t) = path.x1_from_velocity(v, x, t)`` (gradient through
the network, one VJP per stage; Chung et al. 2023 style).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..paths import AffinePath
from ..solvers import CountedField
from .base import AbstractGuidance, Field, PathGuidance, check_path

__all__ = ["ClassifierFreeGuidance", "ClassifierGuidance", "CLASSIFIER_INPUTS"]


def _call(v: Field, x: Tensor, t: Tensor, cond: Any, nfe: int) -> Tensor:
    """Call the model behind the sampler's counted field with our own condition (counted there)."""
    if isinstance(v, CountedField):
        return v.call_with(x, t, cond, nfe=nfe)
    return v(x, t) if cond is None else v(x, t, cond)


def _model(v: Field) -> Any:
    return v.model if isinstance(v, CountedField) else v


def _null_like(model: Any, cond: Tensor) -> Tensor | None:
    """The null condition of a steerflow model with a label table (index ``n_classes``), else ``None``."""
    table = getattr(model, "label_embed", None)
    index = getattr(table, "null_index", None)
    if isinstance(index, int) and torch.is_tensor(cond) and not cond.is_floating_point():
        return torch.full_like(cond, index)
    return None


class ClassifierFreeGuidance(AbstractGuidance):
    """``ṽ = v(x, t | ∅) + w (v(x, t | c) − v(x, t | ∅))`` (Ho & Salimans 2022).

    Args:
        scale: guidance weight ``w`` (``w = 1``: the conditional field; ``w = 0``: the unconditional one;
            ``w > 1``: sharper, less diverse samples).
        cond: the condition ``c`` with a leading batch dimension (b, ...), e.g. integer labels (b,), or any
            object the model takes as its third argument (a pipeline's :class:`~steerflow.adapters.PromptEmbeds`).
        null_cond: the null condition ``∅`` of the same shape. ``None``: the model's null class when it has
            a label table (steerflow models: index ``n_classes``), one batched call on ``[x, x]``;
            otherwise two calls, ``model(x, t, cond)`` and ``model(x, t)``. Tensor conditions are batched into
            one call; other conditions (prompt embeddings) take two calls, ``model(x, t, cond)`` and
            ``model(x, t, null_cond)``.

    Use as ``sample(model, x_0, guidance=ClassifierFreeGuidance(w, labels))`` — no ``cond=`` in ``sample``.
    NFE: the doubled batch counts as 2 evaluations.
    """

    def __init__(self, scale: float, cond: Any, null_cond: Any = None) -> None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a number, got {type(scale).__name__}")
        if cond is None:
            raise ValueError("cond must be given (the condition to guide toward)")
        if null_cond is not None and torch.is_tensor(cond) and torch.is_tensor(null_cond) \
                and null_cond.shape != cond.shape:
            raise ValueError(f"null_cond must have cond's shape {tuple(cond.shape)}, got {tuple(null_cond.shape)}")
        self.scale, self.cond, self.null_cond = float(scale), cond, null_cond

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance(scale={self.scale})"

    def velocity(self, v: Field, x: Tensor, t: Tensor, dt: Tensor, *, generator=None, cost=None) -> Tensor:
        cond = self.cond
        if torch.is_tensor(cond) and cond.shape[0] != x.shape[0]:
            raise ValueError(f"cond has batch {cond.shape[0]} but the state has batch {x.shape[0]}")
        null = self.null_cond if self.null_cond is not None else _null_like(_model(v), cond)
        if torch.is_tensor(null) and torch.is_tensor(cond):  # one batched call on [x, x] counts as two evaluations
            out = _call(v, torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]), nfe=2)
            v_cond, v_null = out.chunk(2)
        else:  # conditions that do not stack (e.g. a pipeline's prompt embeddings): two calls
            v_cond, v_null = _call(v, x, t, cond, nfe=1), _call(v, x, t, null, nfe=1)
        if v_cond.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(v_cond.shape)} for input {tuple(x.shape)}")
        return v_null + self.scale * (v_cond - v_null)


CLASSIFIER_INPUTS = ("x_t", "x1_hat")
"""What the classifier of :class:`ClassifierGuidance` sees: the noisy state (with ``t``) or ``x̂_1``."""


class ClassifierGuidance(PathGuidance):
    """``ṽ = v + s b_t ∇_x log p(c | x)`` with ``b_t`` the score→velocity factor of the path
    (Dhariwal & Nichol 2021, eq. 10, converted to velocities; linear path: ``b_t = (1 − t) / t``).

    Args:
        classifier: ``on="x_t"``: ``classifier(x, t) -> logits (b, K)`` on the noisy state, ``t`` (b,);
            ``on="x1_hat"``: ``classifier(x̂_1) -> logits (b, K)`` on the data prediction.
        target: integer class labels (b,) or a single int.
        scale: ``s`` (``s = 1`` with the exact posterior: the class-conditional flow).
        on: ``"x_t"`` or ``"x1_hat"``.
        path: the path the velocity belongs to (default: the model's ``path`` when it carries one, else linear).
        t_min: ``b_t`` diverges at ``t = 0`` while ``∇ log p(c | x_t) = O(t)`` (the exact product has a
            finite limit); the guidance term (classifier time and ``b_t``) is evaluated at
            ``max(t, t_min)``, an ``O(t_min)`` error on the first step only.

    Cost: one VJP per stage (``cost.vjp``); with ``on="x1_hat"`` it runs through the network.
    """

    def __init__(self, classifier: Callable[..., Tensor], target: Tensor | int, scale: float = 1.0, *,
                 on: str = "x_t", path: AffinePath | str | None = None, t_min: float = 1e-2) -> None:
        if not callable(classifier):
            raise TypeError(f"classifier must be callable, got {type(classifier).__name__}")
        if on not in CLASSIFIER_INPUTS:
            raise ValueError(f"unknown classifier input {on!r}; expected one of {list(CLASSIFIER_INPUTS)}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a number, got {type(scale).__name__}")
        if not 0 < t_min < 1:
            raise ValueError(f"t_min must lie in (0, 1), got {t_min}")
        if torch.is_tensor(target):
            if target.is_floating_point() or target.ndim != 1:
                raise TypeError(f"target must be integer labels of shape (b,), got {target.dtype} "
                                f"{tuple(target.shape)}")
        elif isinstance(target, bool) or not isinstance(target, int):
            raise TypeError(f"target must be an int or an integer tensor (b,), got {type(target).__name__}")
        self.classifier, self.target, self.scale, self.on = classifier, target, float(scale), on
        self.path = check_path(path)
        self.t_min = float(t_min)

    def __repr__(self) -> str:
        return f"ClassifierGuidance(scale={self.scale}, on={self.on!r})"

    def _labels(self, x: Tensor) -> Tensor:
        if torch.is_tensor(self.target):
            if self.target.shape != (x.shape[0],):
                raise ValueError(f"target must have shape ({x.shape[0]},), got {tuple(self.target.shape)}")
            return self.target.to(device=x.device, dtype=torch.long)
        return torch.full((x.shape[0],), self.target, dtype=torch.long, device=x.device)

    def settings(self):
        return {"scale": self.scale}

    def initial(self, v, x, ts, *, generator=None, cost=None):
        self._start_path(v)  # the model's path, resolved once on the sampler's base field
        return super().initial(v, x, ts, generator=generator, cost=cost)

    def _score_factor(self, t: Tensor, x: Tensor, path: AffinePath) -> Tensor:
        """``b_t`` (b, 1, ..): the change of velocity per unit of score at ``t`` clipped to ``t_min``."""
        tc = t.clamp_min(self.t_min)
        c = path.coefficients(tc, x)
        # v = d_alpha (x - sigma x0)/alpha + d_sigma x0 with x0 = -sigma score
        #   ⇒ ∂v/∂score = sigma (d_alpha sigma / alpha - d_sigma)
        return c.sigma_t * (c.d_alpha_t * c.sigma_t / c.alpha_t - c.d_sigma_t)

    def velocity(self, v: Field, x: Tensor, t: Tensor, dt: Tensor, *, generator=None, cost=None) -> Tensor:
        labels = self._labels(x)
        path = self._path_for(v)
        if self.on == "x_t":
            v_t = v(x, t)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            if self.on == "x_t":
                logits = self.classifier(x_in, t.clamp_min(self.t_min))
            else:
                v_t = v(x_in, t)
                logits = self.classifier(path.x1_from_velocity(v_t, x_in, t))
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f"the classifier must return logits (b, K), got {tuple(logits.shape)}")
            log_p = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).sum()
            (grad,) = torch.autograd.grad(log_p, x_in)
        if cost is not None:
            cost.vjp += 1
        term = self.scale * self._score_factor(t, x, path) * grad
        return (v_t if self.on == "x_t" else v_t.detach()) + term
