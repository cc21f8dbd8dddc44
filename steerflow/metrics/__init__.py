"""Metrics: sample quality, straightness, image quality, cost accounting."""
from .cost import Cost

__all__ = ["Cost"]
