"""ModelArgs from config.json: the real configs parse to the published figures; every bad field is
reported by name."""
import json
from pathlib import Path

import pytest

from hetero_rt.kv_cache import bytes_per_token
from hetero_rt.config import ModelArgs
from hetero_rt.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"


def real(name: str) -> dict:
    return json.loads((FIXTURES / (f"{name}/config.json" if name == "deepseek_v3" else f"{name}_config.json")).read_text())


def test_deepseek_v3_real_config():
    a = ModelArgs.from_dict(real("deepseek_v3"))
    assert (a.hidden_size, a.num_hidden_layers, a.n_routed_experts, a.num_experts_per_tok) == (7168, 61, 256, 8)
    assert (a.scoring_func, a.topk_method, a.n_group, a.topk_group) == ("sigmoid", "noaux_tc", 8, 4)
    assert a.q_lora_rank == 1536 and a.kv_lora_rank == 512 and a.fp8_block_size == (128, 128)
    assert a.rope_scaling.factor == 40 and a.rope_scaling.original_max_position_embeddings == 4096
    assert a.num_nextn_predict_layers == 1 and a.eos_token_ids == (1,)
    assert [a.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    # YaRN: softmax scale = 192^-0.5 * (0.1 * 1.0 * ln 40 + 1)^2
    assert a.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * 3.6888794541139363 + 1) ** 2)


def test_deepseek_v2_lite_real_config():
    a = ModelArgs.from_dict(real("deepseek_v2_lite"))
    assert a.q_lora_rank is None and a.n_shared_experts == 2 and not a.norm_topk_prob
    assert (a.scoring_func, a.topk_method) == ("softmax", "greedy")


def test_kimi_k2_real_config():
    a = ModelArgs.from_dict(real("kimi_k2"))
    assert a.model_type == "kimi_k2" and a.n_routed_experts == 384 and a.routed_scaling_factor == 2.827
    assert a.rope_theta == 50000.0 and a.rope_scaling.beta_fast == 1.0


def test_v2_routing_defaults_to_softmax_greedy():
    cfg = real("deepseek_v2_lite")
    del cfg["scoring_func"], cfg["topk_method"]
    a = ModelArgs.from_dict(cfg)
    assert (a.scoring_func, a.topk_method) == ("softmax", "greedy")


def test_rope_parameters_spelling_equals_rope_scaling():
    legacy = real("deepseek_v3")
    modern = dict(legacy)
    scaling = modern.pop("rope_scaling")
    theta = modern.pop("rope_theta")
    modern["rope_parameters"] = {**{k: v for k, v in scaling.items() if k != "type"},
                                 "rope_type": "yarn", "rope_theta": theta}
    assert ModelArgs.from_dict(modern) == ModelArgs.from_dict(legacy)


def test_q_lora_rank_zero_means_none():
    cfg = real("deepseek_v3")
    cfg["q_lora_rank"] = 0
    assert ModelArgs.from_dict(cfg).q_lora_rank is None


def test_kv_cache_bytes_per_token_v3():
    a = ModelArgs.from_dict(real("deepseek_v3"))
    b = bytes_per_token(a, dtype_bytes=2)
    assert b["mla"] == 61 * (512 + 64) * 2 == 70272
    assert b["mha"] == 61 * 128 * (192 + 128) * 2 == 4997120


def mutate(key, value):
    cfg = real("deepseek_v3")
    if value is KeyError:
        del cfg[key]
    else:
        cfg[key] = value
    return cfg


@pytest.mark.parametrize("key,value,needle", [
    ("model_type", "llama", "'model_type': expected one of deepseek_v2, deepseek_v3, kimi_k2"),
    ("hidden_size", KeyError, "'hidden_size': missing"),
    ("kv_lora_rank", "512", "'kv_lora_rank': expected int"),
    ("scoring_func", KeyError, "'scoring_func': missing"),
    ("scoring_func", "relu", "'scoring_func': expected one of softmax, sigmoid"),
    ("topk_method", "random", "'topk_method': expected one of greedy, group_limited_greedy, noaux_tc"),
    ("topk_method", KeyError, "'topk_method': missing"),
    ("num_experts_per_tok", 300, "'num_experts_per_tok': 300 exceeds n_routed_experts=256"),
    ("n_group", 7, "'n_group': 7 does not divide n_routed_experts=256"),
    ("topk_group", 9, "'topk_group': 9 exceeds n_group=8"),
    ("first_k_dense_replace", 62, "'first_k_dense_replace': 62 exceeds num_hidden_layers=61"),
    ("hidden_act", "gelu", "'hidden_act': DeepSeek models use 'silu'"),
    ("qk_rope_head_dim", 63, "'qk_rope_head_dim': must be even"),
    ("num_attention_heads", 0, "'num_attention_heads': must be > 0"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "only 'yarn' rope scaling is supported"),
    ("rope_scaling", {"type": "yarn", "factor": 40}, "'rope_scaling.original_max_position_embeddings': missing"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 5000.0}, "'rope_theta': 10000.0 contradicts"),
    ("quantization_config", {"quant_method": "gptq"}, "only DeepSeek's block fp8 is supported"),
    ("q_lora_rank", -1, "'q_lora_rank': expected null or a positive integer"),
    ("num_hidden_layers", 1_000_000, "'num_hidden_layers': 1000000 is not a plausible size (at most 1024)"),
    ("moe_intermediate_size", 2 ** 40, f"'moe_intermediate_size': {2 ** 40} is not a plausible size"),
    ("vocab_size", 2 ** 30, "'vocab_size': 1073741824 is not a plausible size"),
    ("rms_norm_eps", float("nan"), "'rms_norm_eps': must be a finite number > 0, found nan"),
    ("rms_norm_eps", 0.0, "'rms_norm_eps': must be a finite number > 0, found 0.0"),
    ("routed_scaling_factor", float("nan"), "'routed_scaling_factor': must be a finite number > 0, found nan"),
    ("routed_scaling_factor", float("inf"), "'routed_scaling_factor': must be a finite number > 0, found inf"),
    ("rope_theta", 0, "'rope_theta': must be a finite number > 0, found 0.0"),
])
def test_bad_field_is_named(key, value, needle):
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_dict(mutate(key, value), source="ckpt/config.json")
    assert needle in str(e.value)
    assert str(e.value).startswith("ckpt/config.json: ")


def test_missing_and_corrupt_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        ModelArgs.from_config_file(tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelArgs.from_config_file(tmp_path)
