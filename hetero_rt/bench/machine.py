"""The machine a benchmark ran on, as data: CPU model and family/model (from /proc/cpuinfo), the SIMD
flags the kernels care about, physical and logical cores, RAM, a read bandwidth measured now (a
numba parallel read, `read_bandwidth`, also the kernel benchmark's baseline), the GPU if torch sees
one, and the versions that matter. Everything is a plain JSON-able dict so a later script can build docs tables from it."""
from __future__ import annotations

import platform
import time

import numba
import numpy as np
import psutil
import torch
from numba import njit, prange

from ..kernels.threads import use_threads
from ..placement.sizes import fmt_bytes

# The /proc/cpuinfo flags that decide which kernel paths run (in the order they are printed).
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")
BANDWIDTH_PROBE_BYTES = 1 << 30   # far larger than any cache


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """{"name", "family", "model", "flags"} of the first processor listed (None where unknown)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return {"name": platform.processor() or None, "family": None, "model": None, "flags": []}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"name": fields.get("model name"), "family": fields.get("cpu family"), "model": fields.get("model"),
            "flags": [f for f in SIMD_FLAGS if f in flags]}


def gpu_info() -> dict | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}",
            "count": torch.cuda.device_count()}


@njit(nogil=True, parallel=True, fastmath=True, cache=True)
def _parallel_sum(a):
    """Sum of a float32 array read once in parallel (vectorized): a memory read-bandwidth probe."""
    chunks = 256
    step = (a.shape[0] + chunks - 1) // chunks
    part = np.zeros(chunks, np.float32)
    for c in prange(chunks):
        seg = a[c * step:min(a.shape[0], (c + 1) * step)]
        s = np.float32(0.0)
        for i in range(seg.shape[0]):
            s += seg[i]
        part[c] = s
    return part.sum()


def read_bandwidth(a: np.ndarray, repeats: int = 5) -> float:
    """Best-of-repeats GB/s of a parallel read over the float32 array a (set the thread count before)."""
    _parallel_sum(a[:1024])
    return a.nbytes / min(_seconds(lambda: _parallel_sum(a)) for _ in range(repeats)) / 1e9


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_bandwidth(threads: int, nbytes: int = BANDWIDTH_PROBE_BYTES) -> float:
    """GB/s of a parallel read over nbytes on `threads` numba threads (read_bandwidth)."""
    use_threads(threads)
    probe = np.ones(max(nbytes // 4, 1024), np.float32)
    try:
        return read_bandwidth(probe)
    finally:
        del probe


def machine(threads: int, probe_bytes: int = BANDWIDTH_PROBE_BYTES, measured: float | None = None) -> dict:
    """The machine header. The read bandwidth is measured now over probe_bytes, unless the caller
    measured it in its run (`measured`, GB/s, same method) or probe_bytes is 0 (not measured: null)."""
    import hetero_rt
    if measured is None and probe_bytes:
        measured = measure_bandwidth(threads, probe_bytes)
    return {"cpu": cpu_info(), "physical_cores": psutil.cpu_count(logical=False),
            "logical_cores": psutil.cpu_count(logical=True), "ram_bytes": psutil.virtual_memory().total,
            "read_bandwidth": {"gb_per_s": measured, "threads": threads, "probe_bytes": probe_bytes,
                               "method": "numba parallel sum, best of 5" if measured is not None else "not measured"},
            "gpu": gpu_info(), "os": platform.platform(),
            "versions": {"hetero_rt": hetero_rt.__version__, "torch": torch.__version__,
                         "numba": numba.__version__, "python": platform.python_version()}}


def describe(m: dict) -> str:
    cpu, bw, gpu = m["cpu"], m["read_bandwidth"], m["gpu"]
    lines = [f"CPU: {cpu['name'] or 'unknown'} (family {cpu['family']} model {cpu['model']}); "
             f"{m['physical_cores']} physical / {m['logical_cores']} logical cores; RAM {fmt_bytes(m['ram_bytes'])}",
             f"SIMD: {' '.join(cpu['flags']) or 'none of ' + ', '.join(SIMD_FLAGS[:4])}",
             "read bandwidth: " + ("not measured" if bw["gb_per_s"] is None else
                                   f"{bw['gb_per_s']:.2f} GB/s ({bw['method']}, {fmt_bytes(bw['probe_bytes'])}, "
                                   f"{bw['threads']} threads)"),
             "GPU: " + ("none" if gpu is None else f"{gpu['name']} ({fmt_bytes(gpu['memory_bytes'])}, "
                                                  f"compute {gpu['capability']})"),
             "versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())]
    return "\n".join(lines)
