"""hetero_rt.load(): from a checkpoint path (and optional placement rules) to a Runtime."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from .checkpoint.source import open_source
from .config import ModelArgs
from .errors import HeteroRTError, MemoryBudgetError
from .placement.apply import TORCH_DTYPES, load_model
from .placement.defaults import default_rules
from .placement.memory import MemoryPlan, plan_memory
from .placement.sizes import fmt_bytes, machine_budgets
from .placement.plan import Plan, resolve
from .placement.schema import load_rules
from .runtime.engine import Runtime

_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load(path: str | Path, rules: str | Path | None = None, *, context: int | None = None,
         dtype: str | torch.dtype | None = None, device: str | None = None, cpu_fallback: bool = False,
         check_memory: bool = True, parallel: int = 1) -> Runtime:
    """Load a Hugging Face checkpoint directory (DeepSeek-V2/V3/R1, Kimi-K2, Qwen3-MoE, Qwen2-MoE,
    Mixtral, GLM-4.5) or a llama.cpp GGUF file of architecture deepseek2, qwen3moe, qwen2moe, glm4moe
    or llama with experts (`model.gguf`, or any part of a split `model-0000K-of-0000N.gguf`).

    rules:        a placement YAML (see docs/placement_rules.md); None: the default placement
                  (placement.defaults: for a GGUF on the CPU, every weight kept as stored, like
                  placement_rules/gguf-cpu-only.yaml; else everything on `device`).
    context:      KV-cache positions to preallocate (default min(max_position_embeddings, 4096)).
    dtype:        weight/activation dtype when the rules do not set one (default float32 for fp32
                  checkpoints and for the default placement of a GGUF on the CPU, else bfloat16).
    device:       without rules, where the whole model runs ("cpu" by default, "cuda").
    cpu_fallback: map every device the rules name to the CPU (for machines without a GPU).
    check_memory: before loading, compare the memory planner's total per device with what this machine
                  has and raise MemoryBudgetError (how much is needed, what fits) when it is short.
    parallel:     sequences decoded at once (the server's --parallel): one KV-cache slot of `context`
                  positions each, and as many conversations kept for prefix reuse.
    """
    source = open_source(path)
    args = source.args()
    plan = make_plan(args, rules, device, cpu_fallback, in_place=source.in_place, dtype=dtype)
    if plan.cpu_fallback:
        print(f"hetero_rt: cpu_fallback: the placement in {plan.source} is kept as written, but every device "
              f"is mapped to the CPU", file=sys.stderr)
    main_dtype = resolve_dtype(plan.main.dtype or dtype or source.embedding_dtype())
    context = context or min(args.max_position_embeddings, 4096)
    if check_memory:
        check_fits(source, args, plan, context, main_dtype, rules, dtype, parallel)
    model = load_model(source.loader(args), args, plan, main_dtype)
    return Runtime(model, args, source.tokenizer(), context, main_dtype, plan.main.device, Path(path), plan,
                   parallel)


def check_fits(source, args: ModelArgs, plan: Plan, context: int, main_dtype: torch.dtype,
               rules: str | Path | None, dtype: str | torch.dtype | None, parallel: int = 1) -> None:
    """The memory planner's total per device against this machine's RAM and GPU memory, before a byte
    is loaded; short: a MemoryBudgetError saying by how much, and whether the default placement fits."""
    tensors = source.tensor_meta(args)
    budgets, _ = machine_budgets({p.device for p in plan.placements})
    mem = plan_memory(args, plan, tensors, context, dtype_name(main_dtype), budgets, slots=parallel)
    if not mem.over():
        return
    hint = ("place part of the model on a GPU (placement_rules/), run a quantized GGUF of it, or preallocate "
            "fewer KV-cache positions (--context)")
    if rules is not None and source.in_place:
        default = make_plan(args, None, None, False, in_place=True, dtype=dtype)
        alt = plan_memory(args, default, tensors, context, dtype_name(resolve_dtype(default.main.dtype)), budgets,
                          slots=parallel)
        if not alt.over():
            hint = (f"the default placement (no --rules: weights kept as stored in the memory map) needs "
                    f"{_totals(alt)} and fits")
    raise MemoryBudgetError(f"{source.path}: the placement {plan.source} needs {_totals(mem)} but this machine has "
                            f"{', '.join(f'{d} {fmt_bytes(b)}' for d, b in sorted(budgets.items()))}; {hint}; "
                            f"`hetero-rt plan --model {source.path}` shows the breakdown (--skip-memory-check, or "
                            f"load(..., check_memory=False), loads anyway)")


def _totals(mem: MemoryPlan) -> str:
    return ", ".join(f"{d} {fmt_bytes(m.total)}" for d, m in mem.devices.items())


def make_plan(args: ModelArgs, rules: str | Path | None, device: str | None, cpu_fallback: bool,
              check_devices: bool = True, in_place: bool = False, dtype: str | torch.dtype | None = None) -> Plan:
    """Without rules, the default placement (placement.defaults) for `device`, for a checkpoint whose
    formats the CPU kernels read in place when in_place (GGUF), in `dtype` when given.
    check_devices=False plans for the GPU the rules name without checking this machine has one."""
    if rules is None:
        ruleset = default_rules(args, device, in_place, None if dtype is None else dtype_name(dtype))
    elif device is not None:
        raise HeteroRTError("pass either placement rules or device, not both: devices come from the rules")
    else:
        ruleset = load_rules(rules)
    return resolve(args, ruleset, cpu_fallback, check_devices)


def dtype_name(dtype: str | torch.dtype) -> str:
    """The placement name (float32, bfloat16, float16) of a dtype given as a name, alias or torch dtype."""
    return next(n for n, t in TORCH_DTYPES.items() if t == resolve_dtype(dtype))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in TORCH_DTYPES:
        raise HeteroRTError(f"dtype {dtype!r} not supported; use one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]
