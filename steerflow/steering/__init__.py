"""Steering: training-free control of trained flows through the one sampler loop."""
from .base import AbstractGuidance, Compose

__all__ = ["AbstractGuidance", "Compose"]
