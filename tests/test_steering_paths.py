"""Steering reads x̂_1 / x̂_0 from the path the model was trained with, and refuses what its formulas do not cover.

The oracle of a model trained on another affine path is the exact Gaussian-mixture velocity carried to that path
(``PathVelocity``: ``x_t = (α + σ) x^lin_s`` with ``s = α / (α + σ)``), whose data prediction is the exact
denoiser ``E[x_1 | x_t] = E^lin[x_1 | x_s = x_t / (α + σ)]``.
"""
import pytest
import torch

from steerflow import sample
from steerflow.data.mixture import GaussianMixture
from steerflow.metrics import energy_distance
from steerflow.paths import GeodesicPath, PathVelocity, get_path, path_from_record
from steerflow.solvers.steps import Dopri5
from steerflow.steering.cfg import ClassifierGuidance
from steerflow.steering.guidance import (DDS, DPS, OTODE, DFlow, Dreamguider, EnKG, ExactPosteriorGuidance, FlowChef,
                                         Lookahead, PnPFlow, SteerflowDefault)
from steerflow.steering.operators import Dense, NonLinear

from guidance_helpers import A, D, MIX, SIGMA, Y, seeded


def _denoiser(path_name, x, t):
    """Exact ``E[x_1 | x_t = x]`` on the named path, from the linear-path mixture."""
    c = get_path(path_name).coefficients(t, x)
    k = c.alpha_t + c.sigma_t
    return MIX.denoiser(x / k, (c.alpha_t / k).reshape(-1))


def test_path_velocity_is_the_exact_field_of_each_path():
    x = torch.randn(16, 2, generator=seeded(0), dtype=D)
    t = torch.full((16,), 0.3, dtype=D)
    torch.testing.assert_close(PathVelocity(MIX.velocity, "linear")(x, t), MIX.velocity(x, t), rtol=0, atol=1e-14)
    for name in ("cosine", "vp", "polynomial"):
        v = PathVelocity(MIX.velocity, name)
        # the path's conversions turn its velocity into the exact denoiser, and its flow carries N(0, I) to the data
        torch.testing.assert_close(v.path.x1_from_velocity(v(x, t), x, t), _denoiser(name, x, t), rtol=0, atol=1e-12)
    x1 = sample(PathVelocity(MIX.velocity, "cosine"), torch.randn(1000, 2, generator=seeded(1), dtype=D), steps=60,
                method="rk4")
    ref = MIX.sample(1000, seeded(2))
    assert energy_distance(x1, ref) < 3 * energy_distance(MIX.sample(1000, seeded(3)), ref) + 2e-3


def _recorder():
    seen = []

    def fn(x1):
        seen.append(x1.detach().clone())
        return x1[:, :1]

    return seen, NonLinear(fn)


RECORDED = {  # methods whose measurement sees the data prediction x̂_1
    "flowchef": lambda op: FlowChef(op, Y, SIGMA, step_size=0.1),
    "dps": lambda op: DPS(op, Y, SIGMA),
    "lookahead-1": lambda op: Lookahead(op, Y, SIGMA, k=1),
    "dreamguider": lambda op: Dreamguider(op, Y, SIGMA),
    "enkg": lambda op: EnKG(op, Y, SIGMA),
    "pnpflow": lambda op: PnPFlow(op, Y, SIGMA),
}


@pytest.mark.parametrize("name", list(RECORDED))
@pytest.mark.parametrize("path", ["cosine", "vp"])
def test_guidance_reads_x1_from_the_models_path(name, path):
    seen, op = _recorder()
    v = PathVelocity(MIX.velocity, path)  # carries .path: no path= needed
    x = torch.randn(8, 2, generator=seeded(4), dtype=D)
    t = torch.full((8,), 0.3, dtype=D)
    RECORDED[name](op).velocity(v, x, t, torch.tensor(0.05, dtype=D), generator=seeded(5))
    torch.testing.assert_close(seen[0], _denoiser(path, x, t), rtol=0, atol=1e-10)


def test_classifier_guidance_on_x1_reads_the_models_path():
    seen = []

    def classifier(x1):
        seen.append(x1.detach().clone())
        return torch.stack([x1[:, 0], -x1[:, 0]], 1)

    v = PathVelocity(MIX.velocity, "cosine")
    x = torch.randn(8, 2, generator=seeded(6), dtype=D)
    t = torch.full((8,), 0.3, dtype=D)
    ClassifierGuidance(classifier, 0, on="x1_hat").velocity(v, x, t, torch.tensor(0.05, dtype=D))
    torch.testing.assert_close(seen[0], _denoiser("cosine", x, t), rtol=0, atol=1e-10)


def test_exact_guidance_on_a_cosine_model_reproduces_the_exact_posterior():
    post = MIX.posterior(A.A, Y, SIGMA)
    x0 = torch.randn(600, 2, generator=seeded(7), dtype=D)
    x = sample(PathVelocity(MIX.velocity, "cosine"), x0, steps=60, guidance=ExactPosteriorGuidance(MIX, A, Y, SIGMA))
    ref = post.sample(600, seeded(8))
    assert energy_distance(x, ref) < 3 * energy_distance(post.sample(600, seeded(9)), ref) + 5e-3
    torch.testing.assert_close(x.mean(0), post.weights @ post.means, atol=0.08, rtol=0)


@pytest.mark.parametrize("path", ["cosine", "vp"])
def test_default_is_exact_for_a_gaussian_prior_on_other_paths(path):
    """For a Gaussian prior the proposal is the exact posterior ODE on any affine path."""
    g = GaussianMixture([1.0], [[0.5, -0.3, 0.2]], [[[1.0, 0.6, 0.0], [0.6, 0.8, 0.2], [0.0, 0.2, 0.5]]])
    op = Dense(torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]], dtype=D))
    y = torch.tensor([0.7, -0.2], dtype=D)
    post = g.posterior(op.A, y, 0.2)
    x0 = torch.randn(2000, 3, generator=seeded(10), dtype=D)
    x = sample(PathVelocity(g.velocity, path), x0, steps=60, guidance=SteerflowDefault(op, y, 0.2),
               generator=seeded(11))
    torch.testing.assert_close(x.mean(0), post.means[0], atol=0.04, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), post.covs[0], atol=0.04, rtol=0)


def test_path_argument_for_a_plain_field_and_a_conflicting_one():
    v = PathVelocity(MIX.velocity, "cosine")
    plain = lambda x, t: v(x, t)  # noqa: E731 — a field that does not carry its path
    x0 = torch.randn(64, 2, generator=seeded(12), dtype=D)
    want = sample(v, x0, steps=10, guidance=DPS(A, Y, SIGMA))
    torch.testing.assert_close(sample(plain, x0, steps=10, guidance=DPS(A, Y, SIGMA, path="cosine")), want)
    with pytest.raises(ValueError, match="trained with AffinePath"):
        sample(v, x0, steps=10, guidance=DPS(A, Y, SIGMA, path="linear"))


def test_the_models_path_is_read_once_per_solve_not_at_every_step():
    reads = []

    class Model:  # a cosine-path model that counts reads of its path
        @property
        def path(self):
            reads.append(1)
            return get_path("cosine")

        def __call__(self, x, t):
            return PathVelocity(MIX.velocity, "cosine")(x, t)

    x0 = torch.randn(16, 2, generator=seeded(15), dtype=D)
    for g in (DPS(A, Y, SIGMA), SteerflowDefault(A, Y, SIGMA), ClassifierGuidance(lambda x, t: x, 0)):
        reads.clear()
        sample(Model(), x0, steps=20, method="midpoint", guidance=g)
        assert len(reads) <= 2, f"{type(g).__name__}: {len(reads)} reads"  # check() and initial()


def test_non_affine_paths_are_refused():
    from steerflow.manifolds import Sphere

    with pytest.raises(TypeError, match="affine path"):
        DPS(A, Y, SIGMA, path=GeodesicPath(Sphere(2)))

    class OnSphere:
        path = GeodesicPath(Sphere(2))

        def __call__(self, x, t):
            return MIX.velocity(x, t)

    with pytest.raises(TypeError, match="affine path"):
        sample(OnSphere(), torch.randn(4, 2, dtype=D), steps=2, guidance=SteerflowDefault(A, Y, SIGMA))


FIXED_STEP = {
    "flowchef": lambda: FlowChef(A, Y, SIGMA), "dreamguider": lambda: Dreamguider(A, Y, SIGMA),
    "enkg": lambda: EnKG(A, Y, SIGMA), "pnpflow": lambda: PnPFlow(A, Y, SIGMA), "dds": lambda: DDS(A, Y, SIGMA),
}


@pytest.mark.parametrize("name", list(FIXED_STEP))
def test_update_then_step_methods_refuse_adaptive_solvers(name):
    g = FIXED_STEP[name]()
    with pytest.raises(ValueError, match="needs a fixed-step solver"):
        g.check(MIX.velocity, solver="dopri5")
    g.check(MIX.velocity, solver="heun")
    with pytest.raises(ValueError, match="needs a fixed-step solver"):  # through the loop (it calls check once)
        sample(MIX.velocity, torch.randn(8, 2, dtype=D), steps=2, method=Dopri5(max_steps=50), guidance=g)


@pytest.mark.parametrize("make", [lambda: DPS(A, Y, SIGMA), lambda: OTODE(A, Y, SIGMA),
                                  lambda: SteerflowDefault(A, Y, SIGMA), lambda: DFlow(A, Y, SIGMA, n_iter=1)],
                         ids=["dps", "otode", "default", "dflow"])
def test_velocity_guidances_accept_adaptive_solvers(make):
    make().check(MIX.velocity, solver="dopri5")


def test_polynomial_path_has_no_prediction_at_t0_and_is_stepped_unguided():
    """α σ̇ − σ α̇ = 0 at t = 0 on the polynomial path (v = 0 there): no NaN from x̂_1, the solve still steers."""
    v = PathVelocity(MIX.velocity, "polynomial")
    x0 = torch.randn(128, 2, generator=seeded(13), dtype=D)
    base = sample(v, x0, steps=30)
    for g in (FlowChef(A, Y, SIGMA, step_size=0.2), SteerflowDefault(A, Y, SIGMA), DDS(A, Y, SIGMA, gamma=1.0)):
        x = sample(v, x0, steps=30, guidance=g, generator=seeded(14))
        assert float((x[:, 0] - Y).pow(2).mean()) < 0.5 * float((base[:, 0] - Y).pow(2).mean())


def test_the_path_a_checkpoint_records_is_read_back():
    """``train`` records a path by name or by repr; a steering caller rebuilds it (and never guesses linear)."""
    for name in ("linear", "cosine", "vp"):
        for record in (name, repr(get_path(name))):
            assert repr(path_from_record(record)) == repr(get_path(name))
    assert path_from_record("GeodesicPath(Sphere(2))") is None and path_from_record(None) is None
