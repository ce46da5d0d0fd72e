"""Thread counts of the numba kernels: the default (physical cores) and applying a count per call."""
from __future__ import annotations

import numba
import psutil


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or numba.config.NUMBA_NUM_THREADS


def use_threads(n: int) -> None:
    """Run the next parallel kernel on n threads (at most numba's pool)."""
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
