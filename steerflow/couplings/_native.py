"""ctypes binding of the compiled assignment solver ``_lap.c`` (auction warm start + Jonker–Volgenant).

The extension is optional (``setup.py`` builds it where a C compiler is present); :func:`available`
says whether it loaded. ctypes releases the GIL during the call, so coupling threads run in parallel.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

# ε-scaling schedule as fractions of the costs' spread, and candidate-list lengths by problem size: tuned on
# N(0, I) → moons batches of 32 … 4096, both bench_ot.py's Gaussian-noise moons and steerflow.data's moons, whose
# thin jitter bands made a start at 1e-2 cost 1.5× more (3.3 vs 1.95 ms at 256, 65 vs 37 ms at 1024, a one-off
# sweep of 0.01 / 0.03 / 0.1 / 0.3); 0.1 was as fast or faster on 8 gaussians → moons, checkerboard and
# 16/64/784-D Gaussian batches too (bench_ot.py times the result on both moons). Any values give the exact optimum
EPS_START, EPS_END, THETA = 1e-1, 1e-6, 10.0


def _candidates(n: int) -> int:
    return 0 if n < 512 else 4 if n < 2048 else 8


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    try:
        from . import _lap
    except ImportError:
        return None
    lib = ctypes.CDLL(_lap.__file__)
    fn = lib.steerflow_assign
    p = ctypes.c_void_p
    fn.argtypes = [p, ctypes.c_int64, p, p, ctypes.c_int64, ctypes.c_double, ctypes.c_double, ctypes.c_double, p]
    fn.restype = ctypes.c_int
    return lib


def _spread(C: np.ndarray) -> float:
    """The ε schedule's unit: the median spread ``max_j C_ij − min_j C_ij`` of about 64 evenly spaced rows.

    Robust to a few outlying entries (the whole matrix's range would make every ε too coarse and leave the
    work to the augmenting paths); 0 when every sampled row is constant, which skips the auction."""
    if C.size == 0:
        return 0.0
    rows = C[:: max(1, C.shape[0] // 64)]  # every ⌊n/64⌋-th row: all rows below 128, else 64 to 127 of them
    return float(np.median(rows.max(1) - rows.min(1)))


def available() -> bool:
    """Whether the compiled solver was built and loads."""
    return _library() is not None


def assign(C: np.ndarray, *, candidates: int | None = None, eps_start: float = EPS_START,
           eps_end: float = EPS_END, check_finite: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Exact ``argmin_x Σ_i C[i, x[i]]`` over permutations of a square finite float64 matrix.

    Returns ``x`` (row → column), the column duals ``v`` (``C_ij − v_j ≥ C_{i x_i} − v_{x_i}`` for all
    ``j``: the optimality certificate) and counters ``{"bids", "rescans", "augmentations"}``.
    ``eps_start``/``eps_end`` are fractions of the costs' spread (:func:`_spread`; ``eps_start = 0`` skips the
    auction). ``check_finite=False`` skips the O(n²) check for callers that made it (NaN would not terminate).
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("steerflow's compiled assignment solver is not built (reinstall with a C compiler: "
                           "pip install -e .)")
    C = np.ascontiguousarray(C, dtype=np.float64)
    n = C.shape[0]
    if C.ndim != 2 or C.shape[1] != n:
        raise ValueError(f"C must be a square (n, n) matrix, got {C.shape}")
    if check_finite and not np.isfinite(C).all():
        raise ValueError("the cost matrix holds NaN or inf")
    x = np.empty(n, dtype=np.int64)
    v = np.zeros(n, dtype=np.float64)
    stats = np.zeros(3, dtype=np.int64)
    span = _spread(C)
    k = _candidates(n) if candidates is None else candidates
    rc = lib.steerflow_assign(C.ctypes.data, n, x.ctypes.data, v.ctypes.data, k, eps_start * span,
                              eps_end * span, THETA, stats.ctypes.data)
    if rc != 0:
        raise MemoryError(f"the assignment solver ran out of memory at n = {n}")
    return x, v, {"bids": int(stats[0]), "rescans": int(stats[1]), "augmentations": int(stats[2])}
