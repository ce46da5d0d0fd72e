"""One table per family between Hugging Face tensor names and ours (the model's parameter names).

HF:   model.layers.{i}.self_attn.kv_b_proj.weight     ours: layers.{i}.attn.wkv_b
HF:   model.layers.{i}.mlp.experts.{e}.up_proj.weight ours: layers.{i}.ffn.experts.w3[e]  (stacked)
HF:   model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight (Mixtral)  ours: the same stacked w3[e]
`names_for(args)` is the family's HFNames; the module-level hf_name / expert_hf_name are DeepSeek's.
Layers num_hidden_layers .. + num_nextn_predict_layers - 1 are multi-token-prediction (MTP) modules
(DeepSeek-V3, GLM-4.5): recognised and skipped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import ModelArgs
from ..model.transformer import Transformer

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
_STACKED = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(w[123])$")
# Tensors some checkpoints carry that hold nothing we need.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|_scale_inv)$")


@dataclass(frozen=True)
class HFNames:
    """One family's HF names: per-layer suffixes (after "model.layers.{i}.") -> ours (after
    "layers.{i}."), the MoE block's module in a layer, its routed experts' projections -> ours
    (w1 gate, w3 up, w2 down) and the shared experts' modules (placement kind shared_experts)."""
    layer: dict[str, str]
    moe: str
    experts: dict[str, str]
    shared: tuple[str, ...]

    def hf_name(self, ours: str) -> str:
        """Our parameter name -> the HF tensor name (not for stacked experts; see expert_hf_name)."""
        m = _OUR_LAYER.match(ours)
        if m:
            return f"model.layers.{m.group(1)}.{self._ours_to_hf[m.group(2)]}"
        return _OURS_TO_HF_GLOBAL[ours]

    def expert_hf_name(self, layer: int, expert: int, ours: str) -> str:
        """('w1' | 'w3' | 'w2') of expert e in layer i -> its HF tensor name."""
        proj = {v: k for k, v in self.experts.items()}[ours]
        return f"model.layers.{layer}.{self.moe}.experts.{expert}.{proj}.weight"

    @property
    def _ours_to_hf(self) -> dict[str, str]:
        return {v: k for k, v in self.layer.items()}


# ---- the grouped-query families ----
_NORMS = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"}
_GQA_ATTENTION = {
    "self_attn.q_proj.weight": "attn.wq", "self_attn.q_proj.bias": "attn.bq",
    "self_attn.k_proj.weight": "attn.wk", "self_attn.k_proj.bias": "attn.bk",
    "self_attn.v_proj.weight": "attn.wv", "self_attn.v_proj.bias": "attn.bv",
    "self_attn.o_proj.weight": "attn.wo", "self_attn.o_proj.bias": "attn.bo",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
}
_DENSE_MLP = {"mlp.gate_proj.weight": "ffn.w1", "mlp.up_proj.weight": "ffn.w3", "mlp.down_proj.weight": "ffn.w2"}
_ROUTER = {"mlp.gate.weight": "ffn.gate.weight"}
_SHARED_EXPERTS = {"mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1",
                   "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3",
                   "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2"}

DEEPSEEK = HFNames(LAYER_NAMES, "mlp", EXPERT_NAMES, ("mlp.shared_experts",))
MIXTRAL = HFNames({**_NORMS, **_GQA_ATTENTION, "block_sparse_moe.gate.weight": "ffn.gate.weight"},
                  "block_sparse_moe", {"w1": "w1", "w3": "w3", "w2": "w2"}, ())
QWEN3_MOE = HFNames({**_NORMS, **_GQA_ATTENTION, **_DENSE_MLP, **_ROUTER}, "mlp", EXPERT_NAMES, ())
QWEN2_MOE = HFNames({**_NORMS, **_GQA_ATTENTION, **_DENSE_MLP, **_ROUTER,
                     "mlp.shared_expert.gate_proj.weight": "ffn.shared_experts.w1",
                     "mlp.shared_expert.up_proj.weight": "ffn.shared_experts.w3",
                     "mlp.shared_expert.down_proj.weight": "ffn.shared_experts.w2",
                     "mlp.shared_expert_gate.weight": "ffn.shared_experts.gate"},
                    "mlp", EXPERT_NAMES, ("mlp.shared_expert", "mlp.shared_expert_gate"))
GLM4_MOE = HFNames({**_NORMS, **_GQA_ATTENTION, **_DENSE_MLP, **_ROUTER, **_SHARED_EXPERTS,
                    "mlp.gate.e_score_correction_bias": "ffn.gate.bias"},
                   "mlp", EXPERT_NAMES, ("mlp.shared_experts",))
FAMILY_NAMES: dict[str, HFNames] = {"deepseek_v2": DEEPSEEK, "deepseek_v3": DEEPSEEK, "kimi_k2": DEEPSEEK,
                                    "mixtral": MIXTRAL, "qwen3_moe": QWEN3_MOE, "qwen2_moe": QWEN2_MOE,
                                    "glm4_moe": GLM4_MOE}


def names_for(args: ModelArgs) -> HFNames:
    return FAMILY_NAMES[args.model_type]


def hf_name(ours: str) -> str:
    """DeepSeek's: our parameter name -> the HF tensor name (not for stacked experts; see expert_hf_name)."""
    return DEEPSEEK.hf_name(ours)


def expert_hf_name(layer: int, expert: int, ours: str) -> str:
    """DeepSeek's: ('w1' | 'w3' | 'w2') of expert e in layer i -> its HF tensor name."""
    return DEEPSEEK.expert_hf_name(layer, expert, ours)


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
    return len(shape) == 2 and not any(k in name for k in ("embed_tokens", "lm_head", "mlp.gate.",
                                                           "block_sparse_moe.gate.", "shared_expert_gate"))


def hf_tensor_shapes(args: ModelArgs, dtype: str = "BF16") -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) of every tensor a HF checkpoint of this config holds, in
    layer order (MTP layers excluded). Used to plan before a download and to write synthetic checkpoints.
    A config with a block-FP8 quantization_config gets the release's layout: is_fp8_weight tensors
    F8_E4M3, each with its fp32 `_scale_inv` (one value per block)."""
    if args.attention == "gqa":
        return _with_dtypes(args, _gqa_shapes(args), dtype)
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
    return _with_dtypes(args, t, dtype)


def _gqa_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The shapes of the model's own parameters (built on the meta device), under their HF names; each
    layer's stacked experts (E, ...) as E tensors."""
    with torch.device("meta"):
        model = Transformer(args)
    names, t = names_for(args), {}
    for ours, p in model.named_parameters():
        m = _STACKED.match(ours)
        if m:
            layer, which = int(m.group(1)), m.group(2)
            t.update({names.expert_hf_name(layer, e, which): tuple(p.shape[1:]) for e in range(p.shape[0])})
        else:
            t[names.hf_name(ours)] = tuple(p.shape)
    return t


def _with_dtypes(args: ModelArgs, t: dict[str, tuple[int, ...]], dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
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
# The grouped-query architectures (qwen3moe, qwen2moe, llama with experts, glm4moe): llama.cpp's names,
# as gguf's TensorNameMap gives them to its converter. GLM's post-attention norm keeps its HF name.
GGUF_GQA_LAYER_NAMES: dict[str, str] = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.weight": "attn.wq", "attn_q.bias": "attn.bq",
    "attn_k.weight": "attn.wk", "attn_k.bias": "attn.bk",
    "attn_v.weight": "attn.wv", "attn_v.bias": "attn.bv",
    "attn_output.weight": "attn.wo", "attn_output.bias": "attn.bo",
    "attn_q_norm.weight": "attn.q_norm.weight",
    "attn_k_norm.weight": "attn.k_norm.weight",
    **{k: v for k, v in GGUF_LAYER_NAMES.items() if v.startswith("ffn.") and v != "ffn_norm.weight"},
    "ffn_gate_inp_shexp.weight": "ffn.shared_experts.gate",
}
GGUF_GLM4_LAYER_NAMES: dict[str, str] = {("post_attention_norm.weight" if k == "ffn_norm.weight" else k): v
                                         for k, v in GGUF_GQA_LAYER_NAMES.items()}
GGUF_FAMILY_LAYER_NAMES: dict[str, dict[str, str]] = {"mixtral": GGUF_GQA_LAYER_NAMES, "qwen3_moe": GGUF_GQA_LAYER_NAMES,
                                                      "qwen2_moe": GGUF_GQA_LAYER_NAMES,
                                                      "glm4_moe": GGUF_GLM4_LAYER_NAMES}


def gguf_layer_names(args: ModelArgs | None) -> dict[str, str]:
    """The family's GGUF suffix -> our name table (DeepSeek's without args)."""
    return GGUF_LAYER_NAMES if args is None else GGUF_FAMILY_LAYER_NAMES.get(args.model_type, GGUF_LAYER_NAMES)
GGUF_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "head",
}
_OURS_TO_GGUF_LAYER = {v: k for k, v in GGUF_LAYER_NAMES.items()}
_OURS_TO_GGUF_GLOBAL = {v: k for k, v in GGUF_GLOBAL_NAMES.items()}
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_name(ours: str, args: ModelArgs | None = None) -> str:
    """Our parameter name -> the GGUF tensor name of the family (DeepSeek's without args: attn.wkv_b ->
    attn_kv_b; see GGUF_KV_B_SPLIT)."""
    m = _OUR_LAYER.match(ours)
    if m:
        to_gguf = _OURS_TO_GGUF_LAYER if args is None else {v: k for k, v in gguf_layer_names(args).items()}
        return f"blk.{m.group(1)}.{to_gguf[m.group(2)]}"
    return _OURS_TO_GGUF_GLOBAL[ours]


def gguf_expert_hf_names(name: str, n_experts: int, args: ModelArgs | None = None) -> list[str] | None:
    """A fused GGUF expert tensor (blk.{i}.ffn_*_exps.weight) -> the HF names of its n_experts slices,
    in order; None for any other name."""
    m = _GGUF_LAYER.match(name)
    ours = gguf_layer_names(args).get(m.group(2)) if m else None
    if ours is None or not ours.startswith("ffn.experts."):
        return None
    hf = DEEPSEEK if args is None else names_for(args)
    return [hf.expert_hf_name(int(m.group(1)), e, ours.rsplit(".", 1)[1]) for e in range(n_experts)]


def gguf_to_hf(name: str, args: ModelArgs | None = None) -> list[str]:
    """A GGUF tensor name -> the HF tensor name(s) holding the same weights (fused experts: one per
    expert is not enumerated here; the expert module path is returned instead)."""
    m = _GGUF_LAYER.match(name)
    if not m:
        ours = GGUF_GLOBAL_NAMES.get(name)
        return [_OURS_TO_HF_GLOBAL[ours]] if ours else []
    layer, suffix = m.group(1), m.group(2)
    if suffix in GGUF_KV_B_SPLIT:
        suffix = "attn_kv_b.weight"
    ours = gguf_layer_names(args).get(suffix)
    if ours is None:
        return []
    hf = DEEPSEEK if args is None else names_for(args)
    if ours.startswith("ffn.experts."):
        return [f"model.layers.{layer}.{hf.moe}.experts"]
    return [hf.hf_name(f"layers.{layer}.{ours}")]
