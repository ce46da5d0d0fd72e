"""Synthetic checkpoints are real HF DeepSeek-V3 checkpoints: transformers loads them with no missing
or unexpected keys and computes the same logits as hetero_rt; the FP8 variant dequantizes to the bf16
weights of the same seed; the tokenizer round-trips text and its chat template renders in a sandbox."""
import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

import hetero_rt
from hetero_rt.checkpoint import synthetic
from hetero_rt.checkpoint.names import hf_tensor_shapes
from hetero_rt.checkpoint.synthetic import (checkpoint_size, ensure_demo_checkpoint, synthetic_config,
                                            write_synthetic_checkpoint)
from hetero_rt.checkpoint.tokenizer_builder import ASSISTANT, BOS, EOS, USER
from hetero_rt.config import ModelArgs

IDS = [0, 57, 300, 12, 999, 4, 1500, 88]
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({n: h.get_tensor(n) for n in h.keys()})
    return out


def _dequant(w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Reference block dequant: every 128x128 block of the fp8 weight times its scale_inv."""
    s = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
    return w.float() * s


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("s") / "tiny", synthetic_config("tiny"),
                                      dtype="float32", shard_bytes=1 << 20)


def test_transformers_loads_it_and_agrees(tiny32):
    from transformers import DeepseekV3ForCausalLM
    hf, info = DeepseekV3ForCausalLM.from_pretrained(tiny32, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0].numpy()
    got = hetero_rt.load(tiny32).logits(IDS)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("overrides", [{"rope_scaling": YARN}, {"q_lora_rank": None}], ids=["yarn", "no-q-lora"])
def test_variants_load_into_transformers(tmp_path, overrides):
    """The real-style legacy rope_scaling yarn dict and the q_proj (no q_lora) layout."""
    from transformers import DeepseekV3ForCausalLM
    path = write_synthetic_checkpoint(tmp_path / "v", synthetic_config("tiny", **overrides), dtype="float32",
                                      tokenizer=False)
    hf, info = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0].numpy()
    assert np.isfinite(ref).all() and ref.std() > 0.1  # well scaled: logits O(1), not collapsed


def test_configs_are_real_deepseek_v3_configs(tiny32):
    from transformers import DeepseekV3Config
    demo = DeepseekV3Config(**synthetic_config("demo"))
    assert demo.rope_parameters["rope_type"] == "yarn" and demo.rope_parameters["factor"] == 4.0
    assert (demo.n_routed_experts, demo.num_experts_per_tok, demo.n_group, demo.topk_group) == (64, 6, 8, 4)
    tiny = DeepseekV3Config.from_pretrained(tiny32)
    assert tiny.model_type == "deepseek_v3" and tiny.topk_method == "noaux_tc" and tiny.q_lora_rank == 48
    fixture = json.loads((Path(__file__).parent / "fixtures" / "deepseek_v3" / "config.json").read_text())
    missing = set(fixture) - set(synthetic_config("demo")) - {"auto_map", "transformers_version", "quantization_config"}
    assert not missing, f"keys of the real config.json the synthetic one lacks: {missing}"


def test_sharded_index_is_consistent(tiny32):
    index = json.loads((tiny32 / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and files == {p.name for p in tiny32.glob("*.safetensors")}
    total = 0
    for f in files:
        assert f.endswith(f"-of-{len(files):05d}.safetensors")
        with safe_open(tiny32 / f, "pt") as h:
            assert {n for n, g in index["weight_map"].items() if g == f} == set(h.keys())
            shard = sum(h.get_tensor(n).numel() * h.get_tensor(n).element_size() for n in h.keys())
        assert shard <= 1 << 20
        total += shard
    assert index["metadata"]["total_size"] == total == checkpoint_size(synthetic_config("tiny"), "float32")[1]


@pytest.mark.parametrize("shard_bytes", [256 << 20, None], ids=["default", "none"])
def test_one_file_when_the_model_fits_a_shard(tmp_path, shard_bytes):
    path = write_synthetic_checkpoint(tmp_path / "one", synthetic_config("tiny"), shard_bytes=shard_bytes,
                                      tokenizer=False)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


def test_writing_over_an_existing_checkpoint_replaces_it(tmp_path):
    old = write_synthetic_checkpoint(tmp_path / "c", synthetic_config("tiny"), dtype="float32", shard_bytes=1 << 20)
    assert (old / "model.safetensors.index.json").exists()
    new = write_synthetic_checkpoint(tmp_path / "c", synthetic_config("tiny"), tokenizer=False)
    assert sorted(p.name for p in new.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary directory left behind


def test_fp8_dequantizes_to_the_bf16_weights_of_the_same_seed(tmp_path):
    cfg = synthetic_config("tiny", hidden_size=256, moe_intermediate_size=160)
    fp8 = write_synthetic_checkpoint(tmp_path / "fp8", cfg, seed=3, dtype="fp8", tokenizer=False)
    bf16 = write_synthetic_checkpoint(tmp_path / "bf16", cfg, seed=3, dtype="bfloat16", tokenizer=False)
    assert json.loads((fp8 / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    q, ref = _tensors(fp8), _tensors(bf16)
    assert set(q) - set(ref) == {n + "_scale_inv" for n in ref if n + "_scale_inv" in q}
    assert sum(n.endswith("_scale_inv") for n in q) == 5 * 2 + 3 + 3 * 8 + 3  # attention, dense, experts, shared
    for name, want in ref.items():
        got = q[name]
        if name + "_scale_inv" in q:
            s = q[name + "_scale_inv"]
            assert got.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
            assert s.shape == (math.ceil(got.shape[0] / 128), math.ceil(got.shape[1] / 128)), name
            err = (_dequant(got, s) - want.float()).norm() / want.float().norm()
            assert err < 0.05, (name, err)
        else:  # embeddings, norms, gate, lm_head (bf16) and the fp32 correction bias: untouched
            assert got.dtype == want.dtype and torch.equal(got, want), name
    w = q["model.layers.1.mlp.experts.0.gate_proj.weight"]
    assert q["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"].shape == (2, 2)  # (160, 256) in 128-blocks
    assert q["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16 and w.dtype == torch.float8_e4m3fn
    assert checkpoint_size(cfg, "fp8")[1] == sum(t.numel() * t.element_size() for t in q.values())
    # the whole model: the FP8 checkpoint runs as the same model with every FP8 weight dequantized
    deq = {n: (_dequant(t, q[n + "_scale_inv"]) if n + "_scale_inv" in q else t.float())
           for n, t in q.items() if not n.endswith("_scale_inv")}
    plain = {k: v for k, v in json.loads((fp8 / "config.json").read_text()).items() if k != "quantization_config"}
    (tmp_path / "deq").mkdir()
    save_file(deq, tmp_path / "deq" / "model.safetensors")
    (tmp_path / "deq" / "config.json").write_text(json.dumps(plain))
    a = hetero_rt.load(fp8, dtype="float32").logits(IDS)
    b = hetero_rt.load(tmp_path / "deq", dtype="float32").logits(IDS)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_weights_are_well_scaled(tmp_path):
    t = _tensors(write_synthetic_checkpoint(tmp_path / "w", synthetic_config("tiny"), dtype="float32",
                                            tokenizer=False))
    bias = t["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and bias.abs().min() > 0
    w = t["model.layers.1.self_attn.q_b_proj.weight"]
    assert abs(w.std().item() * math.sqrt(w.shape[1]) - 1) < 0.1  # std 1/sqrt(fan_in)
    assert abs(t["model.embed_tokens.weight"].std().item() - 1) < 0.05
    assert abs(t["model.norm.weight"].mean().item() - 1) < 0.1


def test_deterministic(tmp_path):
    a = write_synthetic_checkpoint(tmp_path / "a", synthetic_config("tiny"), seed=7)
    b = write_synthetic_checkpoint(tmp_path / "b", synthetic_config("tiny"), seed=7)
    c = write_synthetic_checkpoint(tmp_path / "c", synthetic_config("tiny"), seed=8, tokenizer=False)
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tokenizer_files(tiny32):
    tok = Tokenizer.from_file(str(tiny32 / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in (BOS, EOS, USER, ASSISTANT)] == [0, 1, 2, 3]
    assert tok.get_vocab_size() == 2048  # exactly the config's vocab_size: every id has an embedding row
    for text in ("The quick brown fox reads 42 weights.", "  two  spaces,\nnew line\t& tab", "naïve 日本 🦊"):
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert len(tok.encode("The model reads every expert").ids) <= 8  # merges learned from the corpus
    assert tok.encode(BOS + "hi" + EOS).ids[0] == 0 and tok.encode(BOS + "hi" + EOS).ids[-1] == 1
    cfg = json.loads((tiny32 / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True and (cfg["bos_token"], cfg["eos_token"]) == (BOS, EOS)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(cfg["chat_template"])
    text = template.render(messages=messages, add_generation_prompt=True, bos_token=BOS, eos_token=EOS)
    assert text == f"{BOS}Be brief.{USER}Hi{ASSISTANT}Hello{EOS}{USER}Why?{ASSISTANT}"
    text = template.render(messages=messages[1:2], add_generation_prompt=False, bos_token=BOS, eos_token=EOS)
    assert text == f"{BOS}{USER}Hi"


def test_runtime_reads_the_tokenizer(tiny32):
    rt = hetero_rt.load(tiny32)
    text = "The quick brown fox reads 42 weights."
    assert rt.tokenizer.decode(rt.tokenizer.encode(text)) == text
    assert rt.tokenizer.bos_id == 0 and rt.tokenizer.eos_ids == (1,)
    assert rt.tokenizer.vocab_size <= rt.args.vocab_size


@pytest.mark.parametrize("step", ["_write_shard", "build_tokenizer"])
def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, step):
    """Interrupted after the first shard is on disk, or while writing the tokenizer."""
    real = getattr(synthetic, step)
    calls = []

    def interrupt_second_call(*a, **k):
        calls.append(1)
        if len(calls) == 2 or step == "build_tokenizer":
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(synthetic, step, interrupt_second_call)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_checkpoint(tmp_path / "x", synthetic_config("tiny"), shard_bytes=200_000)
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_has_exactly_the_requested_vocab(tmp_path):
    from hetero_rt.checkpoint.tokenizer_builder import build_tokenizer
    for size in (300, 4096):
        build_tokenizer(tmp_path, size)
        assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size() == size


def test_demo_checkpoint_is_built_once(tmp_path, monkeypatch):
    calls = []

    def fake(path, config, **kw):
        calls.append(config["hidden_size"])
        return write_synthetic_checkpoint(path, synthetic_config("tiny"), **kw)
    monkeypatch.setattr(synthetic, "write_synthetic_checkpoint", fake)
    p1, p2 = ensure_demo_checkpoint(tmp_path), ensure_demo_checkpoint(tmp_path)
    assert p1 == p2 == tmp_path / synthetic.DEMO_TAG and calls == [1024]
    monkeypatch.setenv("HETERO_RT_CACHE", str(tmp_path))
    assert ensure_demo_checkpoint() == p1 and calls == [1024]


def test_shape_table_matches_the_real_deepseek_v3_release():
    """hf_tensor_shapes (used by the writer and the planner) against the independent V3 fixture: every
    tensor's dtype and shape, the FP8 weights' block scales included (the config is block FP8)."""
    fixture = Path(__file__).parent / "fixtures" / "deepseek_v3"
    real = json.loads(gzip.decompress((fixture / "tensor_shapes.json.gz").read_bytes()))["tensors"]
    real = {n: (d, tuple(s)) for n, (d, s) in real.items() if not n.startswith("model.layers.61.")}
    ours = hf_tensor_shapes(ModelArgs.from_config_file(fixture / "config.json"))
    assert ours == real


def test_demo_preset_size():
    params, nbytes = checkpoint_size(synthetic_config("demo"))
    assert nbytes == 2 * params + 2 * 3 * 64 and 250e6 < nbytes < 600e6  # + the fp32 correction biases
