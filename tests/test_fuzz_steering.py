"""Fuzz every guidance in ``GUIDANCES``: random operators and shapes, float32/float64, single-element batches,
NaN/inf, integer and wrongly shaped measurements.

Each call either works (a finite result of the start state's shape and dtype, within the range check) or raises
``ValueError``/``TypeError`` (``FloatingPointError`` for a diverged solve) from steerflow's own code with a
message — never an error from inside torch, never a silent non-finite or exploding result.
"""
import math
import random
import traceback
from pathlib import Path

import pytest
import torch

from steerflow import sample
from steerflow.data.mixture import GaussianMixture
from steerflow.steering.guidance import GUIDANCES, get_guidance
from steerflow.steering.operators import AvgPool, Blur, Dense, Identity, Mask, NonLinear

PACKAGE = str(Path(__file__).resolve().parents[1] / "steerflow")


def _gauss_field(mu: float, s2: float):
    """Exact velocity of data ``N(mu, s2 I)`` on the linear path, for any shape and dtype."""

    def v(x, t):
        tt = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        C = tt**2 * s2 + (1 - tt) ** 2
        d = x - tt * mu
        return mu + tt * s2 * d / C - (1 - tt) * d / C

    return v


def _setups():
    g = torch.Generator().manual_seed(0)
    return {
        "dense-1d": (Dense(torch.tensor([[2.0]], dtype=torch.float64)), (1,)),
        "dense-3d": (Dense(torch.randn(2, 3, generator=g, dtype=torch.float64)), (3,)),
        "dense-float32": (Dense(torch.randn(2, 3, generator=g)), (3,)),
        "dense-rank-deficient": (Dense(torch.tensor([[0.6, 0.8]], dtype=torch.float64)), (2,)),
        "mask": (Mask.coordinates(3, [0, 2]), (3,)),
        "image-mask": (Mask.random((1, 4, 4), 0.5, g), (1, 4, 4)),
        "avgpool": (AvgPool(2, (1, 4, 4)), (1, 4, 4)),
        "blur": (Blur.gaussian(3, 1.0, (1, 4, 4)), (1, 4, 4)),
        # no in_shape: y's shape is only checked against A(x) during the solve
        "avgpool-any": (AvgPool(2), (1, 4, 4)),
        "identity-any": (Identity(), (2,)),
        "nonlinear": (NonLinear(lambda x: x[:, :1] ** 3), (2,)),
    }


def _make(name, op, y, sigma, shape):
    if name == "exact":
        d = math.prod(shape)
        mix = GaussianMixture([0.5, 0.5], [[-1.0] * d, [1.0] * d], [0.3, 0.3])
        return get_guidance(name, mix, op, y, sigma)
    kwargs = {"dflow": dict(inner_steps=2, n_iter=2), "lookahead": dict(k=2)}.get(name, {})
    return get_guidance(name, op, y, sigma, **kwargs)


Y_KINDS = ["ok", "batched", "leading-one", "wrong-shape", "other-batch", "nan", "inf", "integer", "zero-dim"]
GOOD_Y = ("ok", "batched", "leading-one", "integer", "zero-dim")


def _measurement(kind, y_clean: torch.Tensor, b: int):
    m = y_clean.shape
    if kind == "ok":
        return y_clean
    if kind == "batched":
        return y_clean.expand(b, *m).clone()
    if kind == "leading-one":
        return y_clean[None]
    if kind == "wrong-shape":
        return torch.zeros(*m[:-1], m[-1] + 1, dtype=y_clean.dtype)
    if kind == "other-batch":
        return y_clean.expand(b + 2, *m).clone()
    if kind == "nan":
        return torch.full(m, float("nan"), dtype=y_clean.dtype)
    if kind == "inf":
        return torch.full(m, float("inf"), dtype=y_clean.dtype)
    if kind == "integer":
        return y_clean.round().long()
    return torch.tensor(0.5, dtype=y_clean.dtype)


def _check_error(e: BaseException, where: str) -> None:
    allowed = (ValueError, TypeError, FloatingPointError)
    frame = traceback.extract_tb(e.__traceback__)[-1]
    assert isinstance(e, allowed), f"{where}: {type(e).__name__} from {frame.filename}:{frame.lineno}: {e}"
    assert frame.filename.startswith(PACKAGE), f"{where}: {type(e).__name__} raised inside {frame.filename}: {e}"
    assert len(str(e)) > 20, f"{where}: terse message {str(e)!r}"
    if isinstance(e, FloatingPointError):
        assert "diverged" in str(e) or "non-finite" in str(e), f"{where}: {e}"


@pytest.mark.parametrize("name", sorted(GUIDANCES))
def test_fuzz_guidance(name):
    rng = random.Random(name)
    setups = _setups()
    v = _gauss_field(0.3, 0.5)
    outcomes = {"ran": 0, "refused": 0}
    cases = [(k, dt, "ok") for k in Y_KINDS for dt in (torch.float32, torch.float64)]
    cases += [("ok", torch.float64, state) for state in ("wrong-state", "empty", "bad-sigma")]
    for i, (kind, dtype, state) in enumerate(cases):
        setup = rng.choice(sorted(setups))
        op, shape = setups[setup]
        b = 0 if state == "empty" else (1, 2, 5, 16)[i % 4]
        sigma = float("nan") if state == "bad-sigma" else rng.choice([0.0, 0.1])
        gen = torch.Generator().manual_seed(i)
        x_true = (0.3 + 0.7 * torch.randn(1, *shape, generator=gen, dtype=torch.float64))
        y = _measurement(kind, op(x_true)[0].to(dtype), b)
        where = f"{name} on {setup}, y {kind} {tuple(y.shape)} {y.dtype}, sigma={sigma}, b={b}, {dtype}, {state}"
        x_shape = (*shape[:-1], shape[-1] + 2) if state == "wrong-state" else shape
        try:
            g = _make(name, op, y, sigma, shape)
            x0 = torch.randn(b, *x_shape, generator=gen, dtype=dtype)
            x = sample(v, x0, steps=3, guidance=g, generator=gen)
        except Exception as e:  # noqa: BLE001 — the point is to classify every failure
            _check_error(e, where)
            outcomes["refused"] += 1
            continue
        outcomes["ran"] += 1
        # an operator without in_shape measures any state it can act on
        assert kind in GOOD_Y and (state in ("ok", "empty") or state == "wrong-state" and op.in_shape is None), \
            f"{where}: accepted a bad input"
        assert x.dtype == dtype and x.shape == x0.shape, f"{where}: returned {x.dtype} {tuple(x.shape)}"
        if not x.numel():
            continue
        assert torch.isfinite(x).all(), f"{where}: non-finite result"
        scale = max(1.0, float(x0.abs().max()), float(y.abs().max()) if y.numel() else 0.0)
        assert float(x.abs().max()) < 1e3 * scale, f"{where}: exploded to {float(x.abs().max()):.3g}"
    assert outcomes["ran"] >= 3, outcomes  # the fuzz exercises the methods, not only their argument checks


NAN = float("nan")
BAD_SETTINGS = {
    "exact": [dict(t_min=0.0), dict(t_min=-1.0), dict(t_min=NAN)],
    "flowchef": [dict(step_size=NAN), dict(step_size=-1.0), dict(n_inner=0), dict(schedule="cosine")],
    "dps": [dict(scale=NAN), dict(scale=-1.0), dict(t_min=0.0), dict(scale="big")],
    "lookahead": [dict(k=0), dict(k=2.5), dict(scale=float("inf"))],
    "dflow": [dict(inner_steps=0), dict(n_iter=0), dict(lr=-1.0), dict(lr=0.0), dict(reg=NAN)],
    "dreamguider": [dict(scale=NAN), dict(scale=-1.0)],
    "enkg": [dict(scale=NAN), dict(ensemble_size=1), dict(predictor_steps=0), dict(n_updates=0)],
    "dds": [dict(n_cg=0), dict(gamma=-1.0), dict(gamma=NAN), dict(eta=2.0)],
    "otode": [dict(scale=NAN), dict(t_min=0.0), dict(t_min=-1.0)],
    "pnpflow": [dict(step_size=-1.0), dict(step_size=NAN), dict(alpha=-1.0)],
    "default": [dict(scale=NAN), dict(jitter=-1.0), dict(prior_var=NAN), dict(covariance="full"), dict(n_clusters=0)],
}


@pytest.mark.parametrize("name", sorted(GUIDANCES))
def test_fuzz_nonsense_settings_are_refused_when_built(name):
    op, shape = _setups()["dense-3d"]
    y = op(torch.ones(1, *shape, dtype=torch.float64))[0]
    for kw in BAD_SETTINGS[name]:
        with pytest.raises((ValueError, TypeError)) as info:
            if name == "exact":
                mix = GaussianMixture([1.0], [[0.0] * 3], [1.0])
                get_guidance(name, mix, op, y, 0.1, **kw)
            else:
                get_guidance(name, op, y, 0.1, **kw)
        _check_error(info.value, f"{name} {kw}")
