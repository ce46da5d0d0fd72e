"""Synthetic checkpoints are real HF DeepSeek-V3 checkpoints: transformers loads them with no missing
or unexpected keys and computes the same logits as hetero_rt."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import hetero_rt
from hetero_rt.checkpoint import synthetic
from hetero_rt.checkpoint.names import hf_tensor_shapes
from hetero_rt.checkpoint.synthetic import ensure_demo_checkpoint, synthetic_config, write_synthetic_checkpoint
from hetero_rt.config import ModelArgs

IDS = [0, 57, 300, 12, 999, 4, 1500, 88]


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


def test_sharded_index_is_consistent(tiny32):
    index = json.loads((tiny32 / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1
    for f in files:
        with safe_open(tiny32 / f, "pt") as h:
            assert {n for n, g in index["weight_map"].items() if g == f} == set(h.keys())


def test_fp8_variant(tmp_path):
    cfg = synthetic_config("tiny", hidden_size=256, moe_intermediate_size=160)
    fp8 = write_synthetic_checkpoint(tmp_path / "fp8", cfg, seed=3, dtype="fp8")
    bf16 = write_synthetic_checkpoint(tmp_path / "bf16", cfg, seed=3, dtype="bfloat16")
    with safe_open(fp8 / "model.safetensors", "pt") as h:
        w = h.get_tensor("model.layers.1.mlp.experts.0.gate_proj.weight")
        s = h.get_tensor("model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv")
        assert w.dtype == torch.float8_e4m3fn and tuple(s.shape) == (2, 2)  # (160, 256) in 128-blocks
    a = hetero_rt.load(fp8, dtype="float32").logits(IDS)
    b = hetero_rt.load(bf16, dtype="float32").logits(IDS)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_deterministic_and_tokenizer(tmp_path):
    a = write_synthetic_checkpoint(tmp_path / "a", synthetic_config("tiny"), seed=7)
    b = write_synthetic_checkpoint(tmp_path / "b", synthetic_config("tiny"), seed=7)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    rt = hetero_rt.load(a)
    text = "The quick brown fox reads 42 weights."
    assert rt.tokenizer.decode(rt.tokenizer.encode(text)) == text
    assert rt.tokenizer.bos_id == 0 and rt.tokenizer.eos_ids == (1,)
    assert rt.tokenizer.vocab_size <= rt.args.vocab_size


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(synthetic, "build_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_checkpoint(tmp_path / "x", synthetic_config("tiny"))
    assert list(tmp_path.iterdir()) == []


def test_demo_checkpoint_is_built_once(tmp_path, monkeypatch):
    calls = []

    def fake(path, config, **kw):
        calls.append(config["hidden_size"])
        return write_synthetic_checkpoint(path, synthetic_config("tiny"), **kw)
    monkeypatch.setattr(synthetic, "write_synthetic_checkpoint", fake)
    p1, p2 = ensure_demo_checkpoint(tmp_path), ensure_demo_checkpoint(tmp_path)
    assert p1 == p2 and calls == [1024]


def test_shape_table_matches_the_real_deepseek_v3_release():
    """hf_tensor_shapes (used by the writer and the planner) against the independent V3 fixture."""
    fixture = Path(__file__).parent / "fixtures" / "deepseek_v3"
    real = json.loads(gzip.decompress((fixture / "tensor_shapes.json.gz").read_bytes()))["tensors"]
    real = {n: tuple(s) for n, (_, s) in real.items() if not n.endswith("_scale_inv")
            and not n.startswith("model.layers.61.")}
    ours = {n: s for n, (_, s) in hf_tensor_shapes(ModelArgs.from_config_file(fixture / "config.json")).items()}
    assert ours == real


def test_demo_preset_size():
    args = ModelArgs.from_dict(synthetic_config("demo"))
    nbytes = sum(2 * int(np.prod(s)) for _, s in hf_tensor_shapes(args).values())
    assert 250e6 < nbytes < 700e6
