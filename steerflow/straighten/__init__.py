"""Straightening: reflow (k-rectified flow) and one-step distillation (Liu et al. 2022, "Flow Straight and Fast")."""
from .distill import DistillResult, OneStep, distill, one_step, one_step_loss
from .reflow import Pairs, ReflowResult, as_source, fit_flow, pairs_flow_loss, generate_pairs, reflow
from ._fit import FitResult

__all__ = ["DistillResult", "OneStep", "distill", "one_step", "one_step_loss", "Pairs", "ReflowResult",
           "as_source", "fit_flow", "pairs_flow_loss", "generate_pairs", "reflow", "FitResult"]
