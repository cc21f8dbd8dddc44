"""Differentiable distribution-matching losses for one-step generators.

A one-step student distilled by regression alone inherits its teacher's errors: it can at best
reproduce the teacher's ODE map, which itself misses the data. Adding a two-sample loss between a batch
of generated points ``G_θ(z)`` and a batch of *real* data corrects the student's distribution directly.
This is the distribution-matching idea of MMD-GANs without a critic (Dziugaite, Roy & Ghahramani 2015;
Li, Swersky & Zemel 2015, "Generative Moment Matching Networks") and of Distribution Matching
Distillation (DMD, Yin et al. 2024: regression to teacher pairs plus a distribution-matching term).

The loss here is Székely's energy distance (Székely & Rizzo 2013, "Energy statistics"),

    D²(P, Q) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|,      X, X' ~ P,  Y, Y' ~ Q,

which is ``≥ 0`` with equality iff ``P = Q`` (finite first moments), is the MMD of the distance-induced
kernel ``k(x, y) = -|x - y|`` (Sejdinovic et al. 2013), has no bandwidth to tune, and whose gradient
w.r.t. a generated point ``x_i``, ``(2/m) Σ_j (x_i - y_j)/|x_i - y_j| - (2/(n-1)) Σ_{k≠i} (x_i - x_k)/|x_i - x_k|``
(up to the 1/n of the mean), attracts towards data and repels from other samples — so it
matches the whole distribution, mode weights included, rather than only pulling points to the nearest mode.

The energy distance is a large-scale statistic: on 2-D toys it fixes mode weights and the overall shape
but barely sees thin structures (a blurred edge changes ``E|X - Y|`` very little). The
*minibatch OT energy distance* of OT-GAN (Salimans, Zhang, Radford & Metaxas 2018) keeps the same
energy form but replaces the distance between points by the optimal-transport cost between minibatches,

    D²_OT = 2 E[W(X_b, Y_b)] - E[W(X_b, X'_b)] - E[W(Y_b, Y'_b)],   W = exact W₂² (squared Euclidean cost),

whose gradient pulls each generated point towards its *assigned* data point (what the W₂ metric sees),
while the ``W(X_b, X'_b)`` term removes the minibatch bias that would otherwise shrink the generator.
``ot-energy`` splits one generated and one data batch into halves; ``ot-energy-full`` compares two generated
batches with one whole data batch (generated points cost no data), so each plan is twice as large.

A minibatch plan has no consistent force on a generated point that lies where the data have (almost) no mass,
such as the gap between two moons: from batch to batch it is assigned to whichever side is short of points, so
it is pulled now one way, now the other. ``ot-energy-nn`` adds a *nearest-neighbour energy*, with
``h(A, B) = mean_{a ∈ A} min_{b ∈ B} |a - b|²``,

    N = ½ [h(X_1, Y) - h(X_1, sg X_2) + h(X_2, Y) - h(X_2, sg X_1)]      (sg: no gradient through that set),

a local term: each generated point is pulled towards its nearest data point and pushed from its nearest
*other* generated point, so where the generated density exceeds the data's (nearest generated neighbours are
closer than nearest data points) points spread towards the data. Because ``X_2`` and ``Y`` are independent
batches of the same size, ``h(X_1, X_2)`` and ``h(X_1, Y)`` have the same law when the generator matches the
data, so ``E[N] = 0`` and ``E[∇N] = 0`` there (the gradient stops at ``X_2``: with it, the term would not be
stationary at the data). Nearest-neighbour distances are the statistics behind k-NN divergence estimators
(Wang, Kulkarni & Verdú 2009); here they only supply a gradient.

Minibatch plans see a data batch of a few hundred points: a ±15 % error in how densely a long, thin structure
(a moon's arc) is covered is inside their sampling noise. The *sliced* W₂² (Rabin, Peyré, Delon & Bernot 2011;
Deshpande, Zhang & Schwing 2018, "Generative modeling using the sliced Wasserstein distance")

    S(X, Y) = d · E_θ W₂²(θ·X, θ·Y),    θ uniform on the unit sphere,

costs a sort per direction, so :func:`sliced_w2_loss` can compare the generated batch with a *much larger*
reference (``distill(..., sliced_weight=λ, sliced_memory=k)`` uses the union of the last ``k`` data batches:
``k`` times the data per comparison, no extra data drawn), and it measures exactly those one-dimensional
quantile errors. The factor ``d`` puts it on the scale of ``W₂²``: a shift ``c`` costs ``|c|²``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["energy_distance_loss", "minibatch_ot_energy_loss", "full_batch_ot_energy_loss",
           "nearest_neighbour_energy_loss", "ot_nn_energy_loss", "sliced_w2_loss", "MATCHING_LOSSES",
           "GENERATED_PER_DATA", "get_matching_loss"]


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """``|a_i - b_j|²`` (p, q): explicit differences in low dimension (exact zeros for equal points), the
    expansion ``|a|² + |b|² - 2 a·b`` (clamped at 0) above 64 dimensions, where the (p, q, D) difference
    tensor would cost too much memory."""
    if a.shape[1] <= 64:
        return (a[:, None, :] - b[None, :, :]).square().sum(-1)
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T).clamp_min(0.0)


def _pairwise_norms(a: Tensor, b: Tensor, *, exclude_diagonal: bool) -> Tensor:
    """``|a_i - b_j|`` (p, q) with a gradient that is finite everywhere.

    ``|·|`` has no derivative at 0 (``d sqrt(u)/du = ∞`` at ``u = 0``), reached on the diagonal of a set
    against itself and whenever two points coincide; there the subgradient 0 is used (``sqrt`` is
    evaluated on 1 and the result masked), which is the minimum-norm subgradient of ``|·|`` at 0.
    """
    d2 = _sq_dists(a, b)
    zero = d2 <= 0
    if exclude_diagonal:
        zero = zero | torch.eye(d2.shape[0], d2.shape[1], dtype=torch.bool, device=d2.device)
    return torch.where(zero, torch.zeros_like(d2), torch.sqrt(torch.where(zero, torch.ones_like(d2), d2)))


def _flat_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` (n, D) and ``y`` (m, D) flattened, ``y`` in ``x``'s dtype and device; shapes checked."""
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] < 1 or y.shape[0] < 1:
        raise ValueError(f"x and y must have shape (n, *d) with n >= 1, got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.reshape(x.shape[0], -1)
    y = y.reshape(y.shape[0], -1).to(dtype=x.dtype, device=x.device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    return x, y


def energy_distance_loss(x: Tensor, y: Tensor, *, unbiased: bool = True) -> Tensor:
    """Squared energy distance ``D²`` between sample sets ``x`` (n, *d) and ``y`` (m, *d), differentiable.

    ``D² = 2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Székely & Rizzo 2013), ``|·|`` Euclidean on the
    flattened ``d``, estimated on the minibatches by

    * ``unbiased=True`` (U-statistic within sets; default):
      ``(2/(nm)) Σ_{i,j} |x_i - y_j| - Σ_{i≠k} |x_i - x_k| / (n(n-1)) - Σ_{j≠l} |y_j - y_l| / (m(m-1))``,
      an unbiased estimate of ``D²`` (so its gradient is an unbiased estimate of ``∇_θ D²``: the
      V-statistic's within-set mean, with its zero diagonal, underweights repulsion by ``(n-1)/n``
      and would bias the generator towards too narrow a distribution); may be slightly negative.
    * ``unbiased=False`` (V-statistic): all pairs, diagonal included; ``≥ 0`` and exactly 0 for equal sets.

    Same estimators as :func:`steerflow.metrics.energy_distance`, but computed in the input dtype
    with autograd (that function returns a detached float64 number for evaluation). The work is
    ``O((n + m)² d)``: meant for minibatches (hundreds of points), not for evaluation on large sets.

    Args:
        x: (n, *d) generated samples (gradients flow through them).
        y: (m, *d) target samples (usually data; gradients flow too if it requires them).
        unbiased: U- (True) or V-statistic (False).

    Returns:
        A scalar tensor ``D²``.
    """
    x, y = _flat_pair(x, y)
    n, m = x.shape[0], y.shape[0]
    if unbiased and (n < 2 or m < 2):
        raise ValueError(f"unbiased=True needs at least 2 samples in each set, got n={n}, m={m}")
    e_xy = _pairwise_norms(x, y, exclude_diagonal=False).mean()
    s_xx = _pairwise_norms(x, x, exclude_diagonal=True).sum()
    s_yy = _pairwise_norms(y, y, exclude_diagonal=True).sum()
    if unbiased:
        return 2.0 * e_xy - s_xx / (n * (n - 1)) - s_yy / (m * (m - 1))
    return 2.0 * e_xy - s_xx / (n * n) - s_yy / (m * m)


def _batch_ot(a: Tensor, b: Tensor) -> Tensor:
    """``W₂²`` between equal-size uniform batches ``a``, ``b`` (k, D): ``(1/k) Σ_i |a_i - b_σ(i)|²`` for the
    optimal permutation ``σ`` (``steerflow.couplings.exact.solve_assignment``, on detached costs), differentiable in ``a`` and ``b`` with ``σ`` fixed
    (the envelope theorem: the derivative of the minimum is the derivative at the minimiser)."""
    from ..couplings.exact import solve_assignment

    c = _sq_dists(a, b)
    # a_σ[j] is paired with b_j; for small batches of nearby points Jonker–Volgenant beats the network simplex
    # (0.68 vs 0.95 ms at 128 points, three solves per step)
    sigma = solve_assignment(c.detach(), solver="lsa")
    return c[sigma, torch.arange(c.shape[1], device=c.device)].mean()


def _ot_energy(x_1: Tensor, x_2: Tensor, y: Tensor) -> Tensor:
    return _batch_ot(x_1, y) + _batch_ot(x_2, y) - _batch_ot(x_1, x_2)


def _nn_energy(x_1: Tensor, x_2: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (_nearest_sq(x_1, y) - _nearest_sq(x_1, x_2.detach())
                  + _nearest_sq(x_2, y) - _nearest_sq(x_2, x_1.detach()))


def _two_batches(x: Tensor, y: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` split into two generated batches of ``m = len(y)`` (checked), and ``y``; all flattened."""
    x, y = _flat_pair(x, y)
    m = y.shape[0]
    if m < 2 or x.shape[0] < 2 * m:
        raise ValueError(f"{name} needs m >= 2 data points and at least 2m generated ones, got {x.shape[0]} "
                         f"generated and {m} data points")
    return x[:m], x[m:2 * m], y


def _nearest_sq(a: Tensor, b: Tensor) -> Tensor:
    """``h(a, b) = mean_i min_j |a_i - b_j|²``."""
    return _sq_dists(a, b).min(dim=1).values.mean()


def minibatch_ot_energy_loss(x: Tensor, y: Tensor) -> Tensor:
    """Minibatch OT energy distance (OT-GAN, Salimans et al. 2018) with the exact ``W₂²`` cost.

    ``x`` (n, *d) and ``y`` (m, *d) are each split into two halves of ``k = min(n, m) // 2`` points,
    ``X_1, X_2`` and ``Y_1, Y_2``; with ``W`` = :func:`_batch_ot` (exact ``W₂²`` between two sets of ``k``)

        D²_OT = (1/2) Σ_{i,j ∈ {1,2}} W(X_i, Y_j)  -  W(X_1, X_2)  -  W(Y_1, Y_2).

    All three terms compare sets of the same size ``k``, so ``E[D²_OT] = 0`` when ``x`` and ``y`` have the same
    law (the size-dependent bias of empirical ``W₂²`` cancels). Costs six ``k × k`` assignments
    (``O(k³)`` on the CPU each; ``k = 128`` takes about a millisecond).

    Args:
        x: (n, *d) generated samples (gradients flow through them). y: (m, *d) data; ``n, m >= 4``.

    Returns:
        A scalar tensor.
    """
    x, y = _flat_pair(x, y)
    k = min(x.shape[0], y.shape[0]) // 2
    if k < 2:
        raise ValueError(f"minibatch_ot_energy_loss needs at least 4 samples in each set, got {x.shape[0]} and "
                         f"{y.shape[0]}")
    x_1, x_2, y_1, y_2 = x[:k], x[k:2 * k], y[:k], y[k:2 * k]
    cross = _batch_ot(x_1, y_1) + _batch_ot(x_1, y_2) + _batch_ot(x_2, y_1) + _batch_ot(x_2, y_2)
    return 0.5 * cross - _batch_ot(x_1, x_2) - _batch_ot(y_1, y_2)


def full_batch_ot_energy_loss(x: Tensor, y: Tensor) -> Tensor:
    """OT-GAN's minibatch energy distance on whole data batches: two generated batches against one data batch.

    ``y`` (m, *d) is one batch of data; ``x`` (n, *d) with ``n >= 2m`` holds two independent generated batches
    ``X_1 = x[:m]``, ``X_2 = x[m:2m]`` (generated points cost no data, so the data batch is not split); with
    ``W`` = :func:`_batch_ot` (exact ``W₂²`` between two sets of ``m``)

        L = W(X_1, Y) + W(X_2, Y) - W(X_1, X_2).

    With ``D²_m = E W(X, Y) - ½ E W(X, X') - ½ E W(Y, Y')`` (Salimans et al. 2018, at batch size ``m``),
    ``E[L] = 2 D²_m + E W(Y, Y')``: the last term does not depend on the generator, so ``∇_θ L`` is an unbiased
    estimate of ``2 ∇_θ D²_m``, and ``E[L] = E W(Y, Y')`` (not 0) when ``x`` and ``y`` have the same law.
    Against :func:`minibatch_ot_energy_loss` on the same data batch every plan is between sets of ``m`` rather
    than ``m/2`` points: the minibatch plan's blur (a generated point that the random batch assigns now to one
    mode, now to another, is pulled to their average) shrinks as the sets grow. Three ``m × m`` assignments.

    Args:
        x: (n, *d) generated samples, ``n >= 2m`` (points beyond ``2m`` are unused).
        y: (m, *d) data, ``m >= 2``.

    Returns:
        A scalar tensor.
    """
    return _ot_energy(*_two_batches(x, y, "full_batch_ot_energy_loss"))


def nearest_neighbour_energy_loss(x: Tensor, y: Tensor) -> Tensor:
    """The nearest-neighbour energy ``N`` of two generated batches against one data batch (see the module docstring).

    ``y`` (m, *d) is one data batch; ``x`` (n, *d) with ``n >= 2m`` holds two independent generated batches
    ``X_1 = x[:m]``, ``X_2 = x[m:2m]``; with ``h(A, B) = mean_{a ∈ A} min_{b ∈ B} |a - b|²``,

        N = ½ [h(X_1, Y) - h(X_1, sg X_2) + h(X_2, Y) - h(X_2, sg X_1)],

    ``sg`` = no gradient through that set. ``E[N] = 0`` and ``E[∇_θ N] = 0`` when the generated points have the
    data's law (``X_2`` and ``Y`` are then exchangeable); it is a local statistic, blind to how mass is shared
    between distant regions, so it is meant as an addition to a global discrepancy (:func:`ot_nn_energy_loss`),
    not alone. Costs four ``m × m`` distance matrices.

    Args:
        x: (n, *d) generated samples, ``n >= 2m`` (points beyond ``2m`` are unused).
        y: (m, *d) data, ``m >= 2``.

    Returns:
        A scalar tensor.
    """
    return _nn_energy(*_two_batches(x, y, "nearest_neighbour_energy_loss"))


def ot_nn_energy_loss(x: Tensor, y: Tensor, *, nn_weight: float = 1.0) -> Tensor:
    """``full_batch_ot_energy_loss(x, y) + nn_weight · nearest_neighbour_energy_loss(x, y)`` (``ot-energy-nn``).

    The OT term fixes where mass goes at every scale the plan resolves; the nearest-neighbour term pulls the points
    that the minibatch plans leave between modes (off the data's support) to the nearest data (see the module
    docstring). Both are stationary when the generator matches the data.

    Args:
        x: (n, *d) generated samples, two batches of ``m`` (``n >= 2m``). y: (m, *d) data, ``m >= 2``.
        nn_weight: weight of the nearest-neighbour term (``>= 0``; 0 gives ``ot-energy-full``).

    Returns:
        A scalar tensor.
    """
    if not (isinstance(nn_weight, (int, float)) and not isinstance(nn_weight, bool) and nn_weight >= 0):
        raise ValueError(f"nn_weight must be a number >= 0, got {nn_weight!r}")
    parts = _two_batches(x, y, "ot_nn_energy_loss")
    loss = _ot_energy(*parts)
    return loss if nn_weight == 0 else loss + nn_weight * _nn_energy(*parts)


def sliced_w2_loss(x: Tensor, y: Tensor, *, n_projections: int = 64,
                   generator: torch.Generator | None = None) -> Tensor:
    """Sliced ``W₂²`` between ``n`` generated points and a reference sample of any size ``N``.

    For ``n_projections`` random unit directions ``θ`` (drawn with ``generator``), the one-dimensional ``W₂²``
    between the sorted projections ``θ·x_(1) <= … <= θ·x_(n)`` and the reference's empirical quantiles at levels
    ``(i + ½)/n`` (the order statistic of rank ``⌊(i + ½) N / n⌋`` of ``θ·y``), averaged over directions and
    multiplied by the dimension ``d``, so that ``x = y + c`` (``N = n``) costs ``|c|²`` in expectation over
    ``θ``. With ``N = n`` each direction's term is the exact 1-D ``W₂²`` between the two point sets. The gradient
    moves every generated point along each ``θ`` towards the reference quantile of its rank: a sort per
    direction, ``O((n + N) log N)`` — cheap enough for a reference many times larger than ``x``.

    Args:
        x: (n, *d) generated samples (gradients flow through them), ``n >= 1``.
        y: (N, *d) reference samples (no gradient is taken through them), ``N >= 1``.
        n_projections: number of random directions (``>= 1``).
        generator: draws the directions (fresh each call).

    Returns:
        A scalar tensor.
    """
    if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections must be an integer >= 1, got {n_projections!r}")
    if x.dim() < 2 or y.dim() < 2 or x.shape[1:] != y.shape[1:] or x.shape[0] < 1 or y.shape[0] < 1:
        raise ValueError(f"sliced_w2_loss needs x (n, *d) and y (N, *d) with the same event shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    xf, yf = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1).detach().to(x.dtype)
    d = xf.shape[1]
    theta = torch.randn(d, n_projections, generator=generator, dtype=torch.float64 if x.dtype == torch.float64
                        else torch.float32).to(device=x.device, dtype=x.dtype)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px = (xf @ theta).sort(dim=0).values
    py = (yf @ theta).sort(dim=0).values
    n, big_n = xf.shape[0], yf.shape[0]
    rank = ((torch.arange(n, dtype=torch.float64) + 0.5) * (big_n / n)).long().clamp_max(big_n - 1)
    return d * ((px - py[rank.to(x.device)]) ** 2).mean()


MatchingLoss = Callable[[Tensor, Tensor], Tensor]

MATCHING_LOSSES: dict[str, MatchingLoss] = {
    "energy": energy_distance_loss,
    "ot-energy": minibatch_ot_energy_loss,
    "ot-energy-full": full_batch_ot_energy_loss,
    "ot-energy-nn": ot_nn_energy_loss,
}


# generated points a loss needs per data point (``ot-energy-full``: two generated batches per data batch)
GENERATED_PER_DATA: dict[str, int] = {"energy": 1, "ot-energy": 1, "ot-energy-full": 2, "ot-energy-nn": 2}


def get_matching_loss(name: str) -> MatchingLoss:
    """The matching loss ``name`` (a key of ``MATCHING_LOSSES``): ``loss(generated, data) -> scalar``."""
    if not isinstance(name, str) or name not in MATCHING_LOSSES:
        raise ValueError(f"unknown match {name!r}; expected one of {sorted(MATCHING_LOSSES)}")
    return MATCHING_LOSSES[name]
