"""The compiled assignment solver ``_lap.c`` (Jonker–Volgenant, with an auction warm start) and its settings.

The extension is optional (``setup.py`` builds it where a C compiler is present); :func:`available`
says whether it loaded. It releases the GIL while it solves, so coupling threads run in parallel.
"""
from __future__ import annotations

import functools

import numpy as np

# ε-scaling schedule as fractions of the costs' spread (the median row range, computed in C), and candidate-list
# lengths by problem size. The default start (None) lets the solver choose: no auction below 64 points or on costs
# with few distinct values (ties make the auction's prices crawl by ε), else 0.1 (``_lap.c``, AUCTION_MIN_N).
# Any values give the exact optimum.
EPS_START, EPS_END, THETA = None, 1e-6, 10.0

# what stats["path"] means: the row minima already formed a permutation; Jonker–Volgenant alone; auction warm start
PATHS = ("row-minima", "jonker-volgenant", "auction+jonker-volgenant")


def _candidates(n: int) -> int:
    return 0 if n < 512 else 4 if n < 2048 else 8


@functools.lru_cache(maxsize=1)
def _library():
    try:
        from . import _lap
    except ImportError:
        return None
    return _lap


def _lib():
    """The compiled module, or a RuntimeError saying how to build it."""
    lib = _library()
    if lib is None:
        raise RuntimeError("steerflow's compiled assignment solver is not built (reinstall with a C compiler: "
                           "pip install -e .)")
    return lib


def available() -> bool:
    """Whether the compiled solver was built and loads."""
    return _library() is not None


def solve(C: np.ndarray, candidates: int | None = None, eps_start: float | None = EPS_START,
          eps_end: float = EPS_END) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The solver on a C-contiguous square finite float64 ``C`` (unchecked: NaN would not terminate).

    Returns ``x`` (row → column), ``y`` (column → row), the column duals ``v`` and the raw counters."""
    x, y, v, stats, settings = _outputs(C.shape[0], candidates, eps_start, eps_end)
    _lib().assign(C, x, y, v, stats, *settings)
    return x, y, v, stats


def solve_points(a: np.ndarray, b: np.ndarray, cost: str, candidates: int | None = None,
                 eps_start: float | None = EPS_START, eps_end: float = EPS_END):
    """:func:`solve` on the costs ``|a_i − b_j|²`` (``cost="sqeuclidean"``) or ``|a_i − b_j|`` (``"euclidean"``)
    between the rows of C-contiguous finite float64 ``a`` and ``b`` (n, D), formed in C from explicit differences
    (no cancellation, no n × n array in Python). Raises ValueError when a cost overflows."""
    n, D = a.shape
    x, y, v, stats, settings = _outputs(n, candidates, eps_start, eps_end)
    _lib().assign_points(a, b, D, cost == "euclidean", x, y, v, stats, *settings)
    return x, y, v, stats


def _outputs(n: int, candidates: int | None, eps_start: float | None, eps_end: float):
    k = _candidates(n) if candidates is None else candidates
    settings = (k, -1.0 if eps_start is None else eps_start, eps_end, THETA)
    return (np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float64),
            np.empty(4, dtype=np.int64), settings)


def assign(C: np.ndarray, *, candidates: int | None = None, eps_start: float | None = EPS_START,
           eps_end: float = EPS_END) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Exact ``argmin_x Σ_i C[i, x[i]]`` over permutations of a square finite float64 matrix (checked).

    Returns ``x`` (row → column), the column duals ``v`` (``C_ij − v_j ≥ C_{i x_i} − v_{x_i}`` for all
    ``j``: the optimality certificate) and counters ``{"bids", "rescans", "augmentations", "path"}`` (``path``
    indexes :data:`PATHS`). ``eps_start``/``eps_end`` are fractions of the costs' spread (the median row range;
    ``eps_start = 0`` skips the auction, ``None`` lets the solver choose).
    """
    _lib()
    C = np.ascontiguousarray(C, dtype=np.float64)
    if C.ndim != 2 or C.shape[1] != C.shape[0]:
        raise ValueError(f"C must be a square (n, n) matrix, got {C.shape}")
    if not np.isfinite(C).all():
        raise ValueError("the cost matrix holds NaN or inf")
    x, _, v, stats = solve(C, candidates, eps_start, eps_end)
    return x, v, {"bids": int(stats[0]), "rescans": int(stats[1]), "augmentations": int(stats[2]),
                  "path": int(stats[3])}
