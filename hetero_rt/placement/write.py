"""Write a placement that fits a GPU budget: attention, KV cache, router, shared experts, dense
layers, embeddings and lm_head on the GPU; routed experts on the CPU, except whole expert layers
moved back onto the GPU while the remaining memory holds them (a static expert placement)."""
from __future__ import annotations

from ..config import ModelArgs
from ..errors import HeteroRTError
from ..experts import registry
from .memory import plan_memory
from .plan import resolve
from .schema import parse_rules
from .sizes import fmt_bytes

HEADER = """\
# Placement written by `hetero-rt plan --write-rules` for {model} ({layers} layers, {experts} routed experts)
# GPU budget {budget}, context {context}. Dense part on {gpu}; routed experts on the CPU except {n_gpu}
# expert layer(s) that fit in the remaining GPU memory. Schema: docs/placement_rules.md.
"""


def write_rules(args: ModelArgs, tensors: dict, gpu_budget: int, context: int, dtype: str,
                expert_backend: str = registry.CPU_DEFAULT, gpu: str = "cuda", cpu_threads: int | None = None) -> str:
    base = _yaml(args, dtype, expert_backend, gpu, cpu_threads, gpu_layers=[])
    mem = _plan(args, base, tensors, context, dtype, gpu, gpu_budget)
    dense_total = mem.devices[gpu].total
    if dense_total > gpu_budget:
        raise HeteroRTError(f"even with every routed expert on the CPU, {gpu} needs {fmt_bytes(dense_total)} "
                            f"(budget {fmt_bytes(gpu_budget)}): reduce --context or use a smaller dtype")
    room = gpu_budget - dense_total
    chosen = []
    for layer, nbytes in sorted(mem.expert_layer_bytes.items()):
        if nbytes <= room:
            chosen.append(layer)
            room -= nbytes
    text = HEADER.format(model=args.model_type, layers=args.num_hidden_layers, experts=args.n_routed_experts,
                         budget=fmt_bytes(gpu_budget), context=context, gpu=gpu, n_gpu=len(chosen))
    text += _yaml(args, dtype, expert_backend, gpu, cpu_threads, chosen)
    if _plan(args, text, tensors, context, dtype, gpu, gpu_budget).over():  # a bug, not a user error
        raise HeteroRTError("internal error: the written placement does not fit its own budget")
    return text


def _plan(args, text, tensors, context, dtype, gpu, budget):
    plan = resolve(args, parse_rules(text, "<generated>"), check_devices=False)
    return plan_memory(args, plan, tensors, context, dtype, {gpu: budget})


def _yaml(args: ModelArgs, dtype: str, backend: str, gpu: str, threads: int | None, gpu_layers: list[int]) -> str:
    place = f"{{device: cpu, backend: {backend}" + (f", threads: {threads}" if threads else "") + "}"
    lines = ["defaults:", f"  device: {gpu}", f"  dtype: {dtype}", "rules:",
             "  - match: {kind: routed_experts}", f"    place: {place}"]
    if gpu_layers:
        alternatives = "|".join(str(i) for i in gpu_layers)
        lines += [f"  - match: {{name: 'model\\.layers\\.({alternatives})\\.mlp\\.experts'}}",
                  f"    place: {{device: {gpu}, backend: {registry.DEFAULT}}}"]
    return "\n".join(lines) + "\n"
