"""Training-free guidance of a trained flow for inverse problems ``y = A(x_1) + N(0, σ² I)``: the catalogue.

One method per module (:mod:`.exact`, :mod:`.flowchef`, :mod:`.dps` (DPS and look-ahead), :mod:`.dflow`,
:mod:`.dreamguider`, :mod:`.enkg`, :mod:`.dds`, :mod:`.otode`, :mod:`.pnpflow`); steerflow's own method is
:mod:`steerflow.steering.default`, what they share :mod:`steerflow.steering._common`, and the registry by name
:mod:`steerflow.steering.registry`.

Every method is a small :class:`~steerflow.steering.base.AbstractGuidance` passed to the one loop,
``steerflow.sample(v, x_0, guidance=...)``; none has a sampler of its own (D-Flow and the look-ahead
predictors call :func:`steerflow.sample` itself). Formulas are written for the linear path
``x_t = t x_1 + (1 − t) x_0``, ``t = 1`` data, and every method reads them from the affine path
``x_t = α_t x_1 + σ_t x_0`` the model was trained with (``path=``, or ``model.path``; see
:mod:`steerflow.steering.base`):

* data prediction ``x̂_1 = x + (1 − t) v(x, t)``, noise prediction ``x̂_0 = x − t v(x, t)``
  (``path.x1_from_velocity``, ``path.x0_from_velocity``);
* the exact posterior velocity is ``v_y(x, t) = v(x, t) + b_t ∇_x log p(y | x_t = x)`` with ``b_t = (1 − t) / t``
  (in general ``b_t = σ_t (α̇_t σ_t / α_t − σ̇_t)``, the change of velocity per unit of score; score
  ``∇ log p_t = −x̂_0 / σ_t``, Bayes on the score);
* for data ``N(m, I)``, ``Cov[x_1 | x_t] = r_t² I`` with ``r_t² = (1 − t)² / (t² + (1 − t)²)``
  (in general ``σ_t² / (α_t² + σ_t²)``) and ``∂x̂_1/∂x_t = t / (t² + (1 − t)²)`` (``α_t / (α_t² + σ_t²)``).

Methods that move the state ``x → x'`` before a step with the base velocity held fixed (FlowChef,
Dreamguider, EnKG, PnP-Flow, DDS) return ``v' = v + (x' − x) / dt``: with Euler steps this is exactly
"update, then step"; with multi-stage solvers it is applied at every stage. An adaptive solver hands the
hooks the whole grid interval as ``dt``, so these methods refuse ``method="dopri5"`` (``check``).

Every method takes ``window=(start, stop)``: it acts for ``start <= t < stop`` and the solve is the unguided flow
elsewhere (:mod:`steerflow.steering.base`).

Cost accounting (into the ``cost`` argument): ``cost.vjp`` counts backward passes through the network,
``cost.operator_calls`` counts calls of ``A``, ``Aᵀ``, a VJP of ``A`` or an ``A Aᵀ`` solve; NFE is counted
by the loop. Shapes: ``x`` (b, *d), ``t`` (b,) with one common value, ``y`` (*m) or (b, *m).
"""
from .dds import DDS
from .dflow import DFlow
from .dps import DPS, Lookahead
from .dreamguider import Dreamguider
from .enkg import EnKG
from .exact import ExactPosteriorGuidance
from .flowchef import FlowChef
from .otode import OTODE
from .pnpflow import PnPFlow

__all__ = ["ExactPosteriorGuidance", "FlowChef", "DPS", "Lookahead", "DFlow", "Dreamguider", "EnKG", "DDS", "OTODE",
           "PnPFlow"]
