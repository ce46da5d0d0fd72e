"""hetero_rt.load(): from a checkpoint path (and optional placement rules) to a Runtime."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from .checkpoint.loader import build_model, load_weights
from .checkpoint.gguf import GGUFCheckpoint, is_gguf
from .checkpoint.gguf_loader import load_gguf_weights
from .checkpoint.safetensors import SafetensorsCheckpoint
from .config import ModelArgs
from .errors import CheckpointError, HeteroRTError
from .placement.apply import TORCH_DTYPES, experts_factory, finish, param_placement
from .placement.plan import Plan, resolve
from .placement.schema import Place, RuleSet, load_rules
from .runtime.engine import Runtime
from .checkpoint.tokenizer import Tokenizer

_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load(path: str | Path, rules: str | Path | None = None, *, context: int | None = None,
         dtype: str | torch.dtype | None = None, device: str | None = None, cpu_fallback: bool = False) -> Runtime:
    """Load a Hugging Face DeepSeek-V2/V3/Kimi-K2 checkpoint directory or a deepseek2 GGUF file
    (`model.gguf`, or any part of a split `model-0000K-of-0000N.gguf`).

    rules:        a placement YAML (see docs/placement_rules.md); None puts everything on `device`.
    context:      KV-cache positions to preallocate (default min(max_position_embeddings, 4096)).
    dtype:        weight/activation dtype when the rules do not set one (default float32 for fp32
                  checkpoints, else bfloat16).
    device:       without rules, where the whole model runs ("cpu" by default, "cuda").
    cpu_fallback: map every device the rules name to the CPU (for machines without a GPU).
    """
    if is_gguf(path):
        return _load_gguf(Path(path), rules, context, dtype, device, cpu_fallback)
    path = _checkpoint_dir(path)
    args = ModelArgs.from_config_file(path / "config.json")
    ckpt = SafetensorsCheckpoint(path)
    plan = make_plan(args, rules, device, cpu_fallback)
    if plan.cpu_fallback:
        print(f"hetero_rt: cpu_fallback: the placement in {plan.source} is kept as written, but every device "
              f"is mapped to the CPU", file=sys.stderr)
    main_dtype = _resolve_dtype(plan.main.dtype or dtype, ckpt)
    model = build_model(args, experts_factory(plan, args))
    load_weights(model, ckpt, param_placement(plan, main_dtype))
    finish(model, plan)
    model.eval()
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    context = context or min(args.max_position_embeddings, 4096)
    return Runtime(model, args, tokenizer, context, main_dtype, plan.main.device, path, plan)


def _load_gguf(path: Path, rules, context, dtype, device, cpu_fallback) -> Runtime:
    ckpt = GGUFCheckpoint(path)
    args = ckpt.args()
    plan = make_plan(args, rules, device, cpu_fallback)
    if plan.cpu_fallback:
        print(f"hetero_rt: cpu_fallback: the placement in {plan.source} is kept as written, but every device "
              f"is mapped to the CPU", file=sys.stderr)
    if dtype is None and plan.main.dtype is None:
        dtype = "float32" if ckpt.info("token_embd.weight").type == "F32" else "bfloat16"
    main_dtype = _resolve_dtype(plan.main.dtype or dtype, None)
    model = build_model(args, experts_factory(plan, args))
    load_gguf_weights(model, ckpt, param_placement(plan, main_dtype),
                      lambda layer: (plan.experts(layer).backend, plan.experts(layer).threads))
    finish(model, plan)
    model.eval()
    tokenizer = Tokenizer.from_gguf(ckpt.meta, str(path)) if "tokenizer.ggml.tokens" in ckpt.meta else None
    context = context or min(args.max_position_embeddings, 4096)
    return Runtime(model, args, tokenizer, context, main_dtype, plan.main.device, path, plan)


def make_plan(args: ModelArgs, rules: str | Path | None, device: str | None, cpu_fallback: bool,
              check_devices: bool = True) -> Plan:
    """check_devices=False plans for the GPU the rules name without checking this machine has one."""
    if rules is None:
        ruleset = RuleSet(f"<device={device or 'cpu'}>", Place(device=device or "cpu"))
    elif device is not None:
        raise HeteroRTError("pass either placement rules or device, not both: devices come from the rules")
    else:
        ruleset = load_rules(rules)
    return resolve(args, ruleset, cpu_fallback, check_devices)


def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; pass a checkpoint directory "
                              f"(config.json + *.safetensors)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a Hugging Face checkpoint directory (config.json + *.safetensors)")
    return path


def _resolve_dtype(dtype: str | torch.dtype | None, ckpt: SafetensorsCheckpoint) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        stored = ckpt.info("model.embed_tokens.weight").dtype if "model.embed_tokens.weight" in ckpt else "BF16"
        return torch.float32 if stored == "F32" else torch.bfloat16
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in TORCH_DTYPES:
        raise HeteroRTError(f"dtype {dtype!r} not supported; use one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]
