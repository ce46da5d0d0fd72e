"""GET /metrics: the batcher's counters and the expert cache's hit rate in the Prometheus text
format (0.0.4), written by hand (no client library). Rates are totals over the server's life:
prefill tokens/s = prompt tokens not served by the prefix cache / prefill seconds; decode tokens/s =
tokens from decode steps (all but each request's first) / decode seconds. Both are per sequence
(seconds of requests decoded together overlap), as llama-server reports them.
"""
from __future__ import annotations

from collections import Counter

from ..experts.hetero import HeteroExperts
from ..experts.hetero.expert_cache import LayerCounters
from ..runtime.engine import Runtime
from ..runtime.request import GenerationResult

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """What the batcher's counters lack: finished requests by stop reason and decode-step tokens.
    Updated on the event loop only (Generation.on_finish), so it needs no lock."""

    def __init__(self):
        self.finished: Counter[str] = Counter()
        self.decode_tokens = 0
        self.decode_s = 0.0

    def record(self, result: GenerationResult) -> None:
        self.finished[result.stop_reason] += 1
        self.decode_tokens += max(len(result.new_ids) - 1, 0)
        self.decode_s += result.decode_s


def expert_cache_layers(rt: Runtime) -> list[HeteroExperts]:
    """Every hetero-backend layer, where at least one holds a GPU expert cache; else none (no hit
    rate to export). Layers without a cache count their experts as misses."""
    layers = [m for m in rt.model.modules() if isinstance(m, HeteroExperts)]
    return layers if any(m.cache.slots > 0 for m in layers) else []


def render(rt: Runtime, server: ServerMetrics, cache_layers: list[HeteroExperts]) -> str:
    c = rt.batcher.counters
    prefilled = c["prompt_tokens"] - c["cached_tokens"]
    rows = [
        ("requests_total", "counter", "Requests submitted to the batcher", c["requests"]),
        ("prompt_tokens_total", "counter", "Prompt tokens of finished requests", c["prompt_tokens"]),
        ("prompt_tokens_cached_total", "counter", "Prompt tokens reused from the prefix cache", c["cached_tokens"]),
        ("generated_tokens_total", "counter", "Tokens generated", c["generated_tokens"]),
        ("prefill_seconds_total", "counter", "Seconds from admission to the first token, summed over requests",
         c["prefill_s"]),
        ("decode_seconds_total", "counter", "Seconds from the first token to the last, summed over requests",
         c["decode_s"]),
        ("prefill_tokens_per_second", "gauge", "Prompt tokens prefilled per second (per sequence)",
         prefilled / c["prefill_s"] if c["prefill_s"] else 0.0),
        ("decode_tokens_per_second", "gauge", "Tokens per second of decode steps (per sequence)",
         server.decode_tokens / server.decode_s if server.decode_s else 0.0),
        ("queue_depth", "gauge", "Requests waiting for a slot", rt.batcher.queue_depth),
        ("slots_busy", "gauge", "Slots running a request", rt.batcher.busy_slots),
        ("slots_total", "gauge", "Slots (sequences decoded at once, --parallel)", rt.parallel),
    ]
    out = []
    for name, kind, doc, value in rows:
        out += _metric(name, kind, doc, [("", value)])
    out += _metric("requests_finished_total", "counter", "Requests finished, by stop reason",
                   [(f'{{reason="{r}"}}', n) for r, n in sorted(server.finished.items())])
    if cache_layers:
        total = LayerCounters()
        for layer in cache_layers:
            total += layer.counters
        out += _metric("expert_cache_hits_total", "counter", "Routed experts served from the GPU expert cache",
                       [("", total.hits)])
        out += _metric("expert_cache_misses_total", "counter", "Routed experts run on the CPU", [("", total.misses)])
        out += _metric("expert_cache_hit_rate", "gauge", "Share of routed experts served from the GPU expert cache",
                       [("", total.hit_rate)])
    return "\n".join(out) + "\n"


def _metric(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> list[str]:
    name = f"hetero_rt_{name}"
    return [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"] + [f"{name}{labels} {_num(v)}" for labels, v in samples]


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))
