"""Adapters: external model conventions, converted here and nowhere else."""
from .diffusers import (DiffusersTransformerVelocity, diffusers_from_velocity, grid_from_scheduler,
                        velocity_from_diffusers)

__all__ = ["DiffusersTransformerVelocity", "diffusers_from_velocity", "grid_from_scheduler",
           "velocity_from_diffusers"]
