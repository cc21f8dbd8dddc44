"""Adapters: external model conventions, converted here and nowhere else.

* :mod:`~steerflow.adapters.diffusers`: the σ ↔ t conversion for any diffusers-convention predictor;
* :class:`FlowPipeline`: a whole diffusers flow-matching pipeline (SD3, Flux) as a steerflow flow
  (diffusers is imported only when a pipeline is loaded; ``pip install 'steerflow[diffusers]'``);
* :mod:`~steerflow.adapters.tiny`: tiny random-weight SD3 / Flux pipelines for tests and smoke runs.
"""
from .diffusers import (DiffusersTransformerVelocity, diffusers_from_velocity, grid_from_scheduler,
                        velocity_from_diffusers)
from .pipeline import PIPELINE_KINDS, DecodedOperator, FlowPipeline, PipelineVelocity, PromptEmbeds

__all__ = ["DiffusersTransformerVelocity", "diffusers_from_velocity", "grid_from_scheduler",
           "velocity_from_diffusers", "FlowPipeline", "PipelineVelocity", "PromptEmbeds", "DecodedOperator",
           "PIPELINE_KINDS"]
