"""Fuzzing config.json and the runtime API's arguments (issue 13, item 8): every case must end in a
HeteroRTError or a valid result, never another exception, a hang or a silent coercion. Hypothesis runs
derandomized (the same cases every run); `--runslow` runs ten times as many."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_guard import time_limit
import hetero_rt
from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
from hetero_rt.config import DIM_LIMIT, KEY_TABLE, SIZE_LIMITS, ModelArgs
from hetero_rt.errors import ConfigError, HeteroRTError
from hetero_rt.runtime.request import GenerationResult

CASE_LIMIT_S = 20          # a case that runs longer than this is a hang (generous: the machine is slow)
COUNTS: dict[str, dict[str, int]] = {}


def _count(suite: str, outcome: str) -> None:
    COUNTS.setdefault(suite, {}).setdefault(outcome, 0)
    COUNTS[suite][outcome] += 1


def _settings(n: int, slow: bool):
    return settings(max_examples=n * (10 if slow else 1), deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# ---- config.json -------------------------------------------------------------------------------
HOSTILE = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.sampled_from([0, -1, 1, 2, 3, 7, 2 ** 31, 2 ** 40, 2 ** 63, 10 ** 6]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 2.5, 1e-300, 1e300]),
    st.booleans(), st.none(), st.text(max_size=8), st.sampled_from(["7", "1e6", "yarn", "silu", ""]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
KEYS = sorted({key for key, _, _ in KEY_TABLE.values()} | {
    "model_type", "scoring_func", "topk_method", "n_group", "topk_group", "q_lora_rank", "rope_theta",
    "rope_scaling", "rope_parameters", "eos_token_id", "bos_token_id", "quantization_config", "hidden_act",
    "rope_interleave"})
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


@st.composite
def configs(draw):
    cfg = synthetic_config("tiny", rope_scaling=dict(YARN))
    for key in draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=4, unique=True)):
        if draw(st.booleans()) and key in cfg:
            del cfg[key]
        else:
            cfg[key] = draw(HOSTILE)
    if draw(st.booleans()) and isinstance(cfg.get("rope_scaling"), dict):
        cfg["rope_scaling"][draw(st.sampled_from(sorted(YARN)))] = draw(HOSTILE)
    return cfg


def _plausible(a: ModelArgs) -> None:
    """What a config that parses must satisfy, checked here independently of the parser's own code."""
    for field, (_, typ, _) in KEY_TABLE.items():
        value = getattr(a, field)
        assert type(value) is typ, (field, value)
        if typ is int:
            assert 0 <= value <= SIZE_LIMITS.get(field, DIM_LIMIT), (field, value)
        if typ is float:
            assert math.isfinite(value) and value > 0, (field, value)
    assert 1 <= a.num_experts_per_tok <= a.n_routed_experts and a.n_routed_experts % a.n_group == 0
    assert math.isfinite(a.rope_theta) and a.rope_theta > 0
    if a.rope_scaling is not None:
        assert all(math.isfinite(v) for v in vars(a.rope_scaling).values())


def _check_config(cfg: dict) -> None:
    with time_limit(CASE_LIMIT_S):
        try:
            args = ModelArgs.from_dict(cfg, source="fuzz")
        except ConfigError:
            _count("config.json", "clean error")
            return
    _plausible(args)
    _count("config.json", "valid")


def test_fuzz_config_json():
    given(configs())(_settings(400, False)(lambda cfg: _check_config(cfg)))()
    assert sum(COUNTS["config.json"].values()) >= 400


@pytest.mark.slow
def test_fuzz_config_json_long():
    given(configs())(_settings(400, True)(lambda cfg: _check_config(cfg)))()


def test_config_files_that_are_not_json_objects(tmp_path):
    for k, data in enumerate([b"\xff\xfe{", b"{", b"[1, 2]", b"null", b'{"model_type": "deepseek_v3"',
                              json.dumps({"a": 1}).encode() * 2, b"", b"\x00" * 10]):
        path = tmp_path / f"c{k}.json"
        path.write_bytes(data)
        with pytest.raises(ConfigError, match=f"c{k}.json"):
            ModelArgs.from_config_file(path)


# ---- runtime API arguments ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    path = write_synthetic_checkpoint(tmp_path_factory.mktemp("api") / "ck", synthetic_config("tiny"),
                                      dtype="float32")
    return hetero_rt.load(path, context=128)


ANY = st.one_of(HOSTILE, st.binary(max_size=4), st.tuples(st.integers(0, 5)))
PROMPTS = st.one_of(
    st.text(max_size=12),
    st.lists(st.integers(-5, 2100), max_size=6),
    st.lists(st.one_of(st.integers(0, 50), st.floats(), st.booleans(), st.text(max_size=2), st.none()), max_size=4),
    st.lists(st.lists(st.integers(0, 5), max_size=2), max_size=2),
    ANY,
)


@st.composite
def calls(draw):
    def mostly(valid):    # 4 in 5 values in range, so whole calls get through too
        return draw(valid if draw(st.integers(0, 4)) else ANY)
    kw = {"max_new_tokens": mostly(st.integers(1, 4)),
          "temperature": mostly(st.floats(0, 3)),
          "top_k": mostly(st.integers(0, 3000)),
          "top_p": mostly(st.floats(0, 1, exclude_min=True)),
          "seed": mostly(st.one_of(st.none(), st.integers(-(1 << 80), 1 << 80))),
          "chat": mostly(st.booleans())}
    keep = draw(st.lists(st.sampled_from(sorted(kw)), unique=True))  # the others keep their defaults
    prompt = draw(st.one_of(st.text(min_size=1, max_size=12), st.lists(st.integers(0, 2047), min_size=1, max_size=6))
                  if draw(st.integers(0, 2)) else PROMPTS)
    return prompt, {k: kw[k] for k in keep + ["max_new_tokens"]}


def _check_call(rt, call) -> None:
    prompt, kw = call
    with time_limit(CASE_LIMIT_S):
        try:
            res = rt.generate(prompt, **kw)
        except HeteroRTError:
            _count("API arguments", "clean error")
            return
    assert isinstance(res, GenerationResult) and 1 <= len(res.new_ids) <= kw.get("max_new_tokens", 64)
    assert all(type(t) is int and 0 <= t < rt.args.vocab_size for t in res.new_ids)
    _count("API arguments", "valid")


def test_fuzz_api_arguments(rt):
    given(calls())(_settings(150, False)(lambda call: _check_call(rt, call)))()
    assert COUNTS["API arguments"].get("clean error", 0) > 0 and COUNTS["API arguments"].get("valid", 0) > 0


@pytest.mark.slow
def test_fuzz_api_arguments_long(rt):
    given(calls())(_settings(150, True)(lambda call: _check_call(rt, call)))()


def test_zz_report_counts(capsys):
    with capsys.disabled():
        for suite, counts in COUNTS.items():
            print(f"\nfuzz {suite}: {sum(counts.values())} cases: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
