"""hetero_rt.load(): from a checkpoint path to a Runtime ready to compute logits and generate."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint.loader import build_model, load_weights
from .checkpoint.safetensors import SafetensorsCheckpoint
from .config import ModelArgs
from .errors import CheckpointError, HeteroRTError
from .runtime.engine import Runtime
from .runtime.tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def load(path: str | Path, rules: str | Path | None = None, *, context: int | None = None,
         dtype: str | torch.dtype | None = None, device: str = "cpu") -> Runtime:
    """Load a Hugging Face DeepSeek-V2/V3/Kimi-K2 checkpoint directory.

    context: KV-cache positions to preallocate (default min(max_position_embeddings, 4096)).
    dtype:   weight/activation dtype (default float32 for fp32 checkpoints, else bfloat16).
    device:  where the whole model runs until placement rules take over ("cpu", "cuda").
    """
    if rules is not None:
        raise HeteroRTError("placement rules are not supported yet: load without rules")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; pass a checkpoint directory "
                              f"(config.json + *.safetensors)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a Hugging Face checkpoint directory (config.json + *.safetensors)")
    args = ModelArgs.from_config_file(path / "config.json")
    ckpt = SafetensorsCheckpoint(path)
    dtype = _resolve_dtype(dtype, ckpt)
    model = build_model(args)
    load_weights(model, ckpt, dtype, device)
    model.eval()
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    context = context or min(args.max_position_embeddings, 4096)
    return Runtime(model, args, tokenizer, context, dtype, device, path)


def _resolve_dtype(dtype: str | torch.dtype | None, ckpt: SafetensorsCheckpoint) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        stored = ckpt.info("model.embed_tokens.weight").dtype if "model.embed_tokens.weight" in ckpt else "BF16"
        return torch.float32 if stored == "F32" else torch.bfloat16
    if dtype not in _DTYPES:
        raise HeteroRTError(f"dtype {dtype!r} not supported; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]
