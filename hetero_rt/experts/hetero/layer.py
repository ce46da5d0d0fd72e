"""The heterogeneous MoE-layer scheduler (routed-experts backend `hetero`): per MoE layer, the routed
experts the GPU expert cache holds run on the GPU next to the shared experts, all others on a
persistent CPU worker thread in the numba kernels (which release the GIL), at the same time.

One call (HeteroExperts.forward), with x (T, D), ids (T, K), weights (T, K) from the gate:
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

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import HeteroRTError
from .. import RoutedExperts
from .cost_model import CostModel
from .expert_cache import ExpertCache, LayerCounters, StaticPolicy
from .session import GpuTimer, HeteroSession
from .worker import HostBuffers, Job


class HeteroExperts(RoutedExperts):
    """Routed experts of one layer: a NumbaExperts (any weight format, any origin) on the CPU plus an
    optional GPU ExpertCache. forward also runs the shared experts, overlapped with the CPU."""

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

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                shared: nn.Module | None = None) -> torch.Tensor:
        """routed(x) + shared(x), x (T, D) -> (T, D) in x's dtype; see the module docstring."""
        m = self.session.max_tokens
        if x.shape[0] > m:
            if self.defer and self.next:  # a chunk's deferred experts belong to the next layer's same chunk
                raise HeteroRTError(f"layer {self.layer}: expert deferral needs calls of at most {m} tokens, got "
                                    f"{x.shape[0]}; Runtime.step chunks prompts to {m}")
            return torch.cat([self.forward(x[i:i + m], ids[i:i + m], weights[i:i + m], shared)
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


def link(previous: nn.Module | None, gate: nn.Module, current: nn.Module) -> None:
    """As the model is built, MoE layer by MoE layer: a hetero layer whose next MoE layer is hetero
    too gets it, with that layer's gate, as `next` (for prediction and deferral)."""
    if isinstance(previous, HeteroExperts) and isinstance(current, HeteroExperts):
        previous.next = (gate, current)
