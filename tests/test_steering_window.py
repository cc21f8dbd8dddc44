"""The time window ``(start, stop)`` of every guidance method: outside it the solve is the unguided flow, exactly."""
import pytest
import torch

from steerflow import Cost, sample
from steerflow.steering import FULL_WINDOW, GUIDANCES, Compose, SteerflowDefault, check_window, get_guidance
from steerflow.steering.base import AbstractGuidance
from steerflow.steering.tasks import METHODS, build_method

from guidance_helpers import A, D, MIX, SIGMA, Y, seeded

STEPS = 10  # grid 0, 0.1, ..., 1: t = 0.5 is the grid point K
K = 5
ARGS = {"exact": (MIX, A, Y, SIGMA)}
SMALL = {"dflow": {"inner_steps": 3, "n_iter": 2}, "lookahead": {"k": 2}, "dds": {"gamma": 1.0, "eta": 0.5},
         "default": {"resample": True, "n_clusters": 2}}


def _make(name, **kwargs):
    return get_guidance(name, *ARGS.get(name, (A, Y, SIGMA)), **SMALL.get(name, {}), **kwargs)


def _solve(guidance, x0=None, ts=None, method="euler", traj=True, cost=None):
    x0 = torch.randn(128, 2, generator=seeded(0), dtype=D) if x0 is None else x0
    ts = torch.linspace(0, 1, STEPS + 1, dtype=D) if ts is None else ts
    return sample(MIX.velocity, x0, ts=ts, method=method, guidance=guidance, generator=seeded(1),
                  return_trajectory=traj, cost=cost)


@pytest.mark.parametrize("name", sorted(GUIDANCES))
def test_the_full_window_is_the_default_and_changes_nothing(name):
    a, b = _solve(_make(name)), _solve(_make(name, window=(0, 1)))
    assert _make(name).window == FULL_WINDOW
    assert torch.equal(a.xs, b.xs)


@pytest.mark.parametrize("name", sorted(GUIDANCES))
def test_before_the_window_the_state_is_the_unguided_one(name):
    plain = _solve(None)
    guided = _solve(_make(name, window=(0.5, 1.0)))
    # up to t = 0.5 no guided velocity is taken (euler reads v at the left end of each step) ...
    assert torch.equal(guided.xs[:K + 1], plain.xs[:K + 1])
    # ... and after it the method acts (D-Flow acts only at t = 0, outside this window: it stays unguided)
    assert torch.equal(guided.xs, plain.xs) == (name == "dflow")


@pytest.mark.parametrize("name", sorted(n for n in GUIDANCES if n != "dflow"))
def test_after_the_window_the_solve_is_the_unguided_flow_from_where_it_stands(name):
    cost = Cost()
    guided = _solve(_make(name, window=(0.0, 0.5)), cost=cost)
    rest = _solve(None, x0=guided.xs[K], ts=guided.ts[K:])
    if name == "default":  # the importance resampling at t = 1 picks (and repeats) rows of the unguided end state
        assert torch.equal(guided.xs[K:-1], rest.xs[:-1])
        assert all(bool((rest.x == row).all(1).any()) for row in guided.xs[-1])
    else:
        assert torch.equal(guided.xs[K:], rest.xs)
    assert not torch.equal(guided.xs[:K + 1], _solve(None).xs[:K + 1])  # it did act inside the window


def test_a_window_splits_the_guided_solve_into_unguided_and_guided_parts():
    """A memoryless method in the window (0.5, 1) equals the unguided solve to 0.5 followed by the guided solve
    from there (same guidance, same random stream), also with midpoint steps (both stages left of 0.5)."""
    for method in ("euler", "midpoint"):
        for name in ("flowchef", "dps", "otode", "pnpflow", "dreamguider"):
            whole = _solve(_make(name, window=(0.5, 1.0)), method=method)
            first = _solve(None, method=method, traj=False, ts=whole.ts[:K + 1])
            second = _solve(_make(name), x0=first, ts=whole.ts[K:], method=method)
            assert torch.equal(whole.xs[K], first)
            assert torch.equal(whole.xs[K:], second.xs), (name, method)


def test_stop_one_includes_t_one_and_the_velocity_hook_switches_at_start():
    g = _make("dps", window=(0.25, 1.0))
    v = MIX.velocity
    x = torch.randn(8, 2, generator=seeded(3), dtype=D)
    dt = torch.tensor(0.1, dtype=D)
    for t, acts in ((0.0, False), (0.2499, False), (0.25, True), (0.9, True), (1.0, True)):
        tt = torch.full((8,), t, dtype=D)
        g.initial(v, x, torch.linspace(0, 1, 11, dtype=D))
        assert g.acts_at(tt) == acts
        same = torch.equal(g.velocity(v, x, tt, dt), v(x, tt))
        assert same != acts
    h = _make("dps", window=(0.0, 0.5))
    assert h.acts_at(0.0) and h.acts_at(0.4999) and not h.acts_at(0.5) and not h.acts_at(1.0)


def test_windows_compose():
    left, right = _make("flowchef", window=(0.0, 0.5)), _make("flowchef", window=(0.5, 1.0))
    both = _solve(Compose(left, right))
    assert torch.equal(both.xs, _solve(_make("flowchef")).xs)


@pytest.mark.parametrize("window", [(0.5, 0.5), (0.6, 0.4), (-0.1, 0.5), (0.2, 1.5), (float("nan"), 1.0),
                                    (0.0, float("inf")), (0.1, 0.2, 0.3), (0.5,)])
def test_invalid_windows_are_refused(window):
    with pytest.raises(ValueError, match="window"):
        check_window(window)
    for name in GUIDANCES:
        with pytest.raises(ValueError, match="window"):
            _make(name, window=window)


@pytest.mark.parametrize("window", [0.5, "0,1", None, ("a", 1.0), (True, 1.0)])
def test_windows_of_the_wrong_type_are_refused(window):
    with pytest.raises(TypeError, match="window"):
        check_window(window)
    with pytest.raises(TypeError, match="window"):
        SteerflowDefault(A, Y, SIGMA, window=window)


def test_check_window_returns_floats():
    assert check_window((0, 1)) == (0.0, 1.0) and check_window([0.25, torch.tensor(0.75)]) == (0.25, 0.75)


def test_build_method_passes_the_window():
    for name in METHODS[1:]:
        assert build_method(name, A, Y, SIGMA, window=(0.2, 0.8)).window == (0.2, 0.8)
        assert build_method(name, A, Y, SIGMA).window == FULL_WINDOW
    with pytest.raises(ValueError, match="unknown method"):
        build_method("exact", A, Y, SIGMA)


def test_a_guidance_without_its_own_velocity_inherits_the_gate():
    class Push(AbstractGuidance):
        def __init__(self, window):
            self.window = check_window(window)

        def guided_velocity(self, v, x, t, dt, *, generator=None, cost=None):
            return v(x, t) + 1.0

    plain, pushed = _solve(None), _solve(Push((0.3, 0.6)))
    # euler: steps starting at t = 0.3, 0.4, 0.5 are pushed by +1 in each coordinate, dt = 0.1 each
    torch.testing.assert_close(pushed.xs[:4], plain.xs[:4], rtol=0, atol=0)
    assert not torch.equal(pushed.xs[4], plain.xs[4])
