"""Straightening: reflow (k-rectified flow) and one-step distillation (Liu et al. 2022, "Flow Straight and Fast"),
optionally with a distribution-matching term against data (energy distance; OT-GAN's minibatch energy distance)."""
from .distill import (DistillResult, OneStep, as_data_sampler, distill, matched_one_step_loss, one_step,
                      one_step_loss)
from .matching import (GENERATED_PER_DATA, MATCHING_LOSSES, energy_distance_loss, full_batch_ot_energy_loss,
                       get_matching_loss, minibatch_ot_energy_loss, nearest_neighbour_energy_loss, ot_nn_energy_loss,
                       sliced_w2_loss)
from .reflow import Pairs, ReflowResult, as_source, fit_flow, pairs_flow_loss, generate_pairs, reflow
from ._fit import FitCheckpoints, FitResult

__all__ = ["DistillResult", "OneStep", "distill", "one_step", "one_step_loss", "matched_one_step_loss",
           "as_data_sampler", "MATCHING_LOSSES", "GENERATED_PER_DATA", "energy_distance_loss", "minibatch_ot_energy_loss",
           "full_batch_ot_energy_loss", "nearest_neighbour_energy_loss", "ot_nn_energy_loss", "sliced_w2_loss",
           "get_matching_loss", "Pairs", "ReflowResult", "as_source", "fit_flow", "pairs_flow_loss", "generate_pairs",
           "reflow", "FitResult", "FitCheckpoints"]
