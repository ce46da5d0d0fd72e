"""`hetero-rt bench`, llama-bench style: prefill (pp) and decode (tg) tokens/s per placement (rules
file) x thread count, mean +- std over repetitions, with the machine it ran on, a per-op breakdown
of a decode step and of the prefill, the bytes a decode token reads against the read bandwidth
(measured after the runs, so that its buffer is in no peak), and peak memory per placement. The
result is one JSON document (`bench(...)`): "runs" (one per rules file: placement, breakdown, bytes,
memory) and "rows" (one per run x thread count x test, every repetition's seconds and tokens/s; a
row's "run" indexes "runs"); the markdown report and the CSV are views of it, so a later script can
build docs tables from the JSON alone.

Measurement:
  pp<P>: one forward of P random token ids from position 0 (rt.step(ids, 0, last_only=True)), timed;
  tg<N>: after an untimed prompt of TG_PROMPT random ids, N single-token steps against the cache,
         timed together (token ids are random: sampling is outside the model).
Each model is loaded once per rules file and warmed up (rt.warmup()); repetition 0 is an untimed
warm-up, then the repetitions run interleaved across the thread counts (rep 1: t1, t2, ..., rep 2:
t1, t2, ...) so that drift (thermals, other load) spreads over all of them. The per-op breakdown runs
after the timed runs, at the largest thread count, with hooks (hetero_rt.bench.profile).
"""
from __future__ import annotations

import csv
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..api import dtype_name, load
from ..checkpoint.source import open_source
from ..errors import HeteroRTError
from ..placement.memory import plan_memory
from ..placement.sizes import fmt_bytes, peak_rss_bytes
from . import cache_curve, document, plots, profile
from . import machine as machine_info
from .routing import RoutingRecorder

SCHEMA = document.SCHEMA
TG_PROMPT = 16            # cached positions before the timed decode steps
PROFILE_DECODE_STEPS = 8  # decode steps averaged in the breakdown (at most N)
CSV_FIELDS = ("run", "model", "rules", "threads", "test", "kind", "tokens", "repetitions", "mean_tokens_per_s",
              "std_tokens_per_s", "tokens_per_s", "seconds")


def bench(model: str | Path, rules: Sequence[str | Path | None], prompt_tokens: int, gen_tokens: int,
          threads: Sequence[int], repetitions: int, peak_rss: Callable[[], int], *, context: int | None = None,
          dtype: str | None = None, device: str | None = None, cpu_fallback: bool = False, check_memory: bool = True,
          probe_bytes: int = machine_info.BANDWIDTH_PROBE_BYTES, seed: int = 0, log=print) -> dict:
    """Run the benchmark; returns the JSON document (see the module docstring). rules: one entry per
    placement, None for the default one. peak_rss: the process's high-water RSS reader."""
    need = max(prompt_tokens, TG_PROMPT + gen_tokens)
    if context is not None and context < need:
        raise HeteroRTError(f"--context {context} is too small: the tests need {need} positions")
    doc = document.document(
        "hetero-rt bench", model, {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
                                   "tg_prompt_tokens": TG_PROMPT, "threads": list(threads), "repetitions": repetitions,
                                   "context": context or need, "seed": seed},
        None, [])                                     # machine: filled after the runs
    for i, r in enumerate(rules):
        run, rows = bench_rules(model, r, prompt_tokens, gen_tokens, threads, repetitions, peak_rss,
                                dict(context=context or need, dtype=dtype, device=device, cpu_fallback=cpu_fallback,
                                     check_memory=check_memory), seed, log)
        doc["runs"].append(run)
        doc["rows"] += [{"run": i, **row} for row in rows]
    # after the runs: the probe buffer must not count in their peak RSS
    doc["machine"] = machine_info.machine(max(threads), probe_bytes)
    bw = doc["machine"]["read_bandwidth"]["gb_per_s"]
    for row in doc["rows"]:
        if row["kind"] == "tg":
            row["read_gb_per_s"] = doc["runs"][row["run"]]["decode_bytes"]["total"] * row["mean_tokens_per_s"] / 1e9
            row["bandwidth_percent"] = 100 * row["read_gb_per_s"] / bw
    return doc


def bench_rules(model, rules, p: int, n: int, threads: Sequence[int], repetitions: int, peak_rss, load_kw: dict,
                seed: int, log) -> tuple[dict, list[dict]]:
    """One placement: load, warm up, timed runs, breakdown, bytes figures. Returns (run, rows)."""
    label = "default" if rules is None else Path(rules).name
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss_since = "load" if reset_peak_rss() else "process start"
    t0 = time.perf_counter()
    rt = load(model, rules, **load_kw)
    load_s = time.perf_counter() - t0
    log(f"[bench] {label}: loaded in {load_s:.1f} s; {rt.plan.summary()}; warm-up {rt.warmup():.2f} s")
    rng = np.random.default_rng(seed)
    tests = (("pp", p), ("tg", n))
    seconds = {(t, kind): [] for t in threads for kind, _ in tests}
    for rep in range(repetitions + 1):            # rep 0: untimed warm-up
        for t in threads:
            rt.set_threads(t)
            s_pp, s_tg = time_pp(rt, p, rng), time_tg(rt, n, rng)
            if rep:
                seconds[t, "pp"].append(s_pp)
                seconds[t, "tg"].append(s_tg)
    rows = [make_row(str(model), label, t, kind, tokens, seconds[t, kind])
            for t in threads for kind, tokens in tests]
    rt.set_threads(max(threads))
    decode, expert_cache = profile_decode(rt, n, rng)
    breakdown = {"threads": max(threads), "decode": decode, "prefill": profile_prefill(rt, p, rng)}
    gpu_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    run = {"rules": label, "rules_path": None if rules is None else str(rules), "placement": rt.plan.summary(),
           "dtype": dtype_name(rt.dtype), "device": str(rt.device), "load_s": load_s, "breakdown": breakdown,
           "decode_bytes": decode_bytes(rt), "expert_cache": expert_cache,
           "memory": {"peak_rss_bytes": peak_rss(), "peak_rss_since": rss_since, "gpu_max_allocated_bytes": gpu_peak}}
    del rt
    gc.collect()
    return run, rows


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: 5 > /proc/self/clear_refs), so each
    placement's peak is its own; False where that is not possible (the peak is then since start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ids(rng, rt, n: int) -> torch.Tensor:
    return torch.from_numpy(rng.integers(0, rt.args.vocab_size, n, dtype=np.int64))


def time_pp(rt, p: int, rng) -> float:
    ids = _ids(rng, rt, p)
    t0 = time.perf_counter()
    rt.step(ids, 0, last_only=True)              # logits come back on the CPU: the device is done
    return time.perf_counter() - t0


def time_tg(rt, n: int, rng) -> float:
    prompt, steps = _ids(rng, rt, TG_PROMPT), _ids(rng, rt, n)
    rt.step(prompt, 0, last_only=True)
    t0 = time.perf_counter()
    for i in range(n):
        rt.step(steps[i:i + 1], TG_PROMPT + i, last_only=True)
    return time.perf_counter() - t0


def profile_decode(rt, n: int, rng) -> tuple[dict, dict | None]:
    """(the decode breakdown, the expert-cache figures of those steps or None: bench.cache_curve)."""
    k = min(n, PROFILE_DECODE_STEPS)
    prompt, steps = _ids(rng, rt, TG_PROMPT), _ids(rng, rt, k)
    rt.step(prompt, 0, last_only=True)
    before = cache_curve.counters(rt.model)
    with profile.op_timers(rt.model, rt.device) as times, RoutingRecorder(rt.model) as routing:
        t0 = time.perf_counter()
        for i in range(k):
            with times.span(f"decode step {i}"):
                rt.step(steps[i:i + 1], TG_PROMPT + i, last_only=True)
        total = time.perf_counter() - t0
    # op_timers has drained the copies in flight: the counters are final
    return ({**profile.breakdown(times, total, k), "events": list(times.events)},
            cache_curve.figures(rt.model, routing.calls, before))


def profile_prefill(rt, p: int, rng) -> dict:
    ids = _ids(rng, rt, p)
    with profile.op_timers(rt.model, rt.device) as times:
        t0 = time.perf_counter()
        with times.span(f"prefill {p} tokens"):
            rt.step(ids, 0, last_only=True)
        total = time.perf_counter() - t0
    return {**profile.breakdown(times, total, 1), "events": list(times.events)}


def decode_bytes(rt) -> dict:
    """Weight bytes one decode token reads (memory planner): per MoE layer the routed experts' bytes of
    the k active experts (layer bytes / E x K), plus every dense weight but the embedding table, of
    which a token reads one row (the whole table when it is also the lm_head)."""
    args = rt.args
    source = open_source(rt.source)
    try:
        tensors = source.tensor_meta(args)
    finally:
        source.close()
    mem = plan_memory(args, rt.plan, tensors, rt.context, dtype_name(rt.dtype))
    kinds: dict[str, int] = {}
    for dev in mem.devices.values():
        for kind, b in dev.weights.items():
            kinds[kind] = kinds.get(kind, 0) + b
    experts = sum(b / args.n_routed_experts * args.num_experts_per_tok for b in mem.expert_layer_bytes.values())
    dense = sum(b for kind, b in kinds.items() if kind not in ("routed_experts", "expert_cache"))
    emb = kinds.get("embedding", 0)
    if not args.tie_word_embeddings:
        dense -= emb - emb / args.vocab_size
    return {"routed_experts_active": int(experts), "dense": int(dense), "total": int(experts + dense),
            "weights_by_kind": kinds, "experts_per_token": args.num_experts_per_tok,
            "routed_experts_per_layer": args.n_routed_experts, "embedding_one_row": not args.tie_word_embeddings}


def make_row(model: str, rules: str, threads: int, kind: str, tokens: int, seconds: list[float]) -> dict:
    tps = [tokens / s for s in seconds]
    return {"model": model, "rules": rules, "threads": threads, "test": f"{kind}{tokens}", "kind": kind,
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tps, "mean_tokens_per_s": statistics.fmean(tps),
            "std_tokens_per_s": statistics.stdev(tps) if len(tps) > 1 else 0.0}


def report(doc: dict) -> str:
    out = [machine_info.describe(doc["machine"]), "",
           "| model | rules | threads | test | t/s |", "| --- | --- | ---: | --- | ---: |"]
    out += [f"| {Path(r['model']).name} | {r['rules']} | {r['threads']} | {r['test']} | "
            f"{r['mean_tokens_per_s']:.2f} ± {r['std_tokens_per_s']:.2f} |" for r in doc["rows"]]
    for i, run in enumerate(doc["runs"]):
        out += ["", f"## {run['rules']}: {run['placement']}", "", _bytes_line(doc, i), _memory_line(run["memory"]),
                *_cache_lines(run.get("expert_cache")),
                "", profile.describe(f"decode step ({_threads(run['breakdown']['threads'])})",
                                     run["breakdown"]["decode"]),
                "", profile.describe(f"prefill of {doc['config']['prompt_tokens']} tokens",
                                     run["breakdown"]["prefill"])]
    return "\n".join(out)


def _bytes_line(doc: dict, i: int) -> str:
    """The decode bytes of run i against the read bandwidth, at its fastest tg row."""
    b, bw = doc["runs"][i]["decode_bytes"], doc["machine"]["read_bandwidth"]["gb_per_s"]
    best = max((r for r in doc["rows"] if r["run"] == i and r["kind"] == "tg"), key=lambda r: r["mean_tokens_per_s"])
    return (f"decode reads {b['total'] / 1e9:.4g} GB/token (routed experts {b['routed_experts_active'] / 1e9:.4g}, "
            f"dense {b['dense'] / 1e9:.4g}); at {best['mean_tokens_per_s']:.2f} tok/s ({_threads(best['threads'])}) "
            f"that is {best['read_gb_per_s']:.3g} GB/s = {best['bandwidth_percent']:.1f}% of the measured read "
            f"bandwidth ({bw:.2f} GB/s)")


def _cache_lines(c: dict | None) -> list[str]:
    if c is None:
        return []
    curve = dict(zip(c["curve"]["slots"], c["curve"]["belady_hit_rate"]))
    slots = sorted(set(c["slots_per_layer"].values()))
    belady = ", ".join(f"{curve[s]:.3f} at {s} slots" for s in slots if s in curve)
    m = c["measured"]
    return [f"expert cache ({'/'.join(map(str, slots))} of {c['n_experts']} experts per layer, {len(c['layers'])} "
            f"layers): hit rate {m['hit_rate']:.3f} over {c['calls']} profiled decode steps; Belady (same routing) "
            f"{belady}"]


def _memory_line(mem: dict) -> str:
    gpu = mem["gpu_max_allocated_bytes"]
    return (f"peak RSS {fmt_bytes(mem['peak_rss_bytes'])} (since {mem['peak_rss_since']})"
            + ("" if gpu is None else f"; GPU max allocated {fmt_bytes(gpu)}"))


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n > 1 else "")


def csv_rows(doc: dict) -> list[dict]:
    """One dict per JSON row (CSV_FIELDS); the repetitions' values joined with ';'."""
    return [{**{k: r[k] for k in CSV_FIELDS if k in r}, "repetitions": len(r["seconds"]),
             "tokens_per_s": ";".join(map(repr, r["tokens_per_s"])), "seconds": ";".join(map(repr, r["seconds"]))}
            for r in doc["rows"]]


def write_csv(doc: dict, path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(csv_rows(doc))


def bench_command(ns) -> int:
    """The CLI's `bench`: run, print the report to stdout (progress on stderr), write --json / --csv and
    --trace (the profiled prefill and decode steps as Chrome trace events) and --plot (PNG charts)."""
    log = lambda s: print(s, file=sys.stderr)
    doc = bench(ns.model, ns.rules or [None], ns.prompt_tokens, ns.gen_tokens, ns.threads, ns.repetitions,
                peak_rss_bytes,
                context=ns.context, dtype=ns.dtype, device=ns.device, cpu_fallback=ns.cpu_fallback,
                check_memory=not ns.skip_memory_check, probe_bytes=ns.bandwidth_probe, log=log)
    trace = profile.chrome_trace([(f"{run['rules']}: {phase}", run["breakdown"][phase].pop("events"))
                                  for run in doc["runs"] for phase in ("prefill", "decode")])
    print(report(doc))
    if ns.trace is not None:
        Path(ns.trace).write_text(json.dumps(trace) + "\n")
    if ns.plot is not None:
        plots.plot(doc, ns.plot)
    if ns.json is not None:
        document.write(doc, ns.json)
    if ns.csv is not None:
        write_csv(doc, ns.csv)
    return 0
