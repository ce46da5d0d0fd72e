"""Benchmark of heterogeneous execution (scripts/bench_hetero.py): prefill and decode tokens/s for
all routed experts on the CPU (numba backend, no scheduler), the scheduler without a cache (shared
experts overlapped with the CPU), a static cache and a dynamic cache with prefetch at several sizes;
the cache hit rate beside Belady's optimum on the routing trace recorded in the same run; the overlap
achieved; the cost model's per-layer view of the prompt. One model load, one process: the
configurations are installed in turn on the same NumbaExperts (hetero_rt.experts.hetero.install)."""
from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..api import load
from ..experts.hetero import install, make_policy
from ..experts.hetero.cost_model import CostModel
from ..experts.hetero.expert_cache import ExpertCache, belady_hits, simulate
from ..experts.hetero.prefetch import Copier
from ..placement.schema import HeteroSpec
from . import document
from . import machine as machine_info
from .routing import RoutingRecorder, random_prompts, record_routing


def bench(path: str | Path, sizes: list[int], prompt_len: int, new_tokens: int, dtype: str = "bfloat16",
          profile_prompts: int = 4, seed: int = 0, repeats: int = 2, cost: CostModel = CostModel(),
          json_path: str | Path | None = None, probe_bytes: int = machine_info.BANDWIDTH_PROBE_BYTES) -> str:
    """Run it; returns the markdown report, and writes the JSON document (hetero_rt.bench.document: one
    row per configuration, its counters flattened) to json_path if given, with a read bandwidth
    measured over probe_bytes after the runs."""
    rules = Path(tempfile.mkdtemp()) / "numba.yaml"
    rules.write_text(f"defaults: {{device: cuda, dtype: {dtype}}}\nrules:\n  - match: {{kind: routed_experts}}\n"
                     "    place: {device: cpu, backend: numba}\n")
    rt = load(path, rules, cpu_fallback=True)
    args = rt.args
    moe = [i for i in range(args.num_hidden_layers) if args.is_moe_layer(i)]
    prompt = random_prompts(1, prompt_len, args.vocab_size, seed + 1)[0]
    profile = rules.parent / "profile.json"
    rec = record_routing(rt, random_prompts(profile_prompts, prompt_len, args.vocab_size, seed), new_tokens)
    rec.save(profile)

    rows, traces, profiles = [], {}, {}
    rows.append(("all experts on the CPU (numba)", None, *timed(rt, prompt, new_tokens, repeats), None))
    configs = [("scheduler, no cache", 0, HeteroSpec(cache_slots=0, prefetch=False))]
    for s in sizes:
        configs.append((f"static cache {s}", s, HeteroSpec(cache_slots=s, policy="static", profile=str(profile),
                                                           prefetch=False)))
        configs.append((f"dynamic cache {s} + prefetch", s, HeteroSpec(cache_slots=s, profile=str(profile))))
    mid = sizes[len(sizes) // 2]
    configs.append((f"dynamic cache {mid} + prefetch, overlap off", mid,
                    HeteroSpec(cache_slots=mid, profile=str(profile), overlap=False)))
    configs.append((f"dynamic cache {mid} + prefetch + stream (cost model)", mid,
                    HeteroSpec(cache_slots=mid, profile=str(profile), stream=True, pcie_gbps=cost.pcie_gbps,
                               cpu_gflops=cost.cpu_gflops)))
    for name, slots, spec in configs:
        session = install(rt.model, {i: spec for i in moe}, "cpu", copier=Copier("cpu"))
        timed(rt, prompt, 4, 1)                     # warm-up (compiles, fills dynamic caches)
        session.drain()
        session.reset_counters()
        with RoutingRecorder(rt.model) as rec:
            pre, dec = timed(rt, prompt, new_tokens, 1)
        traces[name] = rec.calls
        rows.append((name, slots, pre, dec, session.total()))
        if spec.stream:
            profiles[name] = session.describe()
        session.close()
    rates = {name: hit_rates(rt, traces[name], slots, profile) for name, slots, *_ in rows[1:]}
    text = report(rt, rows, rates, moe, path, prompt_len, new_tokens, dtype, cost)
    if json_path is not None:
        config = {"sizes": sizes, "prompt_len": prompt_len, "new_tokens": new_tokens, "dtype": dtype,
                  "profile_prompts": profile_prompts, "seed": seed, "repeats": repeats,
                  "cost_model": {"pcie_gbps": cost.pcie_gbps, "cpu_gflops": cost.cpu_gflops},
                  "moe_layers": moe, "cpu_fallback": True}
        document.write(document.document("bench_hetero", path, config,
                                         machine_info.machine(torch.get_num_threads(), probe_bytes),
                                         json_rows(rows, rates)), json_path)
    for name, table in profiles.items():
        text += f"\n\nPer-layer profile, {name} (hetero_session(model).describe()):\n\n{table}"
    return text + "\n\n" + deferral_effect(rt, moe, prompt, new_tokens)


def deferral_effect(rt, moe, prompt, new_tokens, ds=(1, 2)) -> str:
    """Logits of the prompt with deferral d against without (same scheduler, no cache), and speed."""
    out = ["Expert deferral (d lowest-weighted experts of each token added one MoE layer later; not in the "
           "last MoE layer), prompt logits against no deferral:", "",
           "| d | max abs diff / max abs logit | mean abs diff | top-1 agreement (prompt positions) | "
           "greedy tokens equal (of new) | decode tok/s |", "|---|---|---|---|---|---|"]
    ref = None
    for d in (0, *[d for d in ds if d < rt.args.num_experts_per_tok]):   # defer below top-k only
        session = install(rt.model, {i: HeteroSpec(cache_slots=0, prefetch=False, defer=d) for i in moe}, "cpu")
        logits = rt.logits(prompt)
        res = rt.generate(prompt, max_new_tokens=new_tokens)
        session.close()
        if ref is None:
            ref, ref_ids = logits, res.new_ids
            continue
        diff = np.abs(logits - ref)
        same = sum(a == b for a, b in zip(res.new_ids, ref_ids))
        out.append(f"| {d} | {diff.max() / np.abs(ref).max():.4f} | {diff.mean():.4f} | "
                   f"{(logits.argmax(-1) == ref.argmax(-1)).mean():.3f} | {same} / {len(ref_ids)} | "
                   f"{res.decode_tokens_per_s:.2f} |")
    return "\n".join(out)


def timed(rt, prompt, new_tokens, repeats) -> tuple[float, float]:
    """Best of `repeats`: (prefill tokens/s, decode tokens/s)."""
    best = (0.0, 0.0)
    for _ in range(repeats):
        res = rt.generate(prompt, max_new_tokens=new_tokens)
        best = (max(best[0], res.prefill_tokens_per_s), max(best[1], res.decode_tokens_per_s))
    return best


def belady_rate(calls_by_layer, slots: int) -> float:
    hits = requests = 0
    for calls in calls_by_layer.values():
        h, r = belady_hits([np.unique(c) for c in calls], slots, warm=True)
        hits, requests = hits + h, requests + r
    return hits / requests if requests else 0.0


def simulated_dynamic(rt, calls_by_layer, slots: int, profile: Path) -> float:
    """Dynamic policy without prefetch replayed on the trace (copies complete between calls), starting
    from the profile's hottest experts like the runtime's."""
    hits = requests = 0
    for layer, calls in calls_by_layer.items():
        src = rt.model.layers[layer].ffn.experts
        src = getattr(src, "host", src)
        policy = make_policy("dynamic", layer, src.n_experts, str(profile), 0.95)
        c = simulate([c.astype(np.int64) for c in calls],
                     lambda: ExpertCache(src, slots, "cpu", torch.float32, policy, Copier("cpu", threaded=False)))
        hits, requests = hits + c.hits, requests + c.hits + c.misses
    return hits / requests if requests else 0.0


def hit_rates(rt, trace, slots: int, profile: Path) -> tuple[float | None, float | None]:
    """(Belady, the dynamic policy replayed) on a configuration's trace; None without a cache."""
    if not slots:
        return None, None
    return belady_rate(trace, slots), simulated_dynamic(rt, trace, slots, profile)


def json_rows(rows, rates) -> list[dict]:
    base_pre, base_dec = rows[0][2], rows[0][3]
    out = []
    for name, slots, pre, dec, c in rows:
        belady, replay = rates.get(name, (None, None))
        counters = {} if c is None else c.as_dict()
        out.append({"configuration": name, "slots": slots, "prefill_tokens_per_s": pre,
                    "decode_tokens_per_s": dec, "prefill_vs_cpu_only": pre / base_pre,
                    "decode_vs_cpu_only": dec / base_dec, "belady_hit_rate": belady, "dynamic_replay_hit_rate": replay,
                    **counters})
    return out


def report(rt, rows, rates, moe, path, prompt_len, new_tokens, dtype, cost) -> str:
    base_pre, base_dec = rows[0][2], rows[0][3]
    out = [f"model: {path} ({rt.args.num_hidden_layers} layers, {len(moe)} MoE, {rt.args.n_routed_experts} experts "
           f"top-{rt.args.num_experts_per_tok}, hidden {rt.args.hidden_size}, expert inter "
           f"{rt.args.moe_intermediate_size}), dtype {dtype}; prompt {prompt_len} tokens, {new_tokens} new tokens",
           f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch threads "
           f"{torch.get_num_threads()}; CPU fallback: the 'GPU' side (shared + cached experts) is torch on the CPU",
           "", "| configuration | prefill tok/s | x CPU-only | decode tok/s | x CPU-only | hit rate | Belady "
           "(same trace) | dynamic, no prefetch (replayed) | overlap | prefetches issued / used | expert bytes "
           "copied |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, slots, pre, dec, c in rows:
        if c is None:
            out.append(f"| {name} | {pre:.1f} | 1.00 | {dec:.2f} | 1.00 | - | - | - | - | - | - |")
            continue
        belady, replay = rates[name]
        bel = f"{belady:.3f}" if slots else "-"
        dyn = f"{replay:.3f}" if slots else "-"
        out.append(f"| {name} | {pre:.1f} | {pre / base_pre:.2f} | {dec:.2f} | {dec / base_dec:.2f} | "
                   f"{c.hit_rate:.3f} | {bel} | {dyn} | {c.overlap:.2f} | {c.prefetches_issued} / "
                   f"{c.prefetches_used} | {c.bytes_experts / 2 ** 20:.1f} MiB |")
    out += ["", "Times summed over MoE layers (s): CPU busy, GPU busy, GPU waiting for the CPU; cost-model estimates.",
            "", "| configuration | cpu busy | gpu busy | gpu wait | stream calls | est. CPU | est. stream |",
            "|---|---|---|---|---|---|---|"]
    for name, _, _, _, c in rows[1:]:
        out.append(f"| {name} | {c.cpu_busy_s:.3f} | {c.gpu_busy_s:.3f} | {c.gpu_wait_s:.3f} | {c.stream_calls} | "
                   f"{c.est_cpu_s * 1e3:.2f} ms | {c.est_stream_s * 1e3:.2f} ms |")
    out += ["", cost_table(rt, cost)]
    return "\n".join(out)


def cost_table(rt, model: CostModel) -> str:
    """CPU vs stream estimates by prompt length for one layer of this model (bf16 on both sides) and of
    DeepSeek-V3 (Q4_K in host memory, bf16 on the GPU), uniform routing (T K / E tokens per expert)."""
    a = rt.args
    shapes = [(a.moe_intermediate_size, a.hidden_size, a.n_routed_experts, a.num_experts_per_tok, "bf16", 2.0),
              (2048, 7168, 256, 8, "q4_k", 0.5625)]                    # Q4_K: 144 bytes per 256 weights
    lines = [f"Cost model ({model}), uniform routing, every expert missed:", "",
             "| layer (I x D, E top-K, host format) | prompt tokens | tokens/expert | est. CPU | est. stream "
             "| choice |",
             "|---|---|---|---|---|---|"]
    for i, d, e, k, fmt, host_bytes_per_weight in shapes:
        flops, gpu_bytes, host_bytes = 6 * i * d, 3 * i * d * 2, int(3 * i * d * host_bytes_per_weight)
        for t in (1, 32, 128, 512, 2048, 8192):
            pairs = t * k
            counts = np.full(e, pairs / e) if pairs >= e else np.r_[np.ones(pairs), np.zeros(e - pairs)]
            choice, cpu, stream = model.choose(counts, host_bytes, gpu_bytes, flops)
            lines.append(f"| {i} x {d}, {e} top-{k}, {fmt} | {t} | {pairs / e:.2f} | {cpu * 1e3:.2f} ms | "
                         f"{stream * 1e3:.2f} ms | {choice} |")
    return "\n".join(lines)
