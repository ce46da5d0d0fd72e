"""Thread counts of the numba kernels: the default (physical cores) and applying a count per call."""
from __future__ import annotations

import threading

import numba
import psutil

_applied = threading.local()   # the count last applied on this thread (numba's setting is per thread)


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or numba.config.NUMBA_NUM_THREADS


def use_threads(n: int) -> None:
    """Run the next parallel kernel on n threads (at most numba's pool). numba.set_num_threads costs
    ~15 us, several times per layer at decode, so it is only called when the count changes."""
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    if getattr(_applied, "n", None) != n:
        numba.set_num_threads(n)
        _applied.n = n
