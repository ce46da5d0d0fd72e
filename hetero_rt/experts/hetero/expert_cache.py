"""The GPU expert cache of one MoE layer, its placement policies, the offline optimum (Belady) and
the per-layer counters.

Contract: the cache owns `slots` preallocated expert-sized blocks on its device (never more; the
budget is fixed at construction). An expert is *resident* once a copy into a slot has been issued and
*usable* only once that copy's ticket reports done; until then it runs on the CPU like any other
miss, so a miss never waits for a transfer. The policy decides which experts to copy in:

  static : a fixed set, the hottest experts of this layer in a recorded routing profile, loaded once;
  dynamic: each expert has a decayed frequency score s_e <- decay * s_e + tokens routed to e in this
           call; after a call, missed experts whose score beats the lowest-scored resident expert by a
           hysteresis factor replace it (at most `max_promotions` copies per call, the PCIe budget).

Belady's offline optimum on a recorded trace (`belady_hits`) is the reference for the hit rate: the
most hits any demand-driven cache of the same size could get (misses may bypass the cache, as ours
do, so the optimum is Belady with bypass: after each step keep the `slots` experts used soonest).

Legend: E experts, S slots, I expert intermediate size, D hidden size, T tokens, K experts per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from ...errors import HeteroRTError
from ...quant.ggml import dequantize


@dataclass
class LayerCounters:
    """Exact event counts and times of one MoE layer (or a sum over layers).

    hits / misses: distinct experts a call needed, served from the cache / by the CPU; the *_pairs
    counts are the same per (token, expert) pair. prefetches_used: prefetched experts that served a hit
    in the first call at which they were usable. bytes_pcie: expert copies host->GPU plus activations both
    ways (in CPU fallback: the bytes a GPU would move). Times in seconds: cpu_busy (the CPU worker
    running experts), gpu_busy (the GPU part: shared + cached experts, streamed experts), gpu_wait
    (the GPU side waiting for the CPU result). est_*: cost-model estimates for long prompts."""
    calls: int = 0
    hits: int = 0
    misses: int = 0
    hit_pairs: int = 0
    miss_pairs: int = 0
    promotions: int = 0
    prefetches_issued: int = 0
    prefetches_used: int = 0
    bytes_experts: int = 0
    bytes_activations: int = 0
    cpu_busy_s: float = 0.0
    gpu_busy_s: float = 0.0
    gpu_wait_s: float = 0.0
    stream_calls: int = 0
    streamed_experts: int = 0
    est_cpu_s: float = 0.0
    est_stream_s: float = 0.0
    deferred_pairs: int = 0

    @property
    def bytes_pcie(self) -> int:
        return self.bytes_experts + self.bytes_activations

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def overlap(self) -> float:
        """Share of the CPU expert time hidden behind GPU work: 1 - gpu_wait / cpu_busy."""
        return max(0.0, 1.0 - self.gpu_wait_s / self.cpu_busy_s) if self.cpu_busy_s > 0 else 0.0

    def __iadd__(self, other: "LayerCounters") -> "LayerCounters":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(bytes_pcie=self.bytes_pcie, hit_rate=self.hit_rate, overlap=self.overlap)
        return d


# ---------------------------------------------------------------- policies

class StaticPolicy:
    """A fixed set of experts (hottest first), loaded at start and never replaced."""
    name = "static"

    def __init__(self, experts: Sequence[int]):
        self.experts = [int(e) for e in experts]

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> "StaticPolicy":
        """Hottest first; ties broken by expert id so the choice is reproducible."""
        counts = np.asarray(counts, dtype=np.float64)
        return cls(np.lexsort((np.arange(len(counts)), -counts)).tolist())

    def initial(self, slots: int) -> list[int]:
        return self.experts[:slots]

    def observe(self, counts: np.ndarray) -> None:
        pass

    def score(self) -> np.ndarray | None:
        return None


class DynamicPolicy:
    """Promote / evict by decayed frequency (see the module docstring)."""
    name = "dynamic"

    def __init__(self, n_experts: int, decay: float = 0.9, max_promotions: int = 2, hysteresis: float = 1.0,
                 initial: Sequence[int] = ()):
        if not 0.0 < decay <= 1.0:
            raise HeteroRTError(f"dynamic cache policy: decay must lie in (0, 1], got {decay}")
        self.decay, self.max_promotions, self.hysteresis = decay, max_promotions, hysteresis
        self.scores = np.zeros(n_experts, np.float64)                     # (E,)
        self.first = [int(e) for e in initial]

    def initial(self, slots: int) -> list[int]:
        return self.first[:slots]

    def observe(self, counts: np.ndarray) -> None:
        """counts (E,): tokens routed to each expert in this call."""
        self.scores *= self.decay
        self.scores += counts

    def score(self) -> np.ndarray:
        return self.scores


# ---------------------------------------------------------------- the cache

class ExpertCache:
    """S slots of dequantized experts of one layer on `device` in `dtype`, filled through a copier
    (hetero_rt.experts.hetero.prefetch) from the host weights of a NumbaExperts (any format)."""

    def __init__(self, source, slots: int, device: torch.device | str, dtype: torch.dtype, policy, copier,
                 layer: int = 0, counters: LayerCounters | None = None):
        e, i, d = source.n_experts, source.inter_dim, source.dim
        if not 0 <= slots <= e:
            raise HeteroRTError(f"layer {layer}: expert cache of {slots} slots; expected 0..{e} (experts per layer)")
        self.source, self.slots, self.layer, self.policy, self.copier = source, slots, layer, policy, copier
        self.device, self.dtype = torch.device(device), dtype
        self.w1 = torch.empty(slots, i, d, dtype=dtype, device=self.device)   # (S, I, D)
        self.w3 = torch.empty(slots, i, d, dtype=dtype, device=self.device)   # (S, I, D)
        self.w2 = torch.empty(slots, d, i, dtype=dtype, device=self.device)   # (S, D, I)
        self.expert_bytes = expert_bytes(i, d, dtype)
        self.slot_of = np.full(e, -1, np.int64)         # (E,) resident experts (copy maybe in flight)
        self.ready_slot = np.full(e, -1, np.int64)      # (E,) slot only once its copy is done, else -1
        self.expert_in = np.full(slots, -1, np.int64)   # (S,)
        self.tickets: list = [None] * slots             # copy completion per slot
        self.pending: list[int] = []                    # slots whose copy may be in flight
        self.by_prefetch = np.zeros(slots, bool)        # prefetched, no call since it became usable
        self.counts = np.zeros(e, np.float64)           # (E,) scratch: tokens per expert in one call
        self.counters = counters if counters is not None else LayerCounters()
        for slot, expert in enumerate(policy.initial(slots)):
            self.load(expert, slot)

    @property
    def capacity_bytes(self) -> int:
        return self.slots * self.expert_bytes

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w1, self.w3, self.w2))

    def resident(self) -> list[int]:
        return [int(e) for e in self.expert_in if e >= 0]

    def refresh(self) -> None:
        """Make experts whose copy has completed usable (called at the start of every call)."""
        if not self.pending:
            return
        still = []
        for slot in self.pending:
            if self.tickets[slot].done():
                self.ready_slot[self.expert_in[slot]] = slot
            else:
                still.append(slot)
        self.pending[:] = still

    def load(self, expert: int, slot: int, prefetch: bool = False) -> None:
        """Issue the copy of `expert` into `slot`; the previous occupant stops being usable now."""
        old = self.expert_in[slot]
        if old >= 0:
            self.slot_of[old] = self.ready_slot[old] = -1
        if self.slot_of[expert] >= 0:
            raise HeteroRTError(f"layer {self.layer}: expert {expert} is already in slot {self.slot_of[expert]}")
        self.expert_in[slot], self.slot_of[expert] = expert, slot
        self.by_prefetch[slot] = prefetch
        self.tickets[slot] = self.copier.submit(self, expert, slot)
        if slot not in self.pending:
            self.pending.append(slot)
        self.counters.bytes_experts += self.expert_bytes
        if prefetch:
            self.counters.prefetches_issued += 1
        else:
            self.counters.promotions += 1

    def write_slot(self, expert: int, slot: int, staging=None) -> None:
        """Copy body (runs on the copier's thread): dequantize one expert of the host weights into a
        slot. `staging` (pinned host tensors) is used on CUDA; on the CPU the slot is written directly."""
        src = self.source
        parts = ((self.w1, src.w1, src.fmt13), (self.w3, src.w3, src.fmt13), (self.w2, src.w2, src.fmt2))
        for n, (dst, raw, fmt) in enumerate(parts):
            dense = torch.from_numpy(dequantize(raw[expert], fmt.name))       # (rows, cols) fp32
            if staging is None:
                dst[slot].copy_(dense)
            else:
                staging[n].copy_(dense)
                dst[slot].copy_(staging[n], non_blocking=True)

    def record(self, ids: np.ndarray, hit_mask: np.ndarray) -> None:
        """Count one call: ids (T, K) int64, hit_mask (T, K) bool (pair served from the cache)."""
        c = self.counters
        c.calls += 1
        n_hit = int(hit_mask.sum())
        c.hit_pairs += n_hit
        c.miss_pairs += ids.size - n_hit
        self.counts[:] = 0
        np.add.at(self.counts, ids.reshape(-1), 1.0)
        used = np.flatnonzero(self.counts)
        hit_experts = used[self.ready_slot[used] >= 0]
        c.hits += len(hit_experts)
        c.misses += len(used) - len(hit_experts)
        c.prefetches_used += int(self.by_prefetch[self.ready_slot[hit_experts]].sum())
        # a prefetched expert is protected from promotions until the first call it could serve
        usable = self.expert_in >= 0
        usable[usable] = self.ready_slot[self.expert_in[usable]] >= 0
        self.by_prefetch[usable] = False
        self.policy.observe(self.counts)

    def promote(self) -> int:
        """Dynamic policy: copy in the best-scored missed experts over the worst-scored residents."""
        scores = self.policy.score()
        if scores is None or self.slots == 0:
            return 0
        self.refresh()
        done = 0
        for expert in np.argsort(-scores, kind="stable")[: self.slots + self.policy.max_promotions]:
            if done >= self.policy.max_promotions or scores[expert] <= 0:
                break
            if self.slot_of[expert] >= 0:
                continue
            slot = self.victim(scores, protect_prefetched=True)
            if slot is None:
                break
            old = self.expert_in[slot]
            if old >= 0 and scores[expert] <= self.policy.hysteresis * scores[old]:
                break
            self.load(int(expert), slot)
            done += 1
        return done

    def victim(self, scores: np.ndarray, keep: np.ndarray | None = None,
               protect_prefetched: bool = False) -> int | None:
        """An empty slot, else the slot of the lowest-scored usable resident not in `keep` (E,) bool;
        slots with a copy in flight are never chosen, nor (protect_prefetched) prefetched experts
        that have not had a call to serve yet."""
        empty = np.flatnonzero(self.expert_in < 0)
        if len(empty):
            return int(empty[0])
        best, best_score = None, math.inf
        for slot, e in enumerate(self.expert_in):
            if slot in self.pending or (keep is not None and keep[e]):
                continue
            if protect_prefetched and self.by_prefetch[slot]:
                continue
            if scores[e] < best_score:
                best, best_score = slot, scores[e]
        return best

    def prefetch(self, experts: Sequence[int], limit: int) -> int:
        """Copy predicted experts in (most likely first), evicting low-scored residents that are not
        themselves predicted. Returns the number of copies issued."""
        scores = self.policy.score()
        if scores is None or self.slots == 0:
            return 0
        self.refresh()
        keep = np.zeros(len(self.slot_of), bool)
        keep[list(experts)] = True
        issued = 0
        for expert in experts:
            if issued >= limit:
                break
            if self.slot_of[expert] >= 0:
                continue
            slot = self.victim(scores, keep)
            if slot is None:
                break
            self.load(int(expert), slot, prefetch=True)
            issued += 1
        return issued

    def forget(self) -> None:
        """Empty every slot (their copies must be complete): staging use, one call at a time."""
        self.slot_of[:] = self.ready_slot[:] = -1
        self.expert_in[:] = -1
        self.pending.clear()

    def drain(self) -> None:
        """Wait for every copy in flight (tests and benchmarks; never on the hot path)."""
        for slot in list(self.pending):
            self.tickets[slot].wait()
        self.refresh()


def expert_bytes(inter_dim: int, dim: int, dtype: torch.dtype) -> int:
    """Bytes of one expert (w1, w3, w2) in the cache's dtype."""
    return 3 * inter_dim * dim * torch.tensor([], dtype=dtype).element_size()


def belady_hits(trace: Sequence[np.ndarray], slots: int, warm: bool = False) -> tuple[int, int]:
    """Offline optimum for a demand-filled cache with bypass. trace: per call, the distinct experts
    it needs. Returns (hits, requests). After each call the cache may hold any `slots` experts among
    those it held and those just used; keeping the ones whose next use comes soonest is optimal.
    warm=True starts from the best possible contents (the `slots` experts used first) instead of an
    empty cache: the fair optimum for caches that start filled (static, or a warmed-up dynamic)."""
    steps = [np.unique(np.asarray(s, np.int64)) for s in trace]
    uses: dict[int, list[int]] = {}
    for t, s in enumerate(steps):
        for e in s.tolist():
            uses.setdefault(e, []).append(t)
    pointer = {e: 0 for e in uses}
    cache: set[int] = set(sorted(uses, key=lambda e: (uses[e][0], e))[:slots]) if warm else set()
    hits = requests = 0
    for t, s in enumerate(steps):
        need = s.tolist()
        requests += len(need)
        hits += sum(1 for e in need if e in cache)
        for e in need:
            pointer[e] += 1
        cand = cache | set(need)
        if len(cand) > slots:
            def nxt(e: int) -> int:
                p = pointer[e]
                return uses[e][p] if p < len(uses[e]) else math.inf
            cand = set(sorted(cand, key=lambda e: (nxt(e), e))[:slots])
        cache = cand
    return hits, requests


def simulate(trace: Sequence[np.ndarray], cache_factory) -> LayerCounters:
    """Run a cache over a routing trace (per call: ids (T, K)) with copies completing between calls;
    returns its counters. For comparing policies with belady_hits on the same trace."""
    cache = cache_factory()
    for ids in trace:
        ids = np.asarray(ids, np.int64).reshape(-1, np.shape(ids)[-1] if np.ndim(ids) > 1 else 1)
        cache.refresh()
        cache.record(ids, cache.ready_slot[ids] >= 0)
        cache.promote()
        cache.drain()
    return cache.counters

