"""Affine conditional probability paths and the conversions between parameterisations.

``x_t = alpha_t x_1 + sigma_t x_0``, target velocity ``u_t = d_alpha_t x_1 + d_sigma_t x_0``
(Lipman et al. 2023, eq. 20; Liu et al. 2022 for the linear case ``x_t = t x_1 + (1 - t) x_0``,
``u_t = x_1 - x_0``). With ``x_0 ~ N(0, I)`` the marginal velocity is ``v(x, t) = E[u_t | x_t = x]``,
and a velocity prediction converts exactly to a data prediction ``x̂_1`` and a noise prediction
``x̂_0`` by solving the 2x2 linear system ``[x; v] = [[alpha, sigma]; [d_alpha, d_sigma]] [x̂_1; x̂_0]``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .._types import expand_t
from .schedules import AbstractSchedule, LinearSchedule, ScheduleValues, get_schedule


@dataclass(frozen=True)
class PathSample:
    """One draw of a conditional path: ``x_t`` (b, *d), target ``u_t`` (b, *d), times ``t`` (b,)."""

    x_t: Tensor
    u_t: Tensor
    t: Tensor
    x_0: Tensor
    x_1: Tensor


class AffinePath:
    """The path ``x_t = alpha_t x_1 + sigma_t x_0`` for a schedule (name or object)."""

    def __init__(self, schedule: str | AbstractSchedule = "linear") -> None:
        self.schedule = get_schedule(schedule)

    def __repr__(self) -> str:
        return f"AffinePath({self.schedule.name!r})"

    def coefficients(self, t: Tensor, like: Tensor) -> ScheduleValues:
        s = self.schedule(expand_t(t, like))
        return s

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        """Return ``PathSample(x_t, u_t, t)`` for paired ``x_0, x_1`` (b, *d) and ``t`` (b,)."""
        if x_0.shape != x_1.shape:
            raise ValueError(f"x_0 and x_1 must have the same shape, got {tuple(x_0.shape)} and {tuple(x_1.shape)}")
        if t.shape != (x_0.shape[0],):
            raise ValueError(f"t must have shape ({x_0.shape[0]},), got {tuple(t.shape)}")
        c = self.coefficients(t, x_0)
        x_t = c.alpha_t * x_1 + c.sigma_t * x_0
        u_t = c.d_alpha_t * x_1 + c.d_sigma_t * x_0
        return PathSample(x_t=x_t, u_t=u_t, t=t, x_0=x_0, x_1=x_1)

    # --- conversions -------------------------------------------------------------------------
    def x1_from_velocity(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Data prediction ``x̂_1 = (d_sigma x - sigma v) / (alpha d_sigma - sigma d_alpha)``."""
        c = self.coefficients(t, x_t)
        return (c.d_sigma_t * x_t - c.sigma_t * v) / (c.alpha_t * c.d_sigma_t - c.sigma_t * c.d_alpha_t)

    def x0_from_velocity(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Noise prediction ``x̂_0 = (alpha v - d_alpha x) / (alpha d_sigma - sigma d_alpha)``."""
        c = self.coefficients(t, x_t)
        return (c.alpha_t * v - c.d_alpha_t * x_t) / (c.alpha_t * c.d_sigma_t - c.sigma_t * c.d_alpha_t)

    def velocity_from_x1(self, x1: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``v = d_alpha x̂_1 + d_sigma (x - alpha x̂_1) / sigma`` (undefined at ``sigma_t = 0``)."""
        c = self.coefficients(t, x_t)
        return c.d_alpha_t * x1 + c.d_sigma_t * (x_t - c.alpha_t * x1) / c.sigma_t

    def velocity_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``v = d_alpha (x - sigma x̂_0) / alpha + d_sigma x̂_0`` (undefined at ``alpha_t = 0``)."""
        c = self.coefficients(t, x_t)
        return c.d_alpha_t * (x_t - c.sigma_t * x0) / c.alpha_t + c.d_sigma_t * x0

    def score_from_velocity(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Score of the marginal for a standard-normal source: ``∇ log p_t(x) = -x̂_0 / sigma_t``."""
        c = self.coefficients(t, x_t)
        return -self.x0_from_velocity(v, x_t, t) / c.sigma_t

    def velocity_from_score(self, score: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Inverse of :meth:`score_from_velocity`: ``x̂_0 = -sigma score`` then ``velocity_from_x0``."""
        c = self.coefficients(t, x_t)
        return self.velocity_from_x0(-c.sigma_t * score, x_t, t)


class LinearPath(AffinePath):
    """Rectified flow path ``x_t = t x_1 + (1 - t) x_0``, ``u_t = x_1 - x_0`` (Liu et al. 2022)."""

    def __init__(self) -> None:
        super().__init__(LinearSchedule())

    def __repr__(self) -> str:
        return "LinearPath()"

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        if x_0.shape != x_1.shape:
            raise ValueError(f"x_0 and x_1 must have the same shape, got {tuple(x_0.shape)} and {tuple(x_1.shape)}")
        if t.shape != (x_0.shape[0],):
            raise ValueError(f"t must have shape ({x_0.shape[0]},), got {tuple(t.shape)}")
        tt = expand_t(t, x_0)
        return PathSample(x_t=tt * x_1 + (1 - tt) * x_0, u_t=x_1 - x_0, t=t, x_0=x_0, x_1=x_1)

    def x1_from_velocity(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``x̂_1 = x + (1 - t) v``."""
        return x_t + (1 - expand_t(t, x_t)) * v

    def x0_from_velocity(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``x̂_0 = x - t v``."""
        return x_t - expand_t(t, x_t) * v


PATHS = {"linear": LinearPath, "cosine": lambda: AffinePath("cosine"), "vp": lambda: AffinePath("vp"),
         "polynomial": lambda: AffinePath("polynomial")}


def get_path(name: str | AffinePath) -> AffinePath:
    """Look a path up by name (``linear``, ``cosine``, ``vp``, ``polynomial``) or pass one through."""
    if isinstance(name, AffinePath):
        return name
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; expected one of {sorted(PATHS)}")
    return PATHS[name]()


class PathVelocity:
    """A linear-path velocity field seen on another affine path; it carries that path as ``.path``.

    An affine path is the linear one rescaled and run on another clock: ``x_t = α x_1 + σ x_0 = c x^lin_s`` with
    ``c = α + σ`` and ``s = α / (α + σ)`` (Kingma et al. 2021, VDM, §4; Lipman et al. 2023, §4.1). Hence

        v(x, t) = (ċ / c) x + c ṡ v_lin(x / c, s),   ċ = α̇ + σ̇,   ṡ = (α̇ σ − α σ̇) / c²,

    which is exact for an exact ``v_lin`` (e.g. :meth:`GaussianMixture.velocity`): the oracle of a model trained
    on ``path``. ``v_lin(x, t)`` with ``t`` (b,); the result takes ``(x, t)`` the same way.
    """

    def __init__(self, v_linear, path: AffinePath | str) -> None:
        if not callable(v_linear):
            raise TypeError(f"v_linear must be a velocity field v(x, t), got {type(v_linear).__name__}")
        self.v_linear, self.path = v_linear, get_path(path)

    def __repr__(self) -> str:
        return f"PathVelocity({self.path!r})"

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        c = self.path.coefficients(t, x)
        k = c.alpha_t + c.sigma_t
        s = (c.alpha_t / k).reshape(-1)
        d_s = (c.d_alpha_t * c.sigma_t - c.alpha_t * c.d_sigma_t) / k**2
        return (c.d_alpha_t + c.d_sigma_t) / k * x + k * d_s * self.v_linear(x / k, s)


def path_from_record(record) -> AffinePath | None:
    """The affine path a training run recorded (``config["training"]["path"]`` of a checkpoint): a name
    (``"cosine"``) or the repr ``train`` writes (``"LinearPath()"``, ``"AffinePath('vp')"``); ``None`` for
    anything else (a geodesic path, no record), which a caller treats as "unknown", not as linear."""
    if isinstance(record, AffinePath):
        return record
    if not isinstance(record, str):
        return None
    text = record.strip()
    if text == "LinearPath()":
        return LinearPath()
    if text.startswith("AffinePath(") and text.endswith(")"):
        text = text[len("AffinePath("):-1].strip().strip("'\"")
    return get_path(text) if text in PATHS else None
