"""Solvers: step rules, time grids, the one sampling loop, and likelihoods."""
from .grids import GRIDS, check_grid, flow_match_grid, power_grid, shifted_grid, uniform_grid
from .likelihood import divergence_exact, divergence_hutchinson, log_likelihood, standard_normal_log_prob
from .sample import CountedField, Trajectory, sample
from .steps import (FLAT, SOLVERS, RK4, AbstractSolver, Dopri5, Euler, Flat, Geometry, Heun, Midpoint,
                    SolveBreakdown, get_solver)

__all__ = ["GRIDS", "check_grid", "flow_match_grid", "power_grid", "shifted_grid", "uniform_grid", "divergence_exact",
           "divergence_hutchinson", "log_likelihood", "standard_normal_log_prob", "CountedField",
           "Trajectory", "sample", "FLAT", "SOLVERS", "RK4", "AbstractSolver", "Dopri5", "Euler", "Flat",
           "Geometry", "Heun", "Midpoint", "SolveBreakdown", "get_solver"]
