"""The expert-cache figure of a benchmark run: the hit rate the placed hetero cache achieved on the
profiled decode steps, beside Belady's offline optimum on the routing recorded in those same steps,
at every cache size (slots per layer) from 0 to E (or a spread of sizes for large E).

Hit rates count distinct experts per call (LayerCounters.hits / (hits + misses)); Belady is the warm
optimum of hetero_rt.bench.hetero.belady_rate (the cache starts holding the experts used first, as a
cache that has been running does). `routing_document` is the same curve over a recording of
scripts/record_routing.py. Prefetch may copy in experts no call has used yet, which a
demand-filled cache cannot, so a measured rate may exceed the line: it is the reference, not a bound.

Legend: E experts per layer, S slots per layer, T tokens, K experts per token.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import HeteroRTError
from ..experts.hetero import HeteroExperts, hetero_session
from ..experts.hetero.expert_cache import LayerCounters
from . import document, machine
from .hetero import belady_rate
from .routing import RoutingRecorder

MAX_POINTS = 33   # sizes on the curve when E is larger than this


def placed_slots(model: nn.Module) -> dict[int, int]:
    """{layer: S} of the hetero layers whose cache has slots (empty: no cache placed)."""
    return {m.layer: m.cache.slots for m in model.modules() if isinstance(m, HeteroExperts) and m.cache.slots}


def cache_sizes(n_experts: int, placed: dict[int, int]) -> list[int]:
    """0..E, or MAX_POINTS sizes spread over it, always with the placed sizes."""
    if n_experts < MAX_POINTS:
        return list(range(n_experts + 1))
    spread = np.linspace(0, n_experts, MAX_POINTS).round().astype(int).tolist()
    return sorted(set(spread) | set(placed.values()))


def counters(model: nn.Module) -> LayerCounters:
    """The hetero layers' counters summed now (a copy), zero without a hetero session."""
    session = hetero_session(model)
    return LayerCounters() if session is None else session.total()


def figures(model: nn.Module, calls: dict[int, list[np.ndarray]], before: LayerCounters) -> dict | None:
    """The JSON of the expert cache over the calls recorded since `before` (routing {layer: [ids (T, K)
    per call]}, counters read before those calls); None when no cache is placed."""
    placed = placed_slots(model)
    if not placed:
        return None
    after = counters(model)
    hits, misses = after.hits - before.hits, after.misses - before.misses
    cached = {layer: calls[layer] for layer in placed if calls.get(layer)}
    n_experts = next(m.n_experts for m in model.modules() if isinstance(m, HeteroExperts))
    sizes = cache_sizes(n_experts, placed)
    return {"layers": sorted(placed), "slots_per_layer": {str(k): v for k, v in sorted(placed.items())},
            "n_experts": n_experts, "calls": len(next(iter(cached.values()), [])),
            "measured": {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
                         "prefetches_issued": after.prefetches_issued - before.prefetches_issued},
            "curve": {"slots": sizes, "belady_hit_rate": [belady_rate(cached, s) for s in sizes],
                      "method": "Belady with bypass, warm start, distinct experts per call, summed over the "
                                "cached layers"}}


def check_sizes(sizes: list[int], n_experts: int, model) -> list[int]:
    """Cache sizes asked for (record_routing --sizes): each in 0..E."""
    if not sizes or any(not 0 <= s <= n_experts for s in sizes):
        raise HeteroRTError(f"record_routing --sizes {' '.join(map(str, sizes))}: expected cache sizes in "
                            f"0..{n_experts} (slots per layer; {model} has {n_experts} experts per layer)")
    return list(sizes)


def routing_document(rec: RoutingRecorder, model, config: dict, sizes: list[int] | None = None) -> dict:
    """A routing recording as a benchmark JSON document (bench.document): one row per cache size (slots
    per layer) with Belady's warm hit rate on the recorded routing, summed over the MoE layers; the run
    holds the tokens and calls recorded. The machine header has no bandwidth: nothing here reads
    weights at speed."""
    calls = {layer: c for layer, c in rec.calls.items() if c}
    sizes = cache_sizes(rec.n_experts, {}) if sizes is None else check_sizes(sizes, rec.n_experts, model)
    first = next(iter(calls.values()), [])
    rows = [{"slots": s, "belady_hit_rate": belady_rate(calls, s), "layers": len(calls)} for s in sizes]
    run = {"tokens": sum(len(c) for c in first), "calls": len(first), "n_experts": rec.n_experts,
           "layers": sorted(calls)}
    return document.document("record_routing", model, config, machine.machine(torch.get_num_threads(), 0), rows,
                             [run])
