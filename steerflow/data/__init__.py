"""Data: toy densities, the Gaussian-mixture oracle, and loaders."""
from .mixture import GaussianMixture

__all__ = ["GaussianMixture"]
