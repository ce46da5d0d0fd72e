"""ModelArgs: the frozen description of a DeepSeek-family model, built from the checkpoint's own
metadata through one explicit key table.

Contract: `ModelArgs.from_config_file(path)` accepts config.json of model_type deepseek_v2,
deepseek_v3 and kimi_k2 and either returns a complete, self-consistent ModelArgs or raises
ConfigError naming the file, the key and what was expected. Nothing is inferred from file names
or magic dimensions. GGUF metadata (a later reader) produces the same dict shape and goes through
`ModelArgs.from_dict`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2")
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

    # ---- derived quantities used by the model math ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_correction_bias(self) -> bool:
        return self.topk_method == "noaux_tc"

    def is_moe_layer(self, layer: int) -> bool:
        """DeepSeek's rule: dense for the first k layers, then MoE every moe_layer_freq layers."""
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

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
        raise self.fail(key, f"expected {typ.__name__}, found {value!r}")

    def choice(self, key: str, allowed: tuple[str, ...], default: Any = _REQUIRED) -> str:
        value = self.get(key, str, default)
        if value not in allowed:
            raise self.fail(key, f"expected one of {', '.join(allowed)}, found {value!r}")
        return value

    def parse(self) -> ModelArgs:
        model_type = self.choice("model_type", MODEL_TYPES)
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

    def rope(self) -> tuple[float, YarnScaling | None]:
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
            theta = 10000.0  # the value of DeepSeek-V2/V3's configuration code when absent
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
            raise self.fail("hidden_act", f"DeepSeek models use 'silu', found {act!r}")

    def check_consistency(self, a: ModelArgs) -> None:
        counts = [field for field, (_, typ, _) in KEY_TABLE.items() if typ is int] + ["n_group", "topk_group"]
        for name in counts:
            if name in ("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"):
                if getattr(a, name) < 0:
                    raise self.fail(name, f"must be >= 0, found {getattr(a, name)}")
            elif getattr(a, name) <= 0:
                raise self.fail(name, f"must be > 0, found {getattr(a, name)}")
        for name in counts + ["q_lora_rank"]:
            value, limit = getattr(a, name), SIZE_LIMITS.get(name, DIM_LIMIT)
            if value is not None and value > limit:
                raise self.fail(name, f"{value} is not a plausible size (at most {limit}); the file is corrupt or "
                                      f"not a DeepSeek-family model")
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
