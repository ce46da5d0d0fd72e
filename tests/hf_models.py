"""Tiny DeepSeek models built with transformers (the reference implementation), saved with
save_pretrained in the real HF format. Weights get std 1/sqrt(fan_in) and a random correction
bias: transformers' default init makes logits and routing nearly uniform and would hide bugs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
            n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1, max_position_embeddings=256)

# name -> (family, config overrides, keys real checkpoints have that save_pretrained omits)
VARIANTS = {
    "v2_lite": ("v2", dict(q_lora_rank=None, topk_method="greedy", n_shared_experts=2, norm_topk_prob=False),
                {"scoring_func": "softmax"}),
    "v2": ("v2", dict(q_lora_rank=48, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                      n_shared_experts=2, routed_scaling_factor=3.0, norm_topk_prob=False),
           {"scoring_func": "softmax"}),
    "v3": ("v3", dict(q_lora_rank=48, n_group=4, topk_group=2, n_shared_experts=1, norm_topk_prob=True,
                      routed_scaling_factor=2.5),
           {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}),
    "v3_yarn": ("v3", dict(q_lora_rank=48, n_group=4, topk_group=2, n_shared_experts=1, norm_topk_prob=True,
                           routed_scaling_factor=2.5,
                           rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                            "original_max_position_embeddings": 32, "beta_fast": 32,
                                            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707}),
                {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}),
    "v3_tied": ("v3", dict(q_lora_rank=None, n_group=2, topk_group=1, n_shared_experts=1, norm_topk_prob=True,
                           routed_scaling_factor=2.5, tie_word_embeddings=True),
                {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}),
}

# the prompt the parity tests feed both implementations
IDS = [3, 17, 42, 5, 88, 61, 0, 23, 9, 77, 31, 12, 50, 4, 66, 8]


def build_hf_model(variant: str, seed: int = 0, **extra):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    family, overrides, _ = VARIANTS[variant]
    torch.manual_seed(seed)
    if family == "v2":
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**{**BASE, **overrides, **extra}))
    else:
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**BASE, **overrides, **extra}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:  # norms
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


def save_hf_model(model, variant: str, directory: Path) -> Path:
    model.save_pretrained(directory)
    cfg_path = directory / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(VARIANTS[variant][2])
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return directory


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def rel_err(ours: np.ndarray, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    ref = ref.numpy()
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
