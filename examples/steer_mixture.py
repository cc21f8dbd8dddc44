"""Steer a flow toward a posterior it was never trained for, and score it against the exact answer.

The prior is a Gaussian mixture (exact velocity field), the measurement y = A x + N(0, σ²I) observes
one coordinate; the exact posterior is again a mixture. Run: python examples/steer_mixture.py
"""
import torch

import steerflow
from steerflow.data import GaussianMixture
from steerflow.metrics import energy_distance
from steerflow.steering import DPS, ExactPosteriorGuidance, FlowChef, SteerflowDefault

torch.set_num_threads(1)
prior = GaussianMixture([0.5, 0.5], [[-1.0, -1.0], [1.0, 1.0]], [0.1, 0.1])
A, sigma = torch.tensor([[1.0, 0.0]], dtype=torch.float64), 0.3
y = torch.tensor([0.4], dtype=torch.float64)
posterior = prior.posterior(A, y, sigma)
reference = posterior.sample(3000, generator=torch.Generator().manual_seed(1))

methods = {
    "unguided": None,
    "exact guided ODE": ExactPosteriorGuidance(prior, A, y, sigma),
    "DPS": DPS(A, y, sigma),
    "FlowChef": FlowChef(A, y, sigma),
    "steerflow default": SteerflowDefault(A, y, sigma),
}
for name, guidance in methods.items():
    gen = torch.Generator().manual_seed(0)
    x_0 = torch.randn(3000, 2, dtype=torch.float64, generator=gen)
    cost = steerflow.Cost()
    x_1 = steerflow.sample(prior.velocity, x_0, steps=100, guidance=guidance, generator=gen, cost=cost)
    print(f"{name:>18}: energy distance to the exact posterior {energy_distance(x_1, reference):.4f} "
          f"(NFE {cost.nfe}, VJPs {cost.vjp}, operator calls {cost.operator_calls})")
