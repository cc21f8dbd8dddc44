"""Transport: c-rectified flows for convex costs (Liu 2022), population-conditioned flows (Meta Flow
Matching) and multimarginal stochastic interpolants (Albergo et al. 2023)."""
from .costs import COSTS, AbstractConvexCost, LpCost, QuadraticCost, get_cost
from .crectified import (CRectifiedFlow, RectificationRound, c_conservative_velocity, c_rectification_loss,
                         c_rectified_flow, fit_c_rectified)
from .gaussian import brenier_map_gaussian, sqrtm_psd

__all__ = ["COSTS", "AbstractConvexCost", "LpCost", "QuadraticCost", "get_cost", "CRectifiedFlow",
           "RectificationRound", "c_conservative_velocity", "c_rectification_loss", "c_rectified_flow",
           "fit_c_rectified", "brenier_map_gaussian", "sqrtm_psd"]
from .multimarginal import ConditionalMeansNet, train_conditional_means, transport

__all__ += ["ConditionalMeansNet", "train_conditional_means", "transport"]
from .population import (GLYPHS, PopulationFamily, assignment_wasserstein, glyph_points, make_populations,
                         train_population_flow)

__all__ += ["GLYPHS", "PopulationFamily", "assignment_wasserstein", "glyph_points", "make_populations",
            "train_population_flow"]
