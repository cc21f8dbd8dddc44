"""The guidance test bed shared by test_guidance.py and test_steering_paths.py: a bimodal 2-d Gaussian mixture
prior, the measurement of its first coordinate ``y = x_1[0] + N(0, σ²)`` and seeded generators."""
import torch

from steerflow.data.mixture import GaussianMixture
from steerflow.steering.operators import Dense

D = torch.float64
MIX = GaussianMixture([0.5, 0.5], [[-1.0, -1.0], [1.0, 1.0]], [[[0.25, 0.1], [0.1, 0.25]]] * 2)
A = Dense(torch.tensor([[1.0, 0.0]], dtype=D))
Y = torch.tensor([0.4], dtype=D)
SIGMA = 0.3


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)
