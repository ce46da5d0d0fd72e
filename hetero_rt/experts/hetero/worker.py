"""The CPU side of the hetero backend: preallocated host buffers (pinned on CUDA), the Job that runs
the CPU share of one layer's (token, expert) pairs in the numba kernels, and the persistent worker
thread that runs jobs in submission order.

Legend: T tokens, D hidden size, K experts per token, P (token, expert) pairs sent to the CPU.
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np
import torch

from ...errors import HeteroRTError


class HostBuffers:
    """Preallocated host buffers for one job: inputs and outputs of the CPU experts (pinned on CUDA)."""

    def __init__(self, max_tokens: int, dim: int, topk: int, pinned: bool):
        def alloc(shape, dtype):
            t = torch.empty(shape, dtype=dtype, pin_memory=pinned)
            return t, t.numpy()
        self.x_t, self.x = alloc((max_tokens, dim), torch.float32)          # (T, D)
        self.ids_t, self.ids = alloc((max_tokens, topk), torch.int64)       # (T, K)
        self.w_t, self.w = alloc((max_tokens, topk), torch.float32)         # (T, K)
        self.y_t, self.y = alloc((max_tokens, dim), torch.float32)          # (T, D) CPU result
        pairs = max_tokens * topk
        self.pair_x = np.empty((pairs, dim), np.float32)                    # (P, D)
        self.pair_ids = np.empty((pairs, 1), np.int64)                      # (P, 1)
        self.pair_w = np.empty((pairs, 1), np.float32)                      # (P, 1)
        self.pair_tok = np.empty(pairs, np.int64)                           # (P,) ascending


class Job:
    """One CPU expert computation over P (token, expert) pairs; reused for every call."""

    def __init__(self, bufs: HostBuffers):
        self.bufs, self.done = bufs, threading.Event()
        self.experts, self.layer, self.tokens, self.pairs, self.topk = None, -1, 0, 0, 0
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.consumed = True          # its result (and time) has been taken by a layer
        self.done.set()

    def fill(self, experts, layer: int, ids: np.ndarray, w: np.ndarray, flat: np.ndarray) -> None:
        """Pairs at flat indices `flat` (ascending) of ids/w (T, K)."""
        b, k, p = self.bufs, ids.shape[1], len(flat)
        self.experts, self.layer, self.tokens, self.pairs, self.topk = experts, layer, ids.shape[0], p, k
        np.floor_divide(flat, k, out=b.pair_tok[:p])
        np.take(ids.reshape(-1), flat, out=b.pair_ids[:p, 0])
        np.take(w.reshape(-1), flat, out=b.pair_w[:p, 0])

    def run(self) -> None:
        b, p, t, k = self.bufs, self.pairs, self.tokens, self.topk
        if p == t * k:      # every pair on the CPU: the (T, K) call as it came, no gather
            b.y[:t] = self.experts.run(b.x[:t], b.ids[:t], b.w[:t])
            return
        if t == 1:          # one token: its P experts as one (1, P) row
            b.y[:1] = self.experts.run(b.x[:1], b.pair_ids[:p].reshape(1, p), b.pair_w[:p].reshape(1, p))
            return
        tok = b.pair_tok[:p]
        np.take(b.x[:t], tok, axis=0, out=b.pair_x[:p])
        yp = self.experts.run(b.pair_x[:p], b.pair_ids[:p], b.pair_w[:p])  # (P, D)
        y = b.y[:t]
        y.fill(0.0)
        starts = np.flatnonzero(np.diff(tok, prepend=-1))                  # first pair of each token
        y[tok[starts]] = np.add.reduceat(yp, starts, axis=0)


class CpuWorker:
    """A persistent thread running Jobs in submission order. A job's exception, or the thread's
    death, is raised in the waiting caller as HeteroRTError; `timeout_s` bounds any wait.

    `on_job`, when set (profilers: hetero_rt.bench.profile), is called on the worker thread after each
    job as on_job(job, start, seconds) (time.perf_counter clock), before the waiting caller is woken:
    once wait() returns, the job's call has been made. It must not raise (an error is the job's)."""

    def __init__(self, timeout_s: float | None = None):
        self.timeout_s = timeout_s
        self.on_job = None
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="hetero-rt-cpu-experts", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        if not self.thread.is_alive():
            raise HeteroRTError("the CPU expert worker thread has stopped; reload the model")
        job.error, job.consumed = None, False
        job.done.clear()
        self.queue.put(job)

    def wait(self, job: Job) -> None:
        t0 = time.perf_counter()
        while not job.done.wait(0.2):
            if not self.thread.is_alive():
                raise HeteroRTError(f"layer {job.layer}: the CPU expert worker thread died without finishing "
                                    f"its job")
            if self.timeout_s is not None and time.perf_counter() - t0 > self.timeout_s:
                raise HeteroRTError(f"layer {job.layer}: the CPU expert worker did not finish {job.pairs} "
                                    f"(token, expert) pairs within {self.timeout_s} s")
        if job.error is not None:
            e = job.error
            raise HeteroRTError(f"layer {job.layer}: the CPU expert worker failed on {job.pairs} (token, "
                                f"expert) pairs: {type(e).__name__}: {e}") from e

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after the job it runs, if any, and join it (at most timeout_s)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join(timeout=timeout_s)

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            t0 = time.perf_counter()
            try:
                job.run()
            except BaseException as e:  # handed to the caller by wait()
                job.error = e
            job.seconds = time.perf_counter() - t0
            hook = self.on_job
            if hook is not None:
                try:
                    hook(job, t0, job.seconds)
                except BaseException as e:  # handed to the caller by wait(), like the job's own
                    job.error = job.error or e
            job.done.set()
