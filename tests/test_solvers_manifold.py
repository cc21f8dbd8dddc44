"""Solver orders on a curved manifold: the projection method keeps each rule's order."""
import numpy as np
import pytest
import torch

import steerflow
from steerflow.manifolds import Sphere

S = Sphere(2)


def field(x, t):
    # rotation about a time-varying axis plus a tangent drift toward the pole: tangent on S²
    w = torch.stack([torch.ones_like(t), 0.5 * torch.sin(3 * t), 0.3 + t], -1)
    pole = torch.tensor([0.0, 0.0, 1.0], dtype=x.dtype).expand_as(x)
    return torch.cross(w.expand_as(x), x, dim=-1) + 0.5 * (1 + t[:, None]) * S.proju(x, pole)


X0 = S.random_base(5, torch.Generator().manual_seed(0), dtype=torch.float64)
REF = steerflow.sample(field, X0, steps=2048, method="rk4", geometry=S)


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_fitted_order_on_the_sphere(method, order):
    ns = [8, 16, 32, 64]
    errs = [float((steerflow.sample(field, X0, steps=n, method=method, geometry=S) - REF).norm(dim=-1).max())
            for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.3, (method, slope, errs)


def test_dopri5_meets_tolerance_on_the_sphere():
    out = steerflow.sample(field, X0, method="dopri5", atol=1e-8, rtol=1e-8, geometry=S)
    assert float((out - REF).norm(dim=-1).max()) < 1e-7
    assert float(((out**2).sum(-1) - 1).abs().max()) < 1e-12
