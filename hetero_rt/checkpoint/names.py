"""One table between Hugging Face DeepSeek tensor names and ours (the model's parameter names).

HF:   model.layers.{i}.self_attn.kv_b_proj.weight     ours: layers.{i}.attn.wkv_b
HF:   model.layers.{i}.mlp.experts.{e}.up_proj.weight ours: layers.{i}.ffn.experts.w3[e]  (stacked)
Layers num_hidden_layers .. + num_nextn_predict_layers - 1 are multi-token-prediction (MTP) modules:
recognised and skipped.
"""
from __future__ import annotations

import re

from ..config import ModelArgs

# Per-layer suffixes: HF name (after "model.layers.{i}.") -> our name (after "layers.{i}.").
LAYER_NAMES: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq",
    "self_attn.q_a_proj.weight": "attn.wq_a",
    "self_attn.q_a_layernorm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b",
    "self_attn.kv_a_proj_with_mqa.weight": "attn.wkv_a",
    "self_attn.kv_a_layernorm.weight": "attn.kv_norm.weight",
    "self_attn.kv_b_proj.weight": "attn.wkv_b",
    "self_attn.o_proj.weight": "attn.wo",
    "mlp.gate_proj.weight": "ffn.w1",
    "mlp.up_proj.weight": "ffn.w3",
    "mlp.down_proj.weight": "ffn.w2",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2",
}
EXPERT_NAMES: dict[str, str] = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
GLOBAL_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head",
}
_OURS_TO_HF_LAYER = {v: k for k, v in LAYER_NAMES.items()}
_OURS_TO_HF_GLOBAL = {v: k for k, v in GLOBAL_NAMES.items()}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
# Tensors some checkpoints carry that hold nothing we need.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|_scale_inv)$")


def hf_name(ours: str) -> str:
    """Our parameter name -> the HF tensor name (not for stacked experts; see expert_hf_name)."""
    m = _OUR_LAYER.match(ours)
    if m:
        return f"model.layers.{m.group(1)}.{_OURS_TO_HF_LAYER[m.group(2)]}"
    return _OURS_TO_HF_GLOBAL[ours]


def expert_hf_name(layer: int, expert: int, ours: str) -> str:
    """('w1' | 'w3' | 'w2') of expert e in layer i -> its HF tensor name."""
    proj = {v: k for k, v in EXPERT_NAMES.items()}[ours]
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def is_ignored(name: str, n_layers: int, n_mtp: int) -> bool:
    """Tensors recognised and deliberately not loaded: the n_mtp multi-token-prediction layers that
    follow the n_layers main layers, fp8 scales (consumed with their weight), rope buffers."""
    if _IGNORED.search(name):
        return True
    m = _LAYER.match(name)
    return bool(m) and n_layers <= int(m.group(1)) < n_layers + n_mtp


def is_fp8_weight(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the official block-FP8 releases (DeepSeek-V3/R1, Kimi-K2) store this HF weight in FP8:
    the 2-D linear weights of attention, dense MLPs and experts; embeddings, norms, the router gate
    and lm_head stay bf16."""
    return len(shape) == 2 and not any(k in name for k in ("embed_tokens", "lm_head", "mlp.gate."))


def hf_tensor_shapes(args: ModelArgs, dtype: str = "BF16") -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) of every tensor a HF checkpoint of this config holds, in
    layer order (MTP layers excluded). Used to plan before a download and to write synthetic checkpoints.
    A config with a block-FP8 quantization_config gets the release's layout: is_fp8_weight tensors
    F8_E4M3, each with its fp32 `_scale_inv` (one value per block)."""
    D, H, C, R = args.hidden_size, args.num_attention_heads, args.kv_lora_rank, args.qk_rope_head_dim
    qk, v, moe = args.qk_head_dim, args.v_head_dim, args.moe_intermediate_size
    t = {"model.embed_tokens.weight": (args.vocab_size, D), "model.norm.weight": (D,)}
    if not args.tie_word_embeddings:
        t["lm_head.weight"] = (args.vocab_size, D)
    ffn = lambda inter: {"gate_proj": (inter, D), "up_proj": (inter, D), "down_proj": (D, inter)}  # noqa: E731
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = t[p + "post_attention_layernorm.weight"] = (D,)
        if args.q_lora_rank is None:
            t[p + "self_attn.q_proj.weight"] = (H * qk, D)
        else:
            t[p + "self_attn.q_a_proj.weight"] = (args.q_lora_rank, D)
            t[p + "self_attn.q_a_layernorm.weight"] = (args.q_lora_rank,)
            t[p + "self_attn.q_b_proj.weight"] = (H * qk, args.q_lora_rank)
        t[p + "self_attn.kv_a_proj_with_mqa.weight"] = (C + R, D)
        t[p + "self_attn.kv_a_layernorm.weight"] = (C,)
        t[p + "self_attn.kv_b_proj.weight"] = (H * (args.qk_nope_head_dim + v), C)
        t[p + "self_attn.o_proj.weight"] = (D, H * v)
        if not args.is_moe_layer(i):
            t.update({p + f"mlp.{k}.weight": s for k, s in ffn(args.intermediate_size).items()})
            continue
        t[p + "mlp.gate.weight"] = (args.n_routed_experts, D)
        if args.has_correction_bias:
            t[p + "mlp.gate.e_score_correction_bias"] = (args.n_routed_experts,)
        for e in range(args.n_routed_experts):
            t.update({p + f"mlp.experts.{e}.{k}.weight": s for k, s in ffn(moe).items()})
        if args.n_shared_experts:
            t.update({p + f"mlp.shared_experts.{k}.weight": s
                      for k, s in ffn(moe * args.n_shared_experts).items()})
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for n, shape in t.items():
        if args.fp8_block_size is not None and is_fp8_weight(n, shape):
            rows, cols = args.fp8_block_size
            out[n] = ("F8_E4M3", tuple(shape))
            out[n + "_scale_inv"] = ("F32", (-(-shape[0] // rows), -(-shape[1] // cols)))
        else:
            out[n] = ("F32" if n.endswith("correction_bias") else dtype, tuple(shape))
    return out


# --- GGUF (llama.cpp's deepseek2 names) -------------------------------------------------------
# Per-layer suffixes: GGUF name (after "blk.{i}.") -> our name (after "layers.{i}."). The kv_b
# projection is stored split (attn_k_b transposed per head + attn_v_b, for MLA absorption) or,
# in older files, whole (attn_kv_b); routed experts are fused 3-D tensors (E, rows, cols).
GGUF_LAYER_NAMES: dict[str, str] = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.weight": "attn.wq",
    "attn_q_a.weight": "attn.wq_a",
    "attn_q_a_norm.weight": "attn.q_norm.weight",
    "attn_q_b.weight": "attn.wq_b",
    "attn_kv_a_mqa.weight": "attn.wkv_a",
    "attn_kv_a_norm.weight": "attn.kv_norm.weight",
    "attn_kv_b.weight": "attn.wkv_b",
    "attn_output.weight": "attn.wo",
    "ffn_gate.weight": "ffn.w1",
    "ffn_up.weight": "ffn.w3",
    "ffn_down.weight": "ffn.w2",
    "ffn_gate_inp.weight": "ffn.gate.weight",
    "exp_probs_b.bias": "ffn.gate.bias",
    "ffn_gate_shexp.weight": "ffn.shared_experts.w1",
    "ffn_up_shexp.weight": "ffn.shared_experts.w3",
    "ffn_down_shexp.weight": "ffn.shared_experts.w2",
    "ffn_gate_exps.weight": "ffn.experts.w1",
    "ffn_up_exps.weight": "ffn.experts.w3",
    "ffn_down_exps.weight": "ffn.experts.w2",
}
GGUF_KV_B_SPLIT = ("attn_k_b.weight", "attn_v_b.weight")
GGUF_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "head",
}
_OURS_TO_GGUF_LAYER = {v: k for k, v in GGUF_LAYER_NAMES.items()}
_OURS_TO_GGUF_GLOBAL = {v: k for k, v in GGUF_GLOBAL_NAMES.items()}
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_name(ours: str) -> str:
    """Our parameter name -> the GGUF tensor name (attn.wkv_b -> attn_kv_b; see GGUF_KV_B_SPLIT)."""
    m = _OUR_LAYER.match(ours)
    if m:
        return f"blk.{m.group(1)}.{_OURS_TO_GGUF_LAYER[m.group(2)]}"
    return _OURS_TO_GGUF_GLOBAL[ours]


def gguf_expert_hf_names(name: str, n_experts: int) -> list[str] | None:
    """A fused GGUF expert tensor (blk.{i}.ffn_*_exps.weight) -> the HF names of its n_experts slices,
    in order; None for any other name."""
    m = _GGUF_LAYER.match(name)
    ours = GGUF_LAYER_NAMES.get(m.group(2)) if m else None
    if ours is None or not ours.startswith("ffn.experts."):
        return None
    return [expert_hf_name(int(m.group(1)), e, ours.rsplit(".", 1)[1]) for e in range(n_experts)]


def gguf_to_hf(name: str) -> list[str]:
    """A GGUF tensor name -> the HF tensor name(s) holding the same weights (fused experts: one per
    expert is not enumerated here; the expert module path is returned instead)."""
    m = _GGUF_LAYER.match(name)
    if not m:
        ours = GGUF_GLOBAL_NAMES.get(name)
        return [_OURS_TO_HF_GLOBAL[ours]] if ours else []
    layer, suffix = m.group(1), m.group(2)
    if suffix in GGUF_KV_B_SPLIT:
        suffix = "attn_kv_b.weight"
    ours = GGUF_LAYER_NAMES.get(suffix)
    if ours is None:
        return []
    if ours.startswith("ffn.experts."):
        return [f"model.layers.{layer}.mlp.experts"]
    return [f"model.layers.{layer}.{_OURS_TO_HF_LAYER[ours]}"]
