"""Per-op time of one forward, from hooks on the model's modules: where a decode step and a prefill
spend their time. The model is not changed: forward hooks (and, for the two functional calls of
Transformer.forward, embedding and lm_head, its module globals) are installed by `op_timers` and
removed when it exits. Hooks synchronize the device around every op, so a profiled step is slower
than a timed one: run it apart from the timed runs.

Ops (summed over layers; `layers` keeps them per layer):
  embedding, block norms (attn_norm + ffn_norm), attention (MLA), gate, routed experts,
  shared experts, dense MLP, final norm + lm_head; "everything else" = step total - their sum.
The routed-experts module runs the shared experts it is handed (a backend may overlap them), so its
time includes theirs: the shared experts are timed on their own and subtracted.

On the hetero backend the trace also holds the other threads' spans, from the hook points of its
worker and copier (set here, cleared on exit): the CPU worker's expert job per layer (WORKER_OP) and
every expert copy into a cache slot (COPY_OP). They are trace events only: the main thread's
"routed experts" already contains the time it waited for the worker, and copies overlap the step.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ..experts.hetero import hetero_session
from ..model import transformer as transformer_module
from ..model.moe import MoE

OPS = ("embedding", "block norms", "attention (MLA)", "gate", "routed experts", "shared experts", "dense MLP",
       "final norm + lm_head")
OTHER = "everything else"
WORKER_OP = "CPU experts (worker)"         # trace only: the hetero worker's job of one layer
COPY_OP = "expert copy"                     # trace only: one expert copied into a cache slot
_EXPERTS_WITH_SHARED = "routed + shared"   # the routed-experts module's own time, before subtraction


class OpTimes:
    """Seconds and calls per (op, layer); layer None for the model-level ops."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.seconds: dict[tuple[str, int | None], float] = defaultdict(float)
        self.calls: dict[tuple[str, int | None], int] = defaultdict(int)
        self.events: list[tuple[str, int | None, float, float, str]] = []   # (op, layer, start, seconds, thread)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.events.clear()

    def add(self, op: str, layer: int | None, seconds: float, start: float | None = None) -> None:
        self.seconds[op, layer] += seconds
        self.calls[op, layer] += 1
        if start is not None:
            self.events.append((op, layer, start, seconds, threading.current_thread().name))

    def wrap(self, fn: Callable, op: str) -> Callable:
        def timed(*a, **kw):
            self.sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.sync()
            self.add(op, None, time.perf_counter() - t0, t0)
            return out
        return timed

    def event(self, op: str, layer: int | None, start: float, seconds: float) -> None:
        """A trace event on the calling thread, not counted as an op (other threads' spans)."""
        self.events.append((op, layer, start, seconds, threading.current_thread().name))

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        """A trace event around a whole step (not counted as an op)."""
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.events.append((name, None, t0, time.perf_counter() - t0, threading.current_thread().name))

    def per_op(self) -> dict[str, dict[int | None, float]]:
        """op -> {layer: seconds}, with the shared experts subtracted from the routed-experts module."""
        out: dict[str, dict[int | None, float]] = {op: {} for op in OPS}
        for (op, layer), s in self.seconds.items():
            if op == _EXPERTS_WITH_SHARED:
                op, s = "routed experts", s - self.seconds.get(("shared experts", layer), 0.0)
            out[op][layer] = out[op].get(layer, 0.0) + s
        return out


def _hook(times: OpTimes, module: torch.nn.Module, op: str, layer: int | None) -> list:
    starts: list[float] = []

    def pre(_m, _args):
        times.sync()
        starts.append(time.perf_counter())

    def post(_m, _args, _out):
        times.sync()
        t0 = starts.pop()
        times.add(op, layer, time.perf_counter() - t0, t0)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


@contextmanager
def op_timers(model: transformer_module.Transformer, device: torch.device) -> Iterator[OpTimes]:
    """Time every op of `model` while inside; hooks and wrappers removed on exit (also on error)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = OpTimes(sync)
    handles = _hook(times, model.norm, "final norm + lm_head", None)
    for i, block in enumerate(model.layers):
        handles += _hook(times, block.attn_norm, "block norms", i)
        handles += _hook(times, block.ffn_norm, "block norms", i)
        handles += _hook(times, block.attn, "attention (MLA)", i)
        if isinstance(block.ffn, MoE):
            handles += _hook(times, block.ffn.gate, "gate", i)
            handles += _hook(times, block.ffn.experts, _EXPERTS_WITH_SHARED, i)
            if block.ffn.shared_experts is not None:
                handles += _hook(times, block.ffn.shared_experts, "shared experts", i)
        else:
            handles += _hook(times, block.ffn, "dense MLP", i)
    # Transformer.forward calls these two functionally (no module to hook); only it uses them there.
    originals = {"embedding": transformer_module.embedding, "linear": transformer_module.linear}
    transformer_module.embedding = times.wrap(originals["embedding"], "embedding")
    transformer_module.linear = times.wrap(originals["linear"], "final norm + lm_head")
    session = hetero_session(model)
    if session is not None:
        session.worker.on_job = lambda job, t0, s: times.event(WORKER_OP, job.layer, t0, s)
        session.copier.on_copy = lambda cache, expert, slot, t0, s: times.event(COPY_OP, cache.layer, t0, s)
    try:
        yield times
    finally:
        for h in handles:
            h.remove()
        transformer_module.embedding, transformer_module.linear = originals["embedding"], originals["linear"]
        if session is not None:
            try:
                session.drain()          # copies issued inside are reported before the hook goes
            finally:
                session.worker.on_job = session.copier.on_copy = None


def breakdown(times: OpTimes, total_s: float, steps: int) -> dict:
    """{"step_ms", "steps", "ops": [{"op", "ms", "percent", "layers": {layer: ms}}]} per step, the last
    op "everything else" (total - sum of the timed ops, never below 0)."""
    per_op = times.per_op()
    step = total_s / steps
    ops = []
    for op in OPS:
        layers = {("model" if k is None else str(k)): v / steps * 1e3 for k, v in sorted(
            per_op[op].items(), key=lambda kv: -1 if kv[0] is None else kv[0])}
        ops.append({"op": op, "ms": sum(layers.values()), "layers": layers})
    rest = max(0.0, step * 1e3 - sum(o["ms"] for o in ops))
    ops.append({"op": OTHER, "ms": rest, "layers": {}})
    for o in ops:
        o["percent"] = 100 * o["ms"] / (step * 1e3) if step > 0 else 0.0
    return {"step_ms": step * 1e3, "steps": steps, "ops": ops}


def replay(rt, prompt_ids: list[int], new_ids: list[int], decode_steps: int = 8) -> dict:
    """A generation's per-op breakdown (`hetero-rt run -v`), profiled apart from the timed run: its
    prompt's prefill again, then up to `decode_steps` of its decode steps (each generated token fed
    back at its position; the last one never was). {"prefill": breakdown, "decode": breakdown or None}."""
    with op_timers(rt.model, rt.device) as times:
        t0 = time.perf_counter()
        rt.step(torch.tensor(prompt_ids), 0, last_only=True)
        total = time.perf_counter() - t0
    out = {"prefill": breakdown(times, total, 1), "decode": None}
    fed = list(new_ids[:-1][:decode_steps])
    if fed:
        with op_timers(rt.model, rt.device) as times:
            t0 = time.perf_counter()
            for i, tok in enumerate(fed):
                rt.step(torch.tensor([tok]), len(prompt_ids) + i, last_only=True)
            total = time.perf_counter() - t0
        out["decode"] = breakdown(times, total, len(fed))
    return out


def describe(title: str, b: dict) -> str:
    lines = [f"{title}: {b['step_ms']:.3f} ms per step (mean of {b['steps']}, profiled: hooks synchronize "
             "around every op)", "", "| op | ms | % of step |", "| --- | ---: | ---: |"]
    lines += [f"| {o['op']} | {o['ms']:.3f} | {o['percent']:.1f} |" for o in b["ops"]]
    return "\n".join(lines)


def chrome_trace(phases: list[tuple[str, list[tuple[str, int | None, float, float, str]]]]) -> dict:
    """Chrome / Perfetto trace events ("X" complete events, microseconds) of the profiled phases: one
    process per phase (its label), one track per thread, an event per op per layer and per step.
    Open with https://ui.perfetto.dev or chrome://tracing."""
    events, tids = [], {}
    for pid, (label, recorded) in enumerate(phases, start=1):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": label}})
        base = min((e[2] for e in recorded), default=0.0)
        for op, layer, start, seconds, thread in recorded:
            tid = tids.setdefault(thread, len(tids) + 1)
            events.append({"name": op if layer is None else f"{op} [{layer}]", "cat": op, "ph": "X", "pid": pid,
                           "tid": tid, "ts": (start - base) * 1e6, "dur": seconds * 1e6,
                           "args": {} if layer is None else {"layer": layer}})
    for thread, tid in tids.items():
        for pid in range(1, len(phases) + 1):
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": thread}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}
