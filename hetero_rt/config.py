"""ModelArgs: the frozen description of a MoE model, built from the checkpoint's own metadata
through one explicit key table per family.

Contract: `ModelArgs.from_config_file(path)` accepts config.json of model_type deepseek_v2,
deepseek_v3, kimi_k2 (MLA attention) and qwen3_moe, qwen2_moe, mixtral, glm4_moe (grouped-query
attention) and either returns a complete, self-consistent ModelArgs or raises ConfigError naming
the file, the key and what was expected. Nothing is inferred from file names or magic dimensions.
GGUF metadata produces the same dict shape and goes through `ModelArgs.from_dict`.

The grouped-query families fill the head fields with their plain meaning: qk_rope_head_dim is the
rotary part of each query/key head (all of it, or partial_rotary_factor of it), qk_nope_head_dim
the rest, v_head_dim the value head; there is no latent (kv_lora_rank 0, q_lora_rank None).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

MLA_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2")
GQA_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe")
MODEL_TYPES = MLA_TYPES + GQA_TYPES
# Tokens per forward call at most: prompts are run in chunks of this size (bounding attention's working
# memory); the memory planner and the hetero backend's host buffers are sized by it.
PREFILL_CHUNK = 512
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")

_REQUIRED = object()
# Largest plausible values (several times the largest released DeepSeek/Kimi model's): a size above
# its limit is a corrupt file, refused before anything is sized by it (1e6 layers, 2**40-wide experts).
SIZE_LIMITS = {"num_hidden_layers": 1024, "n_routed_experts": 1 << 16, "num_experts_per_tok": 1 << 10,
               "n_shared_experts": 1 << 8, "num_attention_heads": 1 << 12, "vocab_size": 1 << 22,
               "max_position_embeddings": 1 << 24, "num_nextn_predict_layers": 64}
DIM_LIMIT = 1 << 17          # hidden, intermediate, LoRA ranks and head dims


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rope scaling as DeepSeek uses it (rope_scaling.type == "yarn")."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    first_k_dense_replace: int
    moe_layer_freq: int
    scoring_func: str
    topk_method: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rope_theta: float
    rope_scaling: YarnScaling | None
    rope_interleave: bool
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    num_nextn_predict_layers: int
    fp8_block_size: tuple[int, int] | None
    # ---- grouped-query attention and the Qwen/Mixtral/GLM routers (defaults: DeepSeek's) ----
    attention: str = "mla"                   # "mla" | "gqa"
    num_key_value_heads: int = 0             # GQA: K/V heads, each shared by H / Hkv query heads
    qk_norm: bool = False                    # GQA: per-head RMSNorm of q and k before RoPE (Qwen3, GLM)
    qkv_bias: bool = False                   # GQA: biases on the q, k, v projections (Qwen2, GLM)
    o_bias: bool = False                     # GQA: bias on the output projection (Qwen3 attention_bias)
    shared_expert_intermediate_size: int | None = None   # None: n_shared_experts x moe_intermediate_size
    shared_expert_gate: bool = False         # shared expert scaled by sigmoid(x . w_g) (Qwen2-MoE)
    mlp_only_layers: tuple[int, ...] = ()    # dense layers listed by index (Qwen)
    decoder_sparse_step: int = 1             # MoE where (layer + 1) % step == 0 (Qwen)

    # ---- derived quantities used by the model math ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_correction_bias(self) -> bool:
        return self.topk_method == "noaux_tc"

    @property
    def head_dim(self) -> int:
        return self.qk_head_dim

    @property
    def shared_inter_dim(self) -> int:
        """Intermediate size of the (fused) shared experts; 0 without them."""
        if self.shared_expert_intermediate_size is not None:
            return self.shared_expert_intermediate_size
        return self.moe_intermediate_size * self.n_shared_experts

    def is_moe_layer(self, layer: int) -> bool:
        """DeepSeek's and GLM's rule (dense for the first k layers, then MoE every moe_layer_freq layers)
        and Qwen's (not in mlp_only_layers, (layer + 1) % decoder_sparse_step == 0); each family leaves
        the other's fields neutral."""
        return (layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0
                and layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN, as the reference does."""
        scale = self.qk_head_dim ** -0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim:
            m = yarn_mscale(y.factor, y.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def latent_cache_width(self) -> int:
        """Values per token per layer in the latent KV cache: c_kv plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def kv_cache_width(self) -> int:
        """Values per token per layer in the KV cache: MLA's latent, or GQA's K and V of every K/V head."""
        if self.attention == "gqa":
            return 2 * self.num_key_value_heads * self.head_dim
        return self.latent_cache_width

    # ---- construction ----
    @classmethod
    def from_config_file(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found; a Hugging Face checkpoint directory must contain config.json")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<config>") -> "ModelArgs":
        return _Parser(raw, source).parse()


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# The key table: ModelArgs field -> (config.json key, type, default). _REQUIRED means the key must
# be present. Fields not listed here (rope, eos, fp8, per-model-type routing) are parsed below
# because their spelling varies between checkpoints.
KEY_TABLE: dict[str, tuple[str, type, Any]] = {
    "vocab_size": ("vocab_size", int, _REQUIRED),
    "hidden_size": ("hidden_size", int, _REQUIRED),
    "intermediate_size": ("intermediate_size", int, _REQUIRED),
    "moe_intermediate_size": ("moe_intermediate_size", int, _REQUIRED),
    "num_hidden_layers": ("num_hidden_layers", int, _REQUIRED),
    "num_attention_heads": ("num_attention_heads", int, _REQUIRED),
    "kv_lora_rank": ("kv_lora_rank", int, _REQUIRED),
    "qk_nope_head_dim": ("qk_nope_head_dim", int, _REQUIRED),
    "qk_rope_head_dim": ("qk_rope_head_dim", int, _REQUIRED),
    "v_head_dim": ("v_head_dim", int, _REQUIRED),
    "n_routed_experts": ("n_routed_experts", int, _REQUIRED),
    "num_experts_per_tok": ("num_experts_per_tok", int, _REQUIRED),
    "n_shared_experts": ("n_shared_experts", int, 0),
    "first_k_dense_replace": ("first_k_dense_replace", int, 0),
    "moe_layer_freq": ("moe_layer_freq", int, 1),
    "norm_topk_prob": ("norm_topk_prob", bool, False),
    "routed_scaling_factor": ("routed_scaling_factor", float, 1.0),
    "rms_norm_eps": ("rms_norm_eps", float, 1e-6),
    "tie_word_embeddings": ("tie_word_embeddings", bool, False),
    "max_position_embeddings": ("max_position_embeddings", int, _REQUIRED),
    "num_nextn_predict_layers": ("num_nextn_predict_layers", int, 0),
}

# The grouped-query families' key tables: ModelArgs field -> (config.json key, type, default), or
# Fixed(value) where the family's modeling code hard-codes it. A key given as a tuple has several
# spellings (transformers 5 writes num_local_experts for Qwen's num_experts); two that disagree are
# an error. The MLA fields are derived from head_dim and the rotary fraction (_Parser.gqa_heads).
@dataclass(frozen=True)
class Fixed:
    value: Any


IntList = tuple   # a JSON list of ints -> tuple[int, ...]

_GQA_COMMON: dict[str, Any] = {
    "vocab_size": ("vocab_size", int, _REQUIRED),
    "hidden_size": ("hidden_size", int, _REQUIRED),
    "intermediate_size": ("intermediate_size", int, _REQUIRED),
    "num_hidden_layers": ("num_hidden_layers", int, _REQUIRED),
    "num_attention_heads": ("num_attention_heads", int, _REQUIRED),
    "num_key_value_heads": ("num_key_value_heads", int, _REQUIRED),
    "num_experts_per_tok": ("num_experts_per_tok", int, _REQUIRED),
    "tie_word_embeddings": ("tie_word_embeddings", bool, False),
    "max_position_embeddings": ("max_position_embeddings", int, _REQUIRED),
    # HF checkpoints rotate halves; a llama GGUF (Mixtral) holds q/k rows permuted for adjacent pairs
    "rope_interleave": ("rope_interleave", bool, False),
    "n_shared_experts": Fixed(0), "first_k_dense_replace": Fixed(0), "moe_layer_freq": Fixed(1),
    "scoring_func": Fixed("softmax"), "topk_method": Fixed("greedy"), "n_group": Fixed(1), "topk_group": Fixed(1),
    "routed_scaling_factor": Fixed(1.0), "num_nextn_predict_layers": Fixed(0),
    "qk_norm": Fixed(False), "qkv_bias": Fixed(False), "o_bias": Fixed(False), "shared_expert_gate": Fixed(False),
    "mlp_only_layers": Fixed(()), "decoder_sparse_step": Fixed(1),
}
GQA_KEY_TABLES: dict[str, dict[str, Any]] = {
    "mixtral": {
        **_GQA_COMMON,
        "moe_intermediate_size": ("intermediate_size", int, _REQUIRED),   # every layer is MoE
        "n_routed_experts": ("num_local_experts", int, _REQUIRED),
        "norm_topk_prob": Fixed(True),                                    # softmax, top-k, renormalise
        "rms_norm_eps": ("rms_norm_eps", float, 1e-5),
    },
    "qwen2_moe": {
        **_GQA_COMMON,
        "moe_intermediate_size": ("moe_intermediate_size", int, _REQUIRED),
        "n_routed_experts": (("num_experts", "num_local_experts"), int, _REQUIRED),
        "norm_topk_prob": ("norm_topk_prob", bool, False),
        "n_shared_experts": Fixed(1), "shared_expert_gate": Fixed(True),
        "shared_expert_intermediate_size": ("shared_expert_intermediate_size", int, _REQUIRED),
        "qkv_bias": ("qkv_bias", bool, True),
        "mlp_only_layers": ("mlp_only_layers", IntList, ()),
        "decoder_sparse_step": ("decoder_sparse_step", int, 1),
        "rms_norm_eps": ("rms_norm_eps", float, 1e-6),
    },
    "qwen3_moe": {
        **_GQA_COMMON,
        "moe_intermediate_size": ("moe_intermediate_size", int, _REQUIRED),
        "n_routed_experts": (("num_experts", "num_local_experts"), int, _REQUIRED),
        "norm_topk_prob": ("norm_topk_prob", bool, False),
        "qk_norm": Fixed(True),
        "qkv_bias": ("attention_bias", bool, False), "o_bias": ("attention_bias", bool, False),
        "mlp_only_layers": ("mlp_only_layers", IntList, ()),
        "decoder_sparse_step": ("decoder_sparse_step", int, 1),
        "rms_norm_eps": ("rms_norm_eps", float, 1e-6),
    },
    "glm4_moe": {
        **_GQA_COMMON,
        "moe_intermediate_size": ("moe_intermediate_size", int, _REQUIRED),
        "n_routed_experts": (("n_routed_experts", "num_local_experts"), int, _REQUIRED),
        "n_shared_experts": ("n_shared_experts", int, 1),
        "first_k_dense_replace": ("first_k_dense_replace", int, 1),
        "scoring_func": Fixed("sigmoid"), "topk_method": Fixed("noaux_tc"),   # as DeepSeek-V3
        "n_group": ("n_group", int, 1), "topk_group": ("topk_group", int, 1),
        "norm_topk_prob": ("norm_topk_prob", bool, True),
        "routed_scaling_factor": ("routed_scaling_factor", float, 1.0),
        "qk_norm": ("use_qk_norm", bool, False),
        "qkv_bias": ("attention_bias", bool, False),
        "num_nextn_predict_layers": ("num_nextn_predict_layers", int, 0),
        "rms_norm_eps": ("rms_norm_eps", float, 1e-5),
    },
}
# rope_theta and partial_rotary_factor when config.json states none: each family's configuration-code
# default (others: 10000 and 1.0).
_ROPE_THETA_DEFAULTS = {"mixtral": 1e6}
_PARTIAL_ROTARY_DEFAULTS = {"glm4_moe": 0.5}
_FAMILY_NAMES = {"deepseek_v2": "DeepSeek", "deepseek_v3": "DeepSeek", "kimi_k2": "DeepSeek", "mixtral": "Mixtral",
                 "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "glm4_moe": "GLM-4.5"}

# Routing defaults per model type. DeepSeek-V2's own configuration code defaults to softmax/greedy;
# V3 and Kimi-K2 checkpoints always state their routing, so a missing key there is an error.
_ROUTING_DEFAULTS = {
    "deepseek_v2": {"scoring_func": "softmax", "topk_method": "greedy"},
    "deepseek_v3": {},
    "kimi_k2": {},
}


class _Parser:
    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: '{key}': {msg}")

    def get(self, key: str, typ: type, default: Any = _REQUIRED) -> Any:
        if key not in self.raw or (self.raw[key] is None and default is not _REQUIRED):
            if default is _REQUIRED:
                raise self.fail(key, f"missing; expected {typ.__name__}")
            return default
        return self.coerce(key, self.raw[key], typ)

    def coerce(self, key: str, value: Any, typ: type) -> Any:
        if typ is bool:
            if isinstance(value, bool):
                return value
        elif typ is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif typ is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif typ is str:
            if isinstance(value, str):
                return value
        elif typ is IntList:
            return self.get_int_list(key, value)
        raise self.fail(key, f"expected {typ.__name__}, found {value!r}")

    def choice(self, key: str, allowed: tuple[str, ...], default: Any = _REQUIRED) -> str:
        value = self.get(key, str, default)
        if value not in allowed:
            raise self.fail(key, f"expected one of {', '.join(allowed)}, found {value!r}")
        return value

    def parse(self) -> ModelArgs:
        model_type = self.choice("model_type", MODEL_TYPES)
        self.model_type = model_type
        if model_type in GQA_TYPES:
            return self.parse_gqa(model_type)
        values: dict[str, Any] = {"model_type": model_type}
        for field, (key, typ, default) in KEY_TABLE.items():
            values[field] = self.get(key, typ, default)
        values.update(self.routing(model_type))
        values["q_lora_rank"] = self.q_lora_rank()
        values["rope_theta"], values["rope_scaling"] = self.rope()
        values["rope_interleave"] = self.get("rope_interleave", bool, True) if model_type != "deepseek_v2" else True
        values["bos_token_id"] = self.get("bos_token_id", int, None)
        values["eos_token_ids"] = self.eos_ids()
        values["fp8_block_size"] = self.fp8()
        self.check_activation()
        args = ModelArgs(**values)
        self.check_consistency(args)
        return args

    def parse_gqa(self, model_type: str) -> ModelArgs:
        values: dict[str, Any] = {"model_type": model_type, "attention": "gqa"}
        for field, spec in GQA_KEY_TABLES[model_type].items():
            values[field] = spec.value if isinstance(spec, Fixed) else self.keyed(*spec)
        values.update(self.gqa_heads(values["hidden_size"], values["num_attention_heads"]))
        values["q_lora_rank"], values["kv_lora_rank"] = None, 0
        values["rope_theta"], values["rope_scaling"] = self.rope(_ROPE_THETA_DEFAULTS.get(model_type, 10000.0))
        values["bos_token_id"] = self.get("bos_token_id", int, None)
        values["eos_token_ids"] = self.eos_ids()
        values["fp8_block_size"] = self.fp8()
        self.check_activation()
        self.check_full_attention()
        args = ModelArgs(**values)
        self.check_consistency(args)
        self.check_gqa(args)
        return args

    def keyed(self, key: str | tuple[str, ...], typ: type, default: Any) -> Any:
        """One key, or the first of several spellings present (all present ones must agree)."""
        keys = (key,) if isinstance(key, str) else key
        found = [(k, self.get(k, typ, None)) for k in keys if self.raw.get(k) is not None]
        for k, v in found[1:]:
            if v != found[0][1]:
                raise self.fail(k, f"{v!r} contradicts {found[0][0]}={found[0][1]!r}")
        if found:
            return found[0][1]
        return self.get(keys[0], typ, default)

    def get_int_list(self, key: str, value: Any) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list of layer indices, found {value!r}")
        return tuple(self.coerce(key, v, int) for v in value)

    def gqa_heads(self, hidden: int, heads: int) -> dict[str, int]:
        """head_dim (stated, or hidden_size / num_attention_heads as the modeling code defaults) split
        into its rotary part (partial_rotary_factor of it, transformers: int(head_dim * factor)) and the rest."""
        head_dim = self.get("head_dim", int, None)
        if head_dim is None:
            if heads <= 0 or hidden % heads:
                raise self.fail("head_dim", f"missing, and hidden_size={hidden} is not a multiple of "
                                            f"num_attention_heads={heads}")
            head_dim = hidden // heads
        factor = self.partial_rotary_factor()
        rotary = int(head_dim * factor)
        if head_dim <= 0 or rotary <= 0:
            raise self.fail("partial_rotary_factor", f"{factor} of head_dim={head_dim} leaves no rotary dims")
        return {"qk_rope_head_dim": rotary, "qk_nope_head_dim": head_dim - rotary, "v_head_dim": head_dim}

    def partial_rotary_factor(self) -> float:
        """Top level (GLM's config.json) or inside rope_parameters (transformers 5); both must agree;
        neither: the family's default (GLM 0.5)."""
        top = self.get("partial_rotary_factor", float, None)
        params = self.raw.get("rope_parameters")
        inner = None
        if isinstance(params, dict) and params.get("partial_rotary_factor") is not None:
            inner = self.coerce("rope_parameters.partial_rotary_factor", params["partial_rotary_factor"], float)
        if top is not None and inner is not None and top != inner:
            raise self.fail("partial_rotary_factor", f"{top} contradicts rope_parameters.partial_rotary_factor={inner}")
        factor = top if top is not None else inner if inner is not None else \
            _PARTIAL_ROTARY_DEFAULTS.get(self.model_type, 1.0)
        if not (math.isfinite(factor) and 0 < factor <= 1):
            raise self.fail("partial_rotary_factor", f"must be in (0, 1], found {factor}")
        return factor

    def check_full_attention(self) -> None:
        """Sliding-window attention (Mixtral's sliding_window, Qwen's use_sliding_window and layer_types)
        changes the math and is not implemented: refused rather than run with full attention."""
        if self.model_type == "mixtral" and self.raw.get("sliding_window") is not None:
            raise self.fail("sliding_window", f"sliding-window attention is not supported, found "
                                              f"{self.raw['sliding_window']!r}; expected null")
        if self.raw.get("use_sliding_window"):
            raise self.fail("use_sliding_window", "sliding-window attention is not supported; expected false")
        types = self.raw.get("layer_types")
        if types is not None and any(t != "full_attention" for t in types if isinstance(types, list)):
            raise self.fail("layer_types", f"only 'full_attention' layers are supported, found {types!r}")

    def check_gqa(self, a: ModelArgs) -> None:
        if a.num_key_value_heads <= 0 or a.num_attention_heads % a.num_key_value_heads:
            raise self.fail("num_key_value_heads", f"{a.num_key_value_heads} must be > 0 and divide "
                                                   f"num_attention_heads={a.num_attention_heads}")
        if a.num_key_value_heads > SIZE_LIMITS["num_attention_heads"]:
            raise self.fail("num_key_value_heads", f"{a.num_key_value_heads} is not a plausible size")
        bad = [i for i in a.mlp_only_layers if not 0 <= i < a.num_hidden_layers]
        if bad:
            raise self.fail("mlp_only_layers", f"layer {bad[0]} is outside 0..{a.num_hidden_layers - 1}")
        if a.decoder_sparse_step <= 0:
            raise self.fail("decoder_sparse_step", f"must be > 0, found {a.decoder_sparse_step}")
        if a.shared_expert_intermediate_size is not None and not 0 < a.shared_expert_intermediate_size <= DIM_LIMIT:
            raise self.fail("shared_expert_intermediate_size", f"must be in 1..{DIM_LIMIT}, found "
                                                               f"{a.shared_expert_intermediate_size}")

    def routing(self, model_type: str) -> dict[str, Any]:
        defaults = _ROUTING_DEFAULTS[model_type]
        scoring = self.choice("scoring_func", SCORING_FUNCS, defaults.get("scoring_func", _REQUIRED))
        method = self.choice("topk_method", TOPK_METHODS, defaults.get("topk_method", _REQUIRED))
        n_group = self.get("n_group", int, 1)
        topk_group = self.get("topk_group", int, n_group)
        return {"scoring_func": scoring, "topk_method": method, "n_group": n_group, "topk_group": topk_group}

    def q_lora_rank(self) -> int | None:
        value = self.get("q_lora_rank", int, None)
        if value is not None and value < 0:
            raise self.fail("q_lora_rank", f"expected null or a positive integer, found {value}")
        return value or None  # GGUF writes 0 for "no query compression"

    def rope(self, default_theta: float = 10000.0) -> tuple[float, YarnScaling | None]:
        """Accepts the classic `rope_theta` + `rope_scaling` spelling and transformers 5's `rope_parameters`."""
        legacy = self.raw.get("rope_scaling")
        params = self.raw.get("rope_parameters")
        theta_top = self.get("rope_theta", float, None)
        theta_params = None
        if params is not None:
            if not isinstance(params, dict):
                raise self.fail("rope_parameters", f"expected an object, found {params!r}")
            if "rope_theta" in params:
                theta_params = self.coerce("rope_parameters.rope_theta", params["rope_theta"], float)
        if theta_top is not None and theta_params is not None and theta_top != theta_params:
            raise self.fail("rope_theta", f"{theta_top} contradicts rope_parameters.rope_theta={theta_params}")
        theta = theta_top if theta_top is not None else theta_params
        if theta is None:
            theta = default_theta  # the family's configuration code's value when absent (DeepSeek: 10000)
        a = self.yarn("rope_scaling", legacy)
        b = self.yarn("rope_parameters", params)
        if legacy is not None and params is not None and a != b:
            raise self.fail("rope_scaling", f"contradicts rope_parameters: {legacy!r} vs {params!r}")
        return theta, a if legacy is not None else b

    def yarn(self, key: str, spec: Any) -> YarnScaling | None:
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise self.fail(key, f"expected an object or null, found {spec!r}")
        kind = spec.get("type", spec.get("rope_type", "default"))
        if kind == "default":
            return None
        if kind != "yarn":
            raise self.fail(f"{key}.type", f"only 'yarn' rope scaling is supported (DeepSeek's), found {kind!r}")
        if spec.get("attention_factor") is not None or spec.get("truncate", True) is not True:
            raise self.fail(key, "yarn with attention_factor or truncate: false is not supported; expected "
                                 "DeepSeek's and Qwen's yarn (factor, original_max_position_embeddings, beta_*, mscale*)")
        for req in ("factor", "original_max_position_embeddings"):
            if spec.get(req) is None:
                raise self.fail(f"{key}.{req}", "missing; yarn scaling needs it")
        num = lambda k, d: self.coerce(f"{key}.{k}", spec[k], float) if spec.get(k) is not None else d  # noqa: E731
        return YarnScaling(
            factor=num("factor", None),
            original_max_position_embeddings=self.coerce(
                f"{key}.original_max_position_embeddings", spec["original_max_position_embeddings"], int),
            beta_fast=num("beta_fast", 32.0),
            beta_slow=num("beta_slow", 1.0),
            mscale=num("mscale", 1.0),
            mscale_all_dim=num("mscale_all_dim", 0.0),
        )

    def eos_ids(self) -> tuple[int, ...]:
        value = self.raw.get("eos_token_id")
        if value is None:
            return ()
        items = value if isinstance(value, list) else [value]
        return tuple(self.coerce("eos_token_id", v, int) for v in items)

    def fp8(self) -> tuple[int, int] | None:
        q = self.raw.get("quantization_config")
        if q is None:
            return None
        if not isinstance(q, dict) or q.get("quant_method") != "fp8":
            raise self.fail("quantization_config", f"only DeepSeek's block fp8 is supported, found {q!r}")
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise self.fail("quantization_config.fmt", f"expected 'e4m3', found {fmt!r}")
        block = q.get("weight_block_size", [128, 128])
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise self.fail("quantization_config.weight_block_size", f"expected [rows, cols], found {block!r}")
        return (block[0], block[1])

    def check_activation(self) -> None:
        act = self.raw.get("hidden_act", "silu")
        if act != "silu":
            raise self.fail("hidden_act", f"{_FAMILY_NAMES[self.model_type]} models use 'silu', found {act!r}")

    def check_consistency(self, a: ModelArgs) -> None:
        counts = [field for field, (_, typ, _) in KEY_TABLE.items() if typ is int] + ["n_group", "topk_group"]
        may_be_zero = ("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers")
        if a.attention == "gqa":   # no latent; the whole head may be rotary
            may_be_zero += ("kv_lora_rank", "qk_nope_head_dim")
        for name in counts:
            if name in may_be_zero:
                if getattr(a, name) < 0:
                    raise self.fail(name, f"must be >= 0, found {getattr(a, name)}")
            elif getattr(a, name) <= 0:
                raise self.fail(name, f"must be > 0, found {getattr(a, name)}")
        for name in counts + ["q_lora_rank"]:
            value, limit = getattr(a, name), SIZE_LIMITS.get(name, DIM_LIMIT)
            if value is not None and value > limit:
                raise self.fail(name, f"{value} is not a plausible size (at most {limit}); the file is corrupt or "
                                      f"not a {_FAMILY_NAMES[a.model_type]} model")
        for name, value in (("rms_norm_eps", a.rms_norm_eps), ("routed_scaling_factor", a.routed_scaling_factor),
                            ("rope_theta", a.rope_theta)):
            if not (math.isfinite(value) and value > 0):
                raise self.fail(name, f"must be a finite number > 0, found {value}")
        if a.qk_rope_head_dim % 2:
            raise self.fail("qk_rope_head_dim", f"must be even (rotary pairs), found {a.qk_rope_head_dim}")
        if a.num_experts_per_tok > a.n_routed_experts:
            raise self.fail("num_experts_per_tok",
                            f"{a.num_experts_per_tok} exceeds n_routed_experts={a.n_routed_experts}")
        if a.first_k_dense_replace > a.num_hidden_layers:
            raise self.fail("first_k_dense_replace",
                            f"{a.first_k_dense_replace} exceeds num_hidden_layers={a.num_hidden_layers}")
        if a.n_routed_experts % a.n_group:
            raise self.fail("n_group", f"{a.n_group} does not divide n_routed_experts={a.n_routed_experts}")
        if a.topk_group > a.n_group:
            raise self.fail("topk_group", f"{a.topk_group} exceeds n_group={a.n_group}")
        if a.topk_method != "greedy":
            per_group = a.n_routed_experts // a.n_group
            if a.topk_group * per_group < a.num_experts_per_tok:
                raise self.fail("topk_group", f"{a.topk_group} groups of {per_group} experts cannot supply "
                                              f"num_experts_per_tok={a.num_experts_per_tok}")
            if a.topk_method == "noaux_tc" and a.n_group > 1 and per_group < 2:
                raise self.fail("n_group", "noaux_tc scores a group by its top-2 experts; needs >= 2 per group")
        if a.rope_scaling is not None:
            y = a.rope_scaling
            if not (math.isfinite(y.factor) and y.factor > 0):
                raise self.fail("rope_scaling.factor", f"must be a finite number > 0, found {y.factor}")
            for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                if not math.isfinite(getattr(y, name)):
                    raise self.fail(f"rope_scaling.{name}", f"must be finite, found {getattr(y, name)}")
