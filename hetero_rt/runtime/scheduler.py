"""The heterogeneous MoE-layer scheduler (routed-experts backend `hetero`): per MoE layer, the routed
experts the GPU expert cache holds run on the GPU next to the shared experts, all others on a
persistent CPU worker thread in the numba kernels (which release the GIL), at the same time.

One call (HeteroExperts.combine), with x (T, D), ids (T, K), weights (T, K) from the gate:
  1. x, ids, weights -> preallocated (pinned on CUDA) host buffers; one wait for that copy (the CPU
     needs them, and the split below needs the ids);
  2. split the (token, expert) pairs: usable in the cache -> GPU; the rest -> CPU (or, for long
     prompts when the cost model says so, streamed to the GPU; or deferred one layer, if enabled);
  3. hand the CPU pairs to the worker (no wait);
  4. predict the next layer's experts: the next layer's gate applied to this x (queued on the GPU);
  5. GPU: cached experts + shared experts (+ streamed experts);
  6. wait for the worker (timed: the GPU waiting for the CPU), add its result;
  7. issue prefetch copies into the next layer's cache, then this layer's dynamic promotions.
Overlap off runs the same steps but waits for the worker right after step 3.

Without a GPU every device is the CPU and the same code runs: the "GPU" part is torch on the CPU in
the calling thread, beside the same CPU worker thread, and copies go through the same copier.

Legend: T tokens, D hidden size, K experts per token, P (token, expert) pairs sent to the CPU,
E experts, S cache slots.
"""
from __future__ import annotations

import json
import queue
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HeteroRTError
from .cost_model import CostModel
from .expert_cache import DynamicPolicy, ExpertCache, LayerCounters, StaticPolicy, expert_bytes
from .prefetch import Copier


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
    death, is raised in the waiting caller as HeteroRTError; `timeout_s` bounds any wait."""

    def __init__(self, timeout_s: float | None = None):
        self.timeout_s = timeout_s
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

    def close(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join(timeout=5)

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
            job.done.set()


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
        self.layers: dict[int, "HeteroExperts"] = {}
        # stop the threads when the session is dropped with its model (they hold no reference to it)
        weakref.finalize(self, _stop_threads, self.worker, self.copier)

    def counters(self) -> dict[int, LayerCounters]:
        return {layer: e.counters for layer, e in sorted(self.layers.items())}

    def total(self) -> LayerCounters:
        out = LayerCounters()
        for c in self.counters().values():
            out += c
        return out

    def format(self) -> str:
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
    worker.queue.put(None)
    copier.queue.put(None)


class HeteroExperts(nn.Module):
    """Routed experts of one layer: a NumbaExperts (any weight format, any origin) on the CPU plus an
    optional GPU ExpertCache. `combine` also runs the shared experts, overlapped with the CPU."""

    def __init__(self, cpu, layer: int, session: HeteroSession, cache: ExpertCache | None = None, *,
                 overlap: bool = True, prefetch: bool = False, prefetch_max: int | None = None, defer: int = 0,
                 cost: CostModel | None = None):
        super().__init__()
        self.host, self.layer, self.session, self.cache = cpu, layer, session, cache
        self.n_experts = cpu.n_experts
        self.overlap, self.prefetch, self.defer, self.cost = overlap, prefetch, defer, cost
        self.prefetch_max = prefetch_max
        if cache is None:  # no slots: still counts calls and misses
            cache = ExpertCache(cpu, 0, session.device, session.dtype, StaticPolicy([]), session.copier, layer)
        self.cache, self.counters = cache, cache.counters
        self.next: tuple = ()          # (gate, HeteroExperts) of the next MoE layer; set by link()
        self.timer = GpuTimer(session.device)
        self.staging = None
        if cost is not None:           # two slots to stream experts through for long prompts
            self.staging = ExpertCache(cpu, 2, session.device, session.dtype, StaticPolicy([]), session.copier,
                                       layer, LayerCounters())
        session.layers[layer] = self

    def extra_repr(self) -> str:
        slots, policy = self.cache.slots, self.cache.policy.name
        return (f"layer={self.layer}, cache_slots={slots}, policy={policy}, overlap={self.overlap}, "
                f"prefetch={self.prefetch}, defer={self.defer}, stream={self.cost is not None}")

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.combine(x, ids, weights, None)

    def combine(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shared) -> torch.Tensor:
        """routed(x) + shared(x), x (T, D) -> (T, D) in x's dtype; see the module docstring."""
        m = self.session.max_tokens
        if x.shape[0] > m:
            if self.defer and self.next:  # a chunk's deferred experts belong to the next layer's same chunk
                raise HeteroRTError(f"layer {self.layer}: expert deferral needs calls of at most {m} tokens, got "
                                    f"{x.shape[0]}; Runtime.step chunks prompts to {m}")
            return torch.cat([self.combine(x[i:i + m], ids[i:i + m], weights[i:i + m], shared)
                              for i in range(0, x.shape[0], m)])
        s, c, t = self.session, self.counters, x.shape[0]
        job = s.main
        s.to_host(job.bufs, x, ids, weights)
        ids_h, w_h = job.bufs.ids[:t], job.bufs.w[:t]                     # (T, K)
        c.bytes_activations += t * (x.shape[1] * 4 + ids.shape[1] * 12)
        hit, slot = self.lookup(ids_h)
        later = self.deferred_mask(w_h, hit)
        cpu_flat = np.flatnonzero(~hit if later is None else ~(hit | later))
        mode = self.choose(ids_h, cpu_flat, t)
        if len(cpu_flat) and mode == "cpu":
            job.fill(self.host, self.layer, ids_h, w_h, cpu_flat)
            s.worker.submit(job)
            if not self.overlap:
                self.wait(job)
        predicted = self.predict(x)
        y, z = self.gpu_part(x, ids_h, w_h, hit, slot, cpu_flat if mode == "stream" else None, shared,
                             cpu_pending=bool(len(cpu_flat)) and mode == "cpu")
        if len(cpu_flat) and mode == "cpu":
            self.wait(job)
            c.bytes_activations += t * x.shape[1] * 4
            y += s.from_host(job.bufs.y[:t], job.bufs)
        self.add_deferred(y, t)
        if later is not None and later.any():
            self.submit_deferred(job.bufs, ids_h, w_h, np.flatnonzero(later), t)
        self.after(predicted)
        out = y.to(x.dtype, copy=True)
        return out if z is None else out.add_(z)

    # ---- steps ----
    def lookup(self, ids_h: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """hit (T, K) bool: pair served by a usable cached expert; slot (T, K) its slot."""
        if self.cache.slots == 0:
            hit = np.zeros(ids_h.shape, bool)
            self.cache.record(ids_h, hit)
            return hit, None
        self.cache.refresh()
        slot = self.cache.ready_slot[ids_h]
        hit = slot >= 0
        self.cache.record(ids_h, hit)
        return hit, slot

    def deferred_mask(self, w_h: np.ndarray, hit: np.ndarray) -> np.ndarray | None:
        """(T, K) bool: the lowest-weighted `defer` experts of each token, unless cached (GPU work
        is not deferred); None when deferral is off or this is the last hetero MoE layer."""
        if not self.defer or not self.next:
            return None
        low = np.argsort(w_h, axis=1, kind="stable")[:, : self.defer]      # (T, d)
        mask = np.zeros(w_h.shape, bool)
        np.put_along_axis(mask, low, True, axis=1)
        return mask & ~hit

    def choose(self, ids_h: np.ndarray, cpu_flat: np.ndarray, t: int) -> str:
        """Cost model for long prompts: run the missed experts on the CPU or stream them to the GPU."""
        if self.cost is None or t == 1 or not len(cpu_flat):
            return "cpu"
        counts = np.bincount(ids_h.reshape(-1)[cpu_flat], minlength=self.n_experts)
        flops = 6 * self.host.inter_dim * self.host.dim
        mode, est_cpu, est_stream = self.cost.choose(counts, self.host.weight_bytes(1), self.staging.expert_bytes,
                                                     flops)
        self.counters.est_cpu_s += est_cpu
        self.counters.est_stream_s += est_stream
        self.counters.stream_calls += mode == "stream"
        return mode

    def predict(self, x: torch.Tensor):
        """Queue the next layer's gate on this x and the copy of its ids to a pinned buffer; they are
        read after the GPU part (by then complete: no extra wait)."""
        if not self.prefetch or not self.next or self.next[1].cache.slots == 0:
            return None
        t = x.shape[0]
        with torch.no_grad():   # forward, not __call__: hooks (routing recorders) see real routing only
            ids = self.next[0].forward(x)[1]                              # (T, K) on the device
        s = self.session
        s.predicted_t[:t].copy_(ids, non_blocking=True)
        if s.cuda:
            s.predicted_done.record()
        return s.predicted[:t]

    def gpu_part(self, x, ids_h, w_h, hit, slot, stream_flat, shared, cpu_pending: bool):
        self.counters.gpu_busy_s += self.timer.start()
        t = x.shape[0]
        y = self.session.y_gpu[:t].zero_()                                # (T, D) fp32
        if hit.any():
            flat = np.flatnonzero(hit)
            k = ids_h.shape[1]
            c = self.cache
            run_pairs(x, y, flat // k, slot.reshape(-1)[flat], w_h.reshape(-1)[flat], c.w1, c.w3, c.w2)
        if stream_flat is not None:
            self.stream(x, y, ids_h, w_h, stream_flat)
        z = shared(x) if shared is not None else None
        self.counters.gpu_busy_s += self.timer.stop(wait=cpu_pending)
        return y, z

    def wait(self, job: Job) -> None:
        """Wait for a job; the time is the GPU side idle (the CPU time of a job counted once)."""
        if job.consumed:
            return
        t0 = time.perf_counter()
        self.session.worker.wait(job)
        self.counters.gpu_wait_s += time.perf_counter() - t0
        self.counters.cpu_busy_s += job.seconds
        job.consumed = True

    def stream(self, x, y, ids_h, w_h, flat) -> None:
        """Stream the experts of the pairs `flat` through two staging slots, copy of the next expert
        overlapping the compute of the current one."""
        st, k = self.staging, ids_h.shape[1]
        eids = ids_h.reshape(-1)[flat]
        experts = np.unique(eids)
        st.forget()
        for i, e in enumerate(experts[:2]):
            st.load(int(e), i)
        for i, e in enumerate(experts):
            sl = i % 2
            st.tickets[sl].wait_on_stream()
            sel = flat[eids == e]
            run_pairs(x, y, sel // k, np.full(len(sel), sl), w_h.reshape(-1)[sel], st.w1, st.w3, st.w2)
            if i + 2 < len(experts):
                st.load(int(experts[i + 2]), sl)
        self.counters.streamed_experts += len(experts)
        self.counters.bytes_experts += len(experts) * st.expert_bytes

    def add_deferred(self, y: torch.Tensor, t: int) -> None:
        s = self.session
        if s.deferred_for is None:
            return
        job, target = s.later, s.deferred_for
        s.deferred_for = None
        self.wait(job)
        if target == self.layer and job.tokens == t:   # else a stale result of an aborted forward
            y += s.from_host(job.bufs.y[:t], job.bufs)
            if s.cuda:
                s.later_copied.record()

    def submit_deferred(self, bufs: HostBuffers, ids_h, w_h, flat, t: int) -> None:
        s = self.session
        job = s.later
        if s.cuda:   # the GPU may still be reading the previous deferred result from these buffers
            s.later_copied.synchronize()
        np.copyto(job.bufs.x[:t], bufs.x[:t])
        job.fill(self.host, self.layer, ids_h, w_h, flat)
        s.worker.submit(job)
        s.deferred_for = self.next[1].layer
        self.counters.deferred_pairs += len(flat)

    def after(self, predicted) -> None:
        if predicted is not None:
            nxt = self.next[1]
            if self.session.cuda:
                self.session.predicted_done.synchronize()   # queued before the GPU part: long done
            limit = self.prefetch_max or predicted.shape[1]
            nxt.cache.prefetch(rank_experts(predicted, nxt.n_experts), limit)
        self.cache.promote()


def run_pairs(x, y, tok, slot, w, w1, w3, w2) -> None:
    """y[tok] += w * FFN_slot(x[tok]) on the cache's device; tok, slot, w host arrays (pairs)."""
    if x.shape[0] == 1:
        for s, wt in zip(slot.tolist(), w.tolist()):
            h = F.silu(F.linear(x, w1[s])) * F.linear(x, w3[s])
            y.add_(F.linear(h, w2[s]).float(), alpha=wt)
        return
    dev = y.device
    order = np.argsort(slot, kind="stable")
    bounds = np.flatnonzero(np.diff(slot[order], prepend=-1, append=-2))
    for a, b in zip(bounds[:-1], bounds[1:]):
        sel = order[a:b]
        s = int(slot[sel[0]])
        rows = torch.from_numpy(tok[sel]).to(dev)
        xs = x[rows]
        h = F.silu(F.linear(xs, w1[s])) * F.linear(xs, w3[s])
        y.index_add_(0, rows, F.linear(h, w2[s]).float() * torch.from_numpy(w[sel]).to(dev)[:, None])


def rank_experts(ids: np.ndarray, n_experts: int) -> list[int]:
    """Predicted experts, most tokens first, ties in routing order (decode: the gate's own order)."""
    flat = ids.reshape(-1)
    counts = np.bincount(flat, minlength=n_experts)
    first = np.full(n_experts, len(flat))
    first[flat[::-1]] = np.arange(len(flat))[::-1]
    used = np.flatnonzero(counts)
    return used[np.lexsort((first[used], -counts[used]))].tolist()


def link(layers: list[tuple[nn.Module, nn.Module]]) -> None:
    """layers: (gate, experts) of every MoE layer in order. Each hetero layer whose next MoE layer is
    hetero too gets it as `next` (for prediction and deferral)."""
    for (_, cur), (gate, nxt) in zip(layers, layers[1:]):
        if isinstance(cur, HeteroExperts) and isinstance(nxt, HeteroExperts):
            cur.next = (gate, nxt)


def load_profile(path: str | Path, layer: int, n_experts: int) -> np.ndarray:
    """Routing counts (E,) of one layer from a profile written by scripts/record_routing.py."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        counts = data["layers"].get(str(layer))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise HeteroRTError(f"{path}: not a routing profile ({e}); record one with scripts/record_routing.py") \
            from None
    if counts is None:
        raise HeteroRTError(f"{path}: the routing profile has no counts for layer {layer}; record it on this "
                            f"model with scripts/record_routing.py")
    if len(counts) != n_experts:
        raise HeteroRTError(f"{path}: layer {layer} has counts for {len(counts)} experts, the model has "
                            f"{n_experts}; the profile was recorded on another model")
    return np.asarray(counts, np.float64)


def make_policy(policy: str, layer: int, n_experts: int, profile: str | None, decay: float):
    counts = load_profile(profile, layer, n_experts) if profile else None
    if policy == "static":
        if counts is None:
            raise HeteroRTError(f"layer {layer}: the static cache policy needs a routing profile "
                                f"(hetero: {{profile: FILE}}, recorded by scripts/record_routing.py)")
        return StaticPolicy.from_counts(counts)
    start = StaticPolicy.from_counts(counts).experts if counts is not None else ()
    return DynamicPolicy(n_experts, decay=decay, initial=start)


def install(model: nn.Module, specs: dict, device: torch.device | str, *, copier: Copier | None = None,
            worker: CpuWorker | None = None, max_tokens: int = 512) -> HeteroSession:
    """Put the routed experts of the layers in `specs` ({layer: HeteroSpec}) on the hetero backend.
    Those layers' experts must be NumbaExperts (or HeteroExperts, whose NumbaExperts is reused: this
    re-configures a loaded model). The cache lives on `device` in the dtype of the model's embedding."""
    old = getattr(model, "hetero", None)
    if old is not None:
        old.close()
    args = model.args
    dtype = model.embed.weight.dtype
    session = HeteroSession(device, dtype, args.hidden_size, args.num_experts_per_tok, max_tokens, copier, worker)
    moe = []
    for layer, block in enumerate(model.layers):
        experts = getattr(block.ffn, "experts", None)
        if experts is None:
            continue
        if isinstance(experts, HeteroExperts):
            experts = experts.host
        if layer in specs:
            block.ffn.experts = experts = build_layer(experts, layer, specs[layer], session, args.num_experts_per_tok)
        moe.append((block.ffn.gate, block.ffn.experts))
    link(moe)
    model.hetero = session
    return session


def build_layer(cpu, layer: int, spec, session: HeteroSession, topk: int) -> HeteroExperts:
    if not hasattr(cpu, "run"):
        raise HeteroRTError(f"layer {layer}: the hetero backend wraps NumbaExperts, got {type(cpu).__name__}")
    if not 0 <= spec.defer < topk:
        raise HeteroRTError(f"layer {layer}: hetero.defer={spec.defer} must be below the {topk} experts per token "
                            f"(rules line {spec.line})")
    slots = spec.slots(expert_bytes(cpu.inter_dim, cpu.dim, session.dtype), cpu.n_experts)
    cache = None
    if slots:
        policy = make_policy(spec.policy, layer, cpu.n_experts, spec.profile, spec.decay)
        cache = ExpertCache(cpu, slots, session.device, session.dtype, policy, session.copier, layer)
    cost = CostModel(pcie_gbps=spec.pcie_gbps, cpu_gflops=spec.cpu_gflops) if spec.stream else None
    return HeteroExperts(cpu, layer, session, cache, overlap=spec.overlap, prefetch=spec.prefetch and cache is not None,
                         defer=spec.defer, cost=cost)


def hetero_session(model: nn.Module) -> HeteroSession | None:
    return getattr(model, "hetero", None)
