"""What the hetero layers of one model share (HeteroSession), and the GPU-side busy timer.

Legend: T tokens, D hidden size, K experts per token.
"""
from __future__ import annotations

import time
import weakref

import numpy as np
import torch
from torch import nn

from .expert_cache import LayerCounters
from .prefetch import Copier
from .worker import CpuWorker, HostBuffers, Job

# How long exit waits for the CPU worker to finish the job it is running (one layer of one prefill
# chunk: seconds on a V3-sized model) before leaving it behind.
EXIT_JOIN_S = 60.0


class GpuTimer:
    """Busy time of the GPU part of one layer: CUDA events, or the wall clock in CPU fallback."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start_ev, self.end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.t0, self.pending = 0.0, False

    def start(self) -> float:
        """Returns the seconds of a previous interval not collected yet (see stop)."""
        late = self.collect()
        if self.cuda:
            self.start_ev.record()
        else:
            self.t0 = time.perf_counter()
        return late

    def stop(self, wait: bool) -> float:
        """Seconds of GPU work since start(). On CUDA with wait=True, waits for that work (the caller
        is about to wait for the CPU result anyway, and then measures exactly the GPU's idle time);
        with wait=False the interval is collected by a later start() once complete (no sync)."""
        if not self.cuda:
            return time.perf_counter() - self.t0
        self.end_ev.record()
        self.pending = True
        if not wait:
            return 0.0
        self.end_ev.synchronize()
        return self.collect()

    def collect(self) -> float:
        if not self.cuda or not self.pending or not self.end_ev.query():
            return 0.0
        self.pending = False
        return self.start_ev.elapsed_time(self.end_ev) / 1e3


class HeteroSession:
    """What the hetero layers of one model share: the CPU worker, the copier, host buffers (one set
    for the current job, one for a deferred job), the GPU accumulation buffer, the deferred result."""

    def __init__(self, device: torch.device | str, dtype: torch.dtype, dim: int, topk: int, max_tokens: int = 512,
                 copier: Copier | None = None, worker: CpuWorker | None = None):
        self.device, self.dtype, self.max_tokens = torch.device(device), dtype, max_tokens
        self.cuda = self.device.type == "cuda"
        self.main = Job(HostBuffers(max_tokens, dim, topk, self.cuda))
        self.later = Job(HostBuffers(max_tokens, dim, topk, self.cuda))   # deferred experts
        self.deferred_for: int | None = None       # layer that must add self.later's result
        self.worker = worker or CpuWorker()
        self.copier = copier or Copier(self.device)
        self.y_gpu = torch.empty(max_tokens, dim, dtype=torch.float32, device=self.device)  # (T, D)
        self.y_cpu = torch.empty_like(self.y_gpu) if self.cuda else None
        self.d2h_done = torch.cuda.Event() if self.cuda else None
        self.predicted_t = torch.empty(max_tokens, topk, dtype=torch.int64, pin_memory=self.cuda)  # (T, K)
        self.predicted = self.predicted_t.numpy()
        self.predicted_done = torch.cuda.Event() if self.cuda else None
        self.later_copied = torch.cuda.Event() if self.cuda else None   # deferred result read by the GPU
        self.layers: dict[int, nn.Module] = {}          # HeteroExperts by layer
        # stop the threads when the session is dropped with its model (they hold no reference to it),
        # and at interpreter exit on every path (normal end, exception, Ctrl-C): finalize runs at atexit
        weakref.finalize(self, _stop_threads, self.worker, self.copier)

    def counters(self) -> dict[int, LayerCounters]:
        return {layer: e.counters for layer, e in sorted(self.layers.items())}

    def total(self) -> LayerCounters:
        out = LayerCounters()
        for c in self.counters().values():
            out += c
        return out

    def describe(self) -> str:
        """Per-layer profile: cache, prefetch, transfers, times, and the cost model's view."""
        rows = ["| layer | calls | hit rate | prefetch issued / used | MiB over PCIe | CPU busy s | GPU busy s | "
                "GPU wait s | overlap | stream calls | est. CPU s | est. stream s |", "|" + "---|" * 12]
        for layer, c in [*self.counters().items(), ("all", self.total())]:
            rows.append(f"| {layer} | {c.calls} | {c.hit_rate:.3f} | {c.prefetches_issued} / {c.prefetches_used} | "
                        f"{c.bytes_pcie / 2 ** 20:.1f} | {c.cpu_busy_s:.3f} | {c.gpu_busy_s:.3f} | "
                        f"{c.gpu_wait_s:.3f} | {c.overlap:.2f} | {c.stream_calls} | {c.est_cpu_s:.4f} | "
                        f"{c.est_stream_s:.4f} |")
        return "\n".join(rows)

    def reset_counters(self) -> None:
        for e in self.layers.values():
            e.counters.__init__()

    def drain(self) -> None:
        """Wait for every expert copy in flight (benchmarks, tests)."""
        for e in self.layers.values():
            e.cache.drain()

    def close(self) -> None:
        self.worker.close()
        self.copier.close()

    def to_host(self, bufs: HostBuffers, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        t = x.shape[0]
        bufs.x_t[:t].copy_(x, non_blocking=True)
        bufs.ids_t[:t].copy_(ids, non_blocking=True)
        bufs.w_t[:t].copy_(w, non_blocking=True)
        if self.cuda:
            self.d2h_done.record()
            self.d2h_done.synchronize()

    def from_host(self, y: np.ndarray, bufs: HostBuffers) -> torch.Tensor:
        t = y.shape[0]
        if not self.cuda:
            return torch.from_numpy(y)
        return self.y_cpu[:t].copy_(bufs.y_t[:t], non_blocking=True)


def _stop_threads(worker: CpuWorker, copier: Copier) -> None:
    """Stop and join both threads. Joining matters at interpreter exit: a worker thread still alive
    then (it ran numba's OpenMP parallel regions, so it owns a libgomp thread team) makes the process
    abort in C++ teardown ("terminate called without an active exception", exit 134)."""
    worker.close(EXIT_JOIN_S)
    copier.close(EXIT_JOIN_S)
