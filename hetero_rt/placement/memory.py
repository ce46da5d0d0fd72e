"""The memory planner: bytes per device of weights (by kind), the latent KV cache and working
buffers for a resolved Plan, from metadata only (config + tensor names, dtypes and shapes), and a
verdict against the user's budgets. Answers in seconds for a DeepSeek-V3-sized checkpoint.

Accounting (documented in docs/placement_rules.md):
- a weight occupies numel x (bytes of the dtype it is placed in) on its device, except GGUF routed
  experts on a backend that runs their format in place (numba, hetero: Q4_K, Q8_0, ...): their stored bytes
  (they stay in the memory map; other formats are dequantized at load to the dtype), and likewise 2-D
  weights placed with `format: stored`; FP8 weights are
  dequantized at load, so their `*_scale_inv` tensors take no memory after loading; the gate's
  correction bias stays fp32; MTP layers are not loaded;
- the GPU expert cache of layers on a backend that keeps one (hetero; kind expert_cache): slots x 3 x I x D x dtype
  bytes per layer (+ 2 streaming slots with hetero.stream), on the main device, and two fp32
  (512, hidden) accumulators of the scheduler among the working buffers;
- KV cache: slots x layers x context x (kv_lora_rank + qk_rope_head_dim; GQA: 2 x Hkv x head_dim) x
  dtype bytes, on the main device (one slot per sequence decoded at once: the server's --parallel);
- working buffers on the main device, for a prefill chunk of C tokens against S = context positions:
  fp32 attention scores and probabilities 2 x heads x C x S x 4, the keys and values attention reads
  besides the cache (MLA's naive path expands the latent per head: S x heads x (qk_nope + v) x dtype
  bytes; GQA reads its cache's Hkv heads, at most a contiguous copy of each: 2 x S x Hkv x head_dim x
  dtype bytes), the logits C x vocab x 4, and hidden states
  C x max(intermediate, heads x qk_head_dim) x 4 x 4; with FP8-stored weights, the largest one's
  dense copy plus the fp32 temporaries of dequantizing 1024 rows at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..checkpoint.source import TensorMeta
from ..config import PREFILL_CHUNK, ModelArgs
from ..experts import registry
from ..quant.ggml import stored_bytes, stored_format
from .plan import Plan
from .sizes import fmt_bytes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1}


@dataclass
class DeviceMemory:
    weights: dict[str, int] = field(default_factory=dict)   # kind -> bytes
    kv_cache: int = 0
    working: int = 0

    @property
    def total(self) -> int:
        return sum(self.weights.values()) + self.kv_cache + self.working


@dataclass
class MemoryPlan:
    devices: dict[str, DeviceMemory]
    budgets: dict[str, int]
    context: int
    slots: int
    expert_layer_bytes: dict[int, int]                       # per MoE layer, routed experts
    # (kind, ggml type, placed dtype) -> [tensors, stored bytes, bytes after load]: placed to run as
    # stored, but a type without a kernel: dequantized at load (the loader says so too)
    dequantized: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)

    def over(self) -> dict[str, int]:
        return {d: self.devices[d].total - b for d, b in self.budgets.items()
                if d in self.devices and self.devices[d].total > b}

    def describe(self) -> str:
        lines = []
        for dev, mem in self.devices.items():
            budget = self.budgets.get(dev)
            lines.append(f"{dev}:" + (f"  (budget {fmt_bytes(budget)})" if budget else ""))
            for kind, b in sorted(mem.weights.items(), key=lambda kv: -kv[1]):
                lines.append(f"  weights {kind:16s} {fmt_bytes(b):>12s}")
            if mem.kv_cache:
                what = f"{self.context} positions" + (f" x {self.slots} slots" if self.slots > 1 else "")
                lines.append(f"  kv cache ({what})  {fmt_bytes(mem.kv_cache):>9s}")
            if mem.working:
                lines.append(f"  working buffers          {fmt_bytes(mem.working):>12s}")
            lines.append(f"  total                    {fmt_bytes(mem.total):>12s}")
        for (kind, ggml, placed), (n, stored, loaded) in sorted(self.dequantized.items()):
            lines.append(f"notice: {n} {kind} {'matrix' if n == 1 else 'matrices'} in {ggml} have no kernel that reads them in place: "
                         f"dequantized at load to {placed}, {fmt_bytes(stored)} in the file -> {fmt_bytes(loaded)}")
        lines.append(self.verdict())
        return "\n".join(lines)

    def verdict(self) -> str:
        over = self.over()
        if not over:
            return "verdict: fits" + ("" if self.budgets else " (no budget given: pass --gpu-mem / --host-mem)")
        parts = []
        for dev, missing in over.items():
            hint = ""
            if dev != "cpu":
                movable = sorted(self.expert_layer_bytes.values(), reverse=True)
                gpu_expert_layers = self.devices[dev].weights.get("routed_experts", 0)
                if self.devices[dev].weights.get("expert_cache", 0) >= missing:
                    hint = "; lower hetero.cache (the GPU expert caches) in the rules"
                elif gpu_expert_layers and movable:
                    n = math.ceil(missing / movable[0])
                    hint = f"; move routed experts of at least {n} layer(s) to the CPU"
                else:
                    hint = "; reduce --context or move dense modules' dtype down"
            else:
                hint = "; place experts in a smaller dtype or add RAM"
            parts.append(f"{dev} is short by {fmt_bytes(missing)}{hint}")
        return "verdict: DOES NOT FIT: " + "; ".join(parts)


def _ggml_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[dtype]]
    return math.prod(shape) // block * size


def plan_memory(args: ModelArgs, plan: Plan, tensors: TensorMeta, context: int,
                main_dtype: str, budgets: dict[str, int] | None = None, slots: int = 1) -> MemoryPlan:
    devices: dict[str, DeviceMemory] = {}
    expert_layers: dict[int, int] = {}
    expand = 0  # largest transient dense copy of an FP8 weight during its matmul
    dequantized: dict[tuple[str, str, str], list[int]] = {}
    for name, (dtype, shape) in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        p = plan.owner(name)
        if p is None:
            continue  # MTP layers and rope buffers: not loaded
        placed = "float32" if name.endswith("e_score_correction_bias") else (p.dtype or main_dtype)
        nbytes = math.prod(shape) * DTYPE_BYTES[placed]
        stored = stored_format(dtype, shape)
        as_stored = ((p.module.kind == "routed_experts" and bool(registry.get(p.backend).stored_formats))
                     or (p.format == "stored" and len(shape) == 2))
        if as_stored and stored is not None and (p.module.kind != "routed_experts"
                                                 or registry.get(p.backend).runs_stored(stored)):
            nbytes = stored_bytes(stored, shape)   # kept as stored (GGUF: in the memory map; FP8: repacked)
        elif as_stored and dtype in GGMLQuantizationType.__members__:
            entry = dequantized.setdefault((p.module.kind, dtype, placed), [0, 0, 0])
            entry[0] += 1
            entry[1] += _ggml_bytes(dtype, shape)
            entry[2] += nbytes
        if p.format == "float8_e4m3" and len(shape) == 2:  # 1 byte per value + an fp32 scale per 128x128
            nbytes = math.prod(shape) + 4 * math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128)
            expand = max(expand, math.prod(shape) * DTYPE_BYTES[placed] + 8 * 1024 * shape[1])
        mem = devices.setdefault(p.device, DeviceMemory())
        mem.weights[p.module.kind] = mem.weights.get(p.module.kind, 0) + nbytes
        if p.module.kind == "routed_experts":
            expert_layers[p.module.layer] = expert_layers.get(p.module.layer, 0) + nbytes
    main = devices.setdefault(plan.main.device, DeviceMemory())
    cache = expert_cache_bytes(args, plan, main_dtype)
    if cache:
        main.weights["expert_cache"] = cache
    main.kv_cache = slots * kv_cache_bytes(args, context, main_dtype)
    main.working = working_bytes(args, context, main_dtype) + expand
    if any(_has_gpu_cache(p) for p in plan.placements):  # the hetero layers' fp32 (T, D) accumulators
        main.working += 2 * PREFILL_CHUNK * args.hidden_size * 4
    return MemoryPlan(devices, budgets or {}, context, slots, expert_layers, dequantized)


def expert_cache_bytes(args: ModelArgs, plan: Plan, dtype: str) -> int:
    """GPU expert caches of the layers on backend hetero: slots x one expert (w1, w3, w2) in the main
    dtype, plus two streaming slots where the cost model may stream experts (hetero.stream)."""
    per = 3 * args.moe_intermediate_size * args.hidden_size * DTYPE_BYTES[dtype]
    total = 0
    for p in plan.placements:
        if _has_gpu_cache(p):
            total += p.hetero.slots(per, args.n_routed_experts) * per + (2 * per if p.hetero.stream else 0)
    return total


def _has_gpu_cache(p) -> bool:
    return p.module.kind == "routed_experts" and registry.get(p.backend).gpu_cache


def kv_cache_bytes(args: ModelArgs, context: int, dtype: str) -> int:
    """One slot's cache: MLA's latent or GQA's K and V (ModelArgs.kv_cache_width) for every layer."""
    return args.num_hidden_layers * context * args.kv_cache_width * DTYPE_BYTES[dtype]


def working_bytes(args: ModelArgs, context: int, dtype: str) -> int:
    c, s, h = min(PREFILL_CHUNK, context), context, args.num_attention_heads
    scores = 2 * h * c * s * 4
    logits = c * args.vocab_size * 4
    hidden = c * max(args.intermediate_size, h * args.qk_head_dim) * 4 * 4
    return scores + attention_kv_bytes(args, s, dtype) + logits + hidden


def attention_kv_bytes(args: ModelArgs, positions: int, dtype: str) -> int:
    """Keys and values one attention call over `positions` holds besides the cache: MLA's naive path
    expands the latent into every head's K (nope part) and V; GQA attends over its cache's K/V heads as
    they are (einsum's contiguous copy of K and of V at most), with no per-query-head expansion."""
    if args.attention == "gqa":
        return 2 * positions * args.num_key_value_heads * args.head_dim * DTYPE_BYTES[dtype]
    return positions * args.num_attention_heads * (args.qk_nope_head_dim + args.v_head_dim) * DTYPE_BYTES[dtype]
