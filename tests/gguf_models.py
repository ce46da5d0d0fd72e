"""Tiny deepseek2 GGUFs converted from the tiny transformers models of hf_models.py, and the exact
reference for a quantized GGUF: the same transformers model with every tensor of the GGUF
dequantized by gguf.quants and loaded back (fp32)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from hetero_rt.checkpoint.gguf import GGUFCheckpoint
from hetero_rt.checkpoint.gguf_write import write_gguf
from hetero_rt.checkpoint.names import (GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES, GLOBAL_NAMES, LAYER_NAMES,
                                       gguf_expert_hf_names)
from hetero_rt.checkpoint.tokenizer_builder import build_tokenizer
from hf_models import build_hf_model, save_hf_model

# Dimensions that are whole K-quant blocks (256) where the experts and most projections read them.
KQUANT_DIMS = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256)


def make_gguf(variant: str, directory: Path, types="F32", *, tokenizer: bool = False, kv_b: str = "split",
              split_max_tensors: int = 0, drop: tuple[str, ...] = (), seed: int = 0, **extra):
    """-> (transformers model, path of the (first) GGUF file, config dict)."""
    model = build_hf_model(variant, seed, **extra)
    hf_dir = save_hf_model(model, variant, directory / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(extra)
    tensors = {}
    for f in hf_dir.glob("*.safetensors"):
        tensors.update(load_file(f))
    for name in drop:
        del tensors[name]
    if tokenizer:
        build_tokenizer(hf_dir, cfg["vocab_size"])
    files = write_gguf(directory / "model.gguf", cfg, tensors, types=types,
                       tokenizer_dir=hf_dir if tokenizer else None, kv_b=kv_b, split_max_tensors=split_max_tensors)
    return model, files[0], cfg


def dequantized_reference(model, gguf_path: Path, cfg: dict):
    """A copy of the transformers model holding the GGUF's weights, each dequantized to fp32."""
    ours_to_hf = {v: k for k, v in LAYER_NAMES.items()}
    glob = {v: k for k, v in GLOBAL_NAMES.items()}
    sd = {}
    with GGUFCheckpoint(gguf_path) as ck:
        for name in ck.names():
            w = torch.from_numpy(ck.dequantize(name))
            if name in GGUF_GLOBAL_NAMES:
                sd[glob[GGUF_GLOBAL_NAMES[name]]] = w
                continue
            _, i, suffix = name.split(".", 2)
            p = f"model.layers.{i}."
            if suffix == "attn_k_b.weight":
                v = torch.from_numpy(ck.dequantize(f"blk.{i}.attn_v_b.weight"))
                kv = torch.cat([w.transpose(1, 2), v], dim=1)
                sd[p + "self_attn.kv_b_proj.weight"] = kv.reshape(-1, kv.shape[-1])
            elif suffix == "attn_v_b.weight":
                continue
            elif gguf_expert_hf_names(name, w.shape[0]) is not None:
                sd.update(zip(gguf_expert_hf_names(name, w.shape[0]), w))
            else:
                sd[p + ours_to_hf[GGUF_LAYER_NAMES[suffix]]] = w
    if cfg.get("tie_word_embeddings"):
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    ref = type(model)(model.config).eval()
    ref_sd = ref.state_dict()
    loaded = _hf_expert_layout(ref_sd, sd)
    missing = [k for k in ref_sd if k not in loaded and "rotary" not in k]
    assert not missing, f"reference not fully loaded: {missing[:5]}"
    ref_sd.update(loaded)
    ref.load_state_dict(ref_sd, strict=True)
    return ref


def _hf_expert_layout(ref_sd: dict, sd: dict) -> dict:
    """transformers >= 5 may store experts fused (mlp.experts.gate_up_proj (E, 2I, D), down_proj (E, D, I));
    map the per-expert tensors onto whichever layout the reference model has."""
    out = {}
    for k in ref_sd:
        if k in sd:
            out[k] = sd[k]
        elif k.endswith("mlp.experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            n = ref_sd[k].shape[0]
            out[k] = torch.stack([torch.cat([sd[f"{p}{e}.gate_proj.weight"], sd[f"{p}{e}.up_proj.weight"]])
                                  for e in range(n)])
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len("down_proj")]
            out[k] = torch.stack([sd[f"{p}{e}.down_proj.weight"] for e in range(ref_sd[k].shape[0])])
    return out


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
