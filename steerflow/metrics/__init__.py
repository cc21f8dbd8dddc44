"""Metrics: sample quality, straightness, image quality, posterior scores, cost accounting.

Two-sample distances (:mod:`.distances`) take sample sets (n, *d) and return floats:
``energy_distance`` (squared, exact), ``sliced_energy_distance`` (squared, ``c_d`` times the exact one in
expectation), ``w2`` (exact, not squared), ``w2_gaussian`` (closed form), ``mmd_rbf`` (squared).
"""
from .cost import Cost
from .distances import (energy_distance, median_bandwidth, mmd_rbf, sliced_energy_constant,
                        sliced_energy_distance, w2, w2_gaussian)
from .flow import straightness, transport_cost
from .image import psnr, ssim
from .posterior import assign_components, mode_weight_tv, trace_cov_ratio

__all__ = ["Cost", "energy_distance", "sliced_energy_distance", "sliced_energy_constant", "w2", "w2_gaussian",
           "mmd_rbf", "median_bandwidth", "straightness", "transport_cost", "psnr", "ssim",
           "assign_components", "mode_weight_tv", "trace_cov_ratio"]
