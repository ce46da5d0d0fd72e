"""Tiny Qwen3-MoE, Mixtral, Qwen2-MoE and GLM-4.5 models built with transformers (the reference
implementation), saved with save_pretrained in the real HF format. As in hf_models.py, weights get
std 1/sqrt(fan_in), norms 1 + 0.1 N(0, 1), and biases and the correction bias are random: the default
init makes logits and routing nearly uniform and would hide bugs."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=3)

# name -> (transformers class names, config overrides). Each variant exercises the family's own math:
# explicit head_dim != hidden/heads, dense layers, renormalised or not, biases, partial rotary, groups.
VARIANTS = {
    "qwen3_moe": ("Qwen3Moe", dict(num_experts=8, moe_intermediate_size=32, head_dim=24, norm_topk_prob=True,
                                   mlp_only_layers=[1], rope_theta=1e6)),
    "qwen3_moe_bias": ("Qwen3Moe", dict(num_experts=8, moe_intermediate_size=32, head_dim=16, norm_topk_prob=False,
                                        attention_bias=True, decoder_sparse_step=2, tie_word_embeddings=True)),
    "qwen3_moe_yarn": ("Qwen3Moe", dict(num_experts=8, moe_intermediate_size=32, head_dim=16, norm_topk_prob=True,
                                        max_position_embeddings=64,
                                        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                         "original_max_position_embeddings": 16})),
    "mixtral": ("Mixtral", dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=48)),
    "qwen2_moe": ("Qwen2Moe", dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                   norm_topk_prob=False, mlp_only_layers=[0])),
    "glm4_moe": ("Glm4Moe", dict(n_routed_experts=8, moe_intermediate_size=32, head_dim=16, n_shared_experts=1,
                                 first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
                                 routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True,
                                 partial_rotary_factor=0.5, num_nextn_predict_layers=0)),
}


def build_family_model(variant: str, seed: int = 0, **extra):
    import transformers

    prefix, overrides = VARIANTS[variant]
    config = getattr(transformers, prefix + "Config")(**{**BASE, **overrides, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, prefix + "ForCausalLM")(config)
    randomize(model, seed)
    return model.eval()


def randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:  # norms
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def save_family_model(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


# ---- GGUF, laid out as llama.cpp's convert_hf_to_gguf.py writes these architectures ----------------------
GGUF_ARCHS = {"qwen3_moe": "QWEN3MOE", "qwen2_moe": "QWEN2MOE", "mixtral": "LLAMA", "glm4_moe": "GLM4_MOE"}
_EXPERT_PROJ = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
                "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")


def write_family_gguf(hf_dir: Path, out: Path, qtype: str = "F32", tokenizer: bool = False) -> Path:
    """The checkpoint save_family_model wrote, as a GGUF: names by gguf's TensorNameMap (what the
    converter uses), experts stacked (E, rows, cols), Mixtral's q/k rows permuted for llama.cpp's
    adjacent-pair RoPE (LlamaModel.permute), 1-D tensors F32, the metadata the converter writes."""
    import gguf
    from safetensors.torch import load_file

    from hetero_rt.checkpoint.gguf_write import _encode, _layout, _tokenizer, uniform
    from hetero_rt.checkpoint.tokenizer_builder import build_tokenizer

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = gguf.MODEL_ARCH[GGUF_ARCHS[cfg["model_type"]]]
    tensors = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    _family_metadata(writer, cfg)
    if tokenizer:   # a byte-level BPE vocabulary of vocab_size tokens (llama.cpp loads none without one)
        build_tokenizer(hf_dir, cfg["vocab_size"])
        _tokenizer(writer, hf_dir, cfg)
    rule = uniform(qtype)
    for name, array in _gguf_arrays(arch, cfg, tensors):
        t = "F32" if array.ndim == 1 else rule(name, array.shape)
        dtype, byte_shape, _ = _layout(array.shape, t)
        data = np.ascontiguousarray(_encode(array, t)).view(dtype).reshape(byte_shape)
        writer.add_tensor(name, data, raw_shape=byte_shape, raw_dtype=gguf.GGMLQuantizationType[t])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _gguf_arrays(arch, cfg: dict, tensors: dict):
    import gguf
    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for hf, t in tensors.items():
        a = t.float().numpy()
        m = _EXPERT.match(hf)
        if m:
            experts.setdefault((int(m.group(1)), _EXPERT_PROJ[m.group(3)]), {})[int(m.group(2))] = a
            continue
        if arch == gguf.MODEL_ARCH.LLAMA and hf.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg["num_attention_heads"] if "q_proj" in hf else cfg["num_key_value_heads"]
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        hf = hf.replace("e_score_correction_bias", "e_score_correction.bias")
        yield names.get_name(hf, try_suffixes=(".weight", ".bias")), a
    for (layer, proj), by_expert in sorted(experts.items()):
        yield f"blk.{layer}.{proj}.weight", np.stack([by_expert[e] for e in sorted(by_expert)])


def _family_metadata(w, c: dict) -> None:
    heads, hidden = c["num_attention_heads"], c["hidden_size"]
    head_dim = c.get("head_dim") or hidden // heads
    rope = c.get("rope_parameters") or {}
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_vocab_size(c["vocab_size"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_file_type(0)
    if rope.get("rope_type") == "yarn":
        import gguf
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    kind = c["model_type"]
    if kind == "mixtral":
        w.add_expert_count(c["num_local_experts"])
        w.add_rope_dimension_count(head_dim)
        return
    w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    if kind in ("qwen3_moe", "qwen2_moe"):
        w.add_expert_count(c["num_experts"] if "num_experts" in c else c["num_local_experts"])
        w.add_expert_weights_norm(c["norm_topk_prob"])
    if kind == "qwen3_moe":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if kind == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])
    if kind == "glm4_moe":
        import gguf
        w.add_expert_count(c["n_routed_experts"])
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 0.5)))
        w.add_expert_shared_count(c["n_shared_experts"])
        w.add_leading_dense_block_count(c["first_k_dense_replace"])
        w.add_expert_group_count(c["n_group"])
        w.add_expert_group_used_count(c["topk_group"])
        w.add_expert_weights_scale(c["routed_scaling_factor"])
        w.add_expert_weights_norm(c["norm_topk_prob"])
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def rounded_reference(model, qtype: str):
    """The transformers model with every 2-D/3-D weight replaced by its GGUF encoding in `qtype` (the
    writer's rule for its row length), decoded by gguf.quants.dequantize: the exact reference of a
    quantized write_family_gguf file. ggml blocks run along rows, so the writer's stacking of experts
    and Mixtral's row permutation leave each row's encoding as it is here."""
    import copy

    import gguf

    from hetero_rt.checkpoint.gguf_write import _encode, uniform

    ref, rule = copy.deepcopy(model), uniform(qtype)
    with torch.no_grad():
        for _, p in ref.named_parameters():
            if p.dim() < 2:
                continue
            rows = p.detach().float().reshape(-1, p.shape[-1]).numpy()
            t = rule("", tuple(p.shape))
            encoded = _encode(rows, t)
            p.copy_(torch.from_numpy(np.asarray(
                gguf.quants.dequantize(encoded.view(np.uint8) if t not in ("F32", "F16") else encoded,
                                       gguf.GGMLQuantizationType[t]), np.float32).reshape(p.shape)))
    return ref.eval()
