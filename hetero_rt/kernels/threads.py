"""Thread counts of the numba kernels: the default (physical cores) and applying a count per call."""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n inside the block and restored after (nothing is called when it
    is already n). Decode runs torch on one thread (Runtime.forward): its ops there are tiny, and
    torch's OpenMP pool is not numba's, so a torch op on 2 threads right after a numba kernel waits
    for a core that numba's workers are still spinning on."""
    import torch
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)
