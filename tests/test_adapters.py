import pytest
import torch

import steerflow
from steerflow.adapters import (DiffusersTransformerVelocity, diffusers_from_velocity, grid_from_scheduler,
                                velocity_from_diffusers)

diffusers = pytest.importorskip("diffusers")


def fake_transformer_fn(x, timestep):
    # any smooth function of (x, timestep) in diffusers' convention (predicts ε - x_data)
    s = (timestep / 1000.0).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x) * (0.5 + s) - 0.3 * s * x.flip(-1)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_parity_with_flow_match_euler_scheduler(shift):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(12)
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    ref = x.clone()
    for ts in sched.timesteps:
        out = fake_transformer_fn(ref, ts.expand(ref.shape[0]))
        ref = sched.step(out, ts, ref).prev_sample
    ours = steerflow.sample(velocity_from_diffusers(fake_transformer_fn), x, ts=grid_from_scheduler(sched),
                            method="euler")
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())


def test_round_trip_conversion():
    v = velocity_from_diffusers(fake_transformer_fn)
    back = diffusers_from_velocity(v)
    x = torch.randn(3, 5)
    ts = torch.tensor([10.0, 500.0, 990.0])
    assert torch.allclose(back(x, ts), fake_transformer_fn(x, ts), atol=1e-6)


def test_transformer_wrapper_passes_conditioning():
    class Out:
        def __init__(self, sample):
            self.sample = sample

    seen = {}

    def transformer(hidden_states, timestep, encoder_hidden_states):
        seen["ehs"] = encoder_hidden_states
        return Out(fake_transformer_fn(hidden_states, timestep))

    v = DiffusersTransformerVelocity(transformer, encoder_hidden_states="text")
    x, t = torch.randn(2, 4), torch.tensor([0.2, 0.7])
    assert torch.allclose(v(x, t), velocity_from_diffusers(fake_transformer_fn)(x, t))
    assert seen["ehs"] == "text"


def test_grid_requires_set_timesteps():
    class NoSigmas:
        sigmas = None

    with pytest.raises(ValueError, match="set_timesteps"):
        grid_from_scheduler(NoSigmas())


@pytest.mark.parametrize("shift,mu,spacing,steps", [(1.0, None, "sd3", 28), (3.0, None, "sd3", 28), (3.0, None, "sd3", 5),
                                                    (1.0, 0.8, "sd3", 20), (1.0, None, "flux", 4),
                                                    (3.0, None, "flux", 28), (1.0, 1.15, "flux", 28)])
def test_flow_match_grid_is_the_schedulers_grid(shift, mu, spacing, steps):
    import numpy as np

    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=mu is not None)
    kw = {"mu": mu} if mu is not None else {}
    if spacing == "flux":
        kw["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    sched.set_timesteps(steps, **kw)
    ours = steerflow.flow_match_grid(steps, shift, mu=mu, spacing=spacing)
    assert ours.shape == (steps + 1,)
    assert torch.allclose(ours, grid_from_scheduler(sched), atol=2e-7)
    # the paper's shifted grid is a different grid (same endpoints)
    if shift != 1.0 and spacing == "sd3" and mu is None:
        assert (steerflow.shifted_grid(steps, shift) - ours).abs().max() > 1e-3


def test_transformer_wrapper_takes_a_condition_and_knows_flux_timesteps():
    class FluxTransformer2DModel:  # stands in for the real class: only the name and the call matter here
        def __call__(self, hidden_states, timestep, tag="default"):
            return (fake_transformer_fn(hidden_states, timestep * 1000) + (tag == "null"),)

    v = DiffusersTransformerVelocity(FluxTransformer2DModel())
    assert v.num_train_timesteps == 1.0
    x, t = torch.randn(2, 4), torch.tensor([0.2, 0.7])
    assert torch.allclose(v(x, t), velocity_from_diffusers(fake_transformer_fn)(x, t), atol=1e-6)
    from steerflow.steering import ClassifierFreeGuidance

    g = ClassifierFreeGuidance(2.0, {"tag": "cond"}, {"tag": "null"})
    out = steerflow.sample(v, x, steps=2, guidance=g)
    assert torch.isfinite(out).all()
    with pytest.raises(TypeError, match="dict"):
        v(x, t, "text")
