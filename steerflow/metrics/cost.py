"""Cost accounting: :class:`Cost`, the counter of a solve, defined with the sampler (:mod:`steerflow.solvers.cost`)
and re-exported here (metrics sit above the solvers: :func:`~steerflow.metrics.straightness` runs the sampler)."""
from ..solvers.cost import Cost

__all__ = ["Cost"]
