"""Population-conditioned flows (Meta Flow Matching): set-encoder invariance, shapes, a tiny held-out check."""
import math

import pytest
import torch

from steerflow.models.population import ConditionedVelocityMLP, PopulationVelocity, SetEncoder
from steerflow.solvers import sample
from steerflow.transport.population import (GLYPHS, assignment_wasserstein, glyph_points, make_populations,
                                            rotation, train_population_flow)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_set_encoder_is_permutation_invariant_and_respects_the_mask(pooling, gen):
    torch.manual_seed(0)
    enc = SetEncoder(3, hidden=32, embed_dim=8, pooling=pooling).double()
    pts = torch.randn(5, 40, 3, generator=gen, dtype=torch.float64)
    perm = torch.randperm(40, generator=gen)
    e = enc(pts)
    assert e.shape == (5, 8)
    torch.testing.assert_close(enc(pts[:, perm]), e, atol=1e-12, rtol=0)
    # Padding: a set of 30 real points plus 10 junk ones, masked, embeds like the 30 points alone.
    mask = torch.zeros(5, 40, dtype=torch.bool)
    mask[:, :30] = True
    junk = pts.clone()
    junk[:, 30:] = 1e3
    torch.testing.assert_close(enc(junk, mask), enc(pts[:, :30]), atol=1e-10, rtol=0)
    assert not torch.allclose(enc(pts[:, :30]), e)


def test_conditioned_models_output_shapes(gen):
    torch.manual_seed(0)
    model = PopulationVelocity.build(2, embed_dim=8, hidden=32, depth=2, encoder_hidden=16)
    pops = torch.randn(3, 50, 2, generator=gen)
    x = torch.randn(3 * 7, 2, generator=gen)
    t = torch.rand(21, generator=gen)
    assert model(x, t, pops).shape == (21, 2)
    emb = model.embed(pops)
    torch.testing.assert_close(model(x, t, emb), model(x, t, pops))
    torch.testing.assert_close(model(x, t, emb.repeat_interleave(7, 0)), model(x, t, pops))
    labelled = ConditionedVelocityMLP(2, cond_dim=5, hidden=16, depth=2)
    assert labelled(x, t, torch.randn(3, 5, generator=gen)).shape == (21, 2)
    assert ConditionedVelocityMLP(2, 0, 16, 2)(x, t).shape == (21, 2)
    with pytest.raises(ValueError, match="split evenly"):
        model(torch.randn(20, 2), torch.rand(20), pops)
    with pytest.raises(ValueError, match="needs cond"):
        model(x, t)
    with pytest.raises(ValueError, match="pooling"):
        SetEncoder(2, pooling="max")


def test_population_family_is_the_stated_transformation(gen):
    fam = make_populations(["L", "O"], 2, 300, gen, noise=0.0, scale=0.5, turn=0.5 * math.pi, shift=(1.0, 0.0))
    assert fam.sources.shape == (4, 300, 2) and fam.targets.shape == (4, 300, 2) and fam.labels.shape == (4, 6)
    for i in range(4):
        c = fam.centres[i]
        T = 0.5 * rotation(torch.tensor(0.5 * math.pi))
        mapped = c + (fam.sources[i] - c) @ T.T + torch.tensor([1.0, 0.0])
        # Noise-free: the target is the same glyph curve; its draw is independent, so compare as sets.
        assert float(assignment_wasserstein(mapped, fam.targets[i])) < 0.1
    assert glyph_points("T", 10, gen).shape == (10, 2) and len(GLYPHS) >= 10


def test_tiny_meta_flow_matching_beats_unconditioned_on_held_out_shapes(gen):
    """Held-out glyphs at random poses: the population-conditioned field transports each population to its own
    future better (exact W2 by assignment) than a field that sees only the point. (Populations shrink about
    their own centres, spread over [-3, 3]², so a field blind to the population cannot place them.)"""
    torch.manual_seed(0)
    train_glyphs = ["L", "T", "V", "O", "H"]
    kw = dict(train_glyphs=train_glyphs, centre_range=3.0, scale=0.4)
    fam = make_populations(train_glyphs, 40, 32, gen, **kw)
    test = make_populations(["Z", "C"], 3, 64, gen, **kw)
    plain = ConditionedVelocityMLP(2, 0, hidden=64, depth=2)
    meta = PopulationVelocity.build(2, embed_dim=16, hidden=64, depth=2, encoder_hidden=32)
    kw = dict(steps=400, populations_per_batch=8, points_per_population=16, lr=3e-3, generator=gen)
    train_population_flow(plain, fam.sources, fam.targets, None, **kw)
    train_population_flow(meta, fam.sources, fam.targets, fam.sources, **kw)

    def w2(model, conditioned):
        out = []
        for i in range(test.sources.shape[0]):
            with torch.no_grad():
                x = sample(model, test.sources[i], steps=10, method="midpoint",
                           cond=test.sources[i:i + 1] if conditioned else None)
            out.append(float(assignment_wasserstein(x, test.targets[i])))
        return sum(out) / len(out)

    w_plain, w_meta = w2(plain, False), w2(meta, True)
    assert w_meta < 0.8 * w_plain, (w_meta, w_plain)
