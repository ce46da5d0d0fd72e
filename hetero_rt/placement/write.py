"""Write a placement that fits a GPU budget: attention, KV cache, router, shared experts, dense
layers, embeddings and lm_head on the GPU; routed experts on the CPU, except whole expert layers
moved back onto the GPU while the remaining memory holds them (a static expert placement).
For a block-FP8 checkpoint (DeepSeek-V3/R1, Kimi-K2 as released) the GPU's attention, shared-expert
and dense-MLP weights stay FP8 (format: float8_e4m3) and the CPU's routed experts stay FP8 in the
kernels' rows, so the model is counted, and runs, at about its stored size."""
from __future__ import annotations

from ..checkpoint.names import names_for
from ..config import ModelArgs
from ..errors import HeteroRTError
from ..experts import registry
from .memory import plan_memory
from .plan import model_modules, resolve
from .schema import FP8_KINDS, parse_rules
from .sizes import fmt_bytes

HEADER = """\
# Placement written by `hetero-rt plan --write-rules` for {model} ({layers} layers, {experts} routed experts)
# GPU budget {budget}, context {context}. Dense part on {gpu}; routed experts on the CPU except {n_gpu}
# expert layer(s) that fit in the remaining GPU memory. Schema: docs/placement_rules.md.
"""


def write_rules(args: ModelArgs, tensors: dict, gpu_budget: int, context: int, dtype: str,
                expert_backend: str = registry.CPU_DEFAULT, gpu: str = "cuda", cpu_threads: int | None = None) -> str:
    fp8 = _stores_fp8(tensors)
    mem = _plan(args, _yaml(args, dtype, expert_backend, gpu, cpu_threads, [], fp8), tensors, context, dtype, gpu,
                gpu_budget)
    requantized = False
    if not fp8 and mem.devices[gpu].total > gpu_budget:   # the dense part in FP8 on the GPU (quantized at load)
        fp8 = requantized = True
        mem = _plan(args, _yaml(args, dtype, expert_backend, gpu, cpu_threads, [], fp8), tensors, context, dtype,
                    gpu, gpu_budget)
    dense_total = mem.devices[gpu].total
    if dense_total > gpu_budget:
        raise HeteroRTError(f"even with every routed expert on the CPU, {gpu} needs {fmt_bytes(dense_total)} "
                            f"(budget {fmt_bytes(gpu_budget)}): reduce --context or use a smaller dtype")
    room = gpu_budget - dense_total
    chosen = []
    every = sorted(mem.expert_layer_bytes)   # what each expert layer takes once on the GPU
    on_gpu = _plan(args, _yaml(args, dtype, expert_backend, gpu, cpu_threads, every, fp8), tensors, context,
                   dtype, gpu, gpu_budget).expert_layer_bytes
    for layer, nbytes in sorted(on_gpu.items()):
        if nbytes <= room:
            chosen.append(layer)
            room -= nbytes
    text = HEADER.format(model=args.model_type, layers=args.num_hidden_layers, experts=args.n_routed_experts,
                         budget=fmt_bytes(gpu_budget), context=context, gpu=gpu, n_gpu=len(chosen))
    if requantized:
        text += (f"# The dense part does not fit in {dtype}: attention, shared experts and dense MLPs are quantized to\n"
                 f"# block FP8 at load (not exact: about 3% error per weight, see quant/fp8.py).\n")
    text += _yaml(args, dtype, expert_backend, gpu, cpu_threads, chosen, fp8)
    if _plan(args, text, tensors, context, dtype, gpu, gpu_budget).over():  # a bug, not a user error
        raise HeteroRTError("internal error: the written placement does not fit its own budget")
    return text


def _plan(args, text, tensors, context, dtype, gpu, budget):
    plan = resolve(args, parse_rules(text, "<generated>"), check_devices=False)
    return plan_memory(args, plan, tensors, context, dtype, {gpu: budget})


def _stores_fp8(tensors: dict) -> bool:
    """The checkpoint's attention weights are block FP8 (an F8_E4M3 weight with its weight_scale_inv)."""
    return any(d == "F8_E4M3" and ".self_attn." in n and n + "_scale_inv" in tensors for n, (d, _) in tensors.items())


def _yaml(args: ModelArgs, dtype: str, backend: str, gpu: str, threads: int | None, gpu_layers: list[int],
          fp8: bool) -> str:
    place = f"{{device: cpu, backend: {backend}" + (f", threads: {threads}" if threads else "") + "}"
    lines = ["defaults:", f"  device: {gpu}", f"  dtype: {dtype}", "rules:",
             "  - match: {kind: routed_experts}", f"    place: {place}"]
    if fp8:
        present = {m.kind for m in model_modules(args)}   # Mixtral has no shared experts nor dense MLPs
        for kind in (k for k in FP8_KINDS if k in present):
            lines += [f"  - match: {{kind: {kind}}}", "    place: {format: float8_e4m3}"]
    if gpu_layers:
        alternatives = "|".join(str(i) for i in gpu_layers)
        moe = names_for(args).moe      # the MoE block's module in a layer (Mixtral: block_sparse_moe)
        lines += [f"  - match: {{name: 'model\\.layers\\.({alternatives})\\.{moe}\\.experts'}}",
                  f"    place: {{device: {gpu}, backend: {registry.DEFAULT}}}"]
    return "\n".join(lines) + "\n"
