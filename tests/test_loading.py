"""Loading HF checkpoints: sharding, dtypes, FP8 block scales, MTP layers, and every bad input."""
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import hetero_rt
from hetero_rt.errors import CheckpointError
from fp8_models import copy_ckpt, fp8_checkpoints
from hf_models import build_hf_model, hf_logits, save_hf_model

IDS = [5, 9, 33, 2, 71, 40, 18, 90]


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    hf = build_hf_model("v3", seed=1)
    return hf, save_hf_model(hf, "v3", tmp_path_factory.mktemp("v3"))


def test_sharded_checkpoint(v3, tmp_path):
    hf, src = v3
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    shards = [names[0::3], names[1::3], names[2::3]]
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-0000{i + 1}-of-00003.safetensors"
        save_file({n: tensors[n] for n in part}, tmp_path / fname)
        weight_map.update({n: fname for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    ref = hf_logits(hf, IDS).numpy()
    got = hetero_rt.load(tmp_path, dtype="float32").logits(IDS)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_matches_its_fp32_upcast(v3, tmp_path, stored):
    """A bf16/fp16 checkpoint loaded as float32 equals the fp32 checkpoint of the same rounded weights."""
    _, src = v3
    tensors = load_file(src / "model.safetensors")
    low = {n: t.to(stored) for n, t in tensors.items()}
    up = {n: t.float() for n, t in low.items()}
    a = hetero_rt.load(copy_ckpt(src, tmp_path / "low", low), dtype="float32").logits(IDS)
    b = hetero_rt.load(copy_ckpt(src, tmp_path / "up", up), dtype="float32").logits(IDS)
    assert np.array_equal(a, b)
    rt = hetero_rt.load(tmp_path / "low")           # default dtype for a half checkpoint: bfloat16
    assert rt.dtype == torch.bfloat16
    assert np.abs(rt.logits(IDS) - b).max() <= 0.05 * np.abs(b).max()


def test_fp8_block_checkpoint_equals_dequantize_then_load(tmp_path):
    # hidden 160 and intermediate 272 span several 128-blocks with partial edge blocks
    hf = build_hf_model("v3", seed=2, hidden_size=160, intermediate_size=272)
    fp8_dir, deq_dir = fp8_checkpoints(save_hf_model(hf, "v3", tmp_path / "src"), tmp_path)
    a = hetero_rt.load(fp8_dir, dtype="float32").logits(IDS)
    b = hetero_rt.load(deq_dir, dtype="float32").logits(IDS)
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
    ref = hf_logits(hf, IDS).numpy()     # fp8 is a real approximation, not garbage (routing may flip)
    assert np.corrcoef(a.ravel(), ref.ravel())[0, 1] > 0.95


def test_mtp_layer_is_recognised_and_skipped(v3, tmp_path):
    hf, src = v3
    tensors = load_file(src / "model.safetensors")
    n = hf.config.num_hidden_layers
    extra = {k.replace("model.layers.1.", f"model.layers.{n}."): v.clone() for k, v in tensors.items()
             if k.startswith("model.layers.1.")}
    extra[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(4, 4)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    rt = hetero_rt.load(copy_ckpt(src, tmp_path, {**tensors, **extra}, cfg), dtype="float32")
    ref = hf_logits(hf, IDS).numpy()
    assert np.abs(rt.logits(IDS) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_missing_tensor_is_named(v3, tmp_path):
    _, src = v3
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        hetero_rt.load(copy_ckpt(src, tmp_path, tensors))


def test_wrong_shape_is_named(v3, tmp_path):
    _, src = v3
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"kv_b_proj\.weight") as e:
        hetero_rt.load(copy_ckpt(src, tmp_path, tensors))
    assert "model.safetensors" in str(e.value)


def test_integer_tensor_is_rejected(v3, tmp_path):
    _, src = v3
    tensors = load_file(src / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(tensors["model.norm.weight"].shape, dtype=torch.int64)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        hetero_rt.load(copy_ckpt(src, tmp_path, tensors))


def test_config_that_does_not_match_weights(v3, tmp_path):
    _, src = v3
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 2                    # weights have 3 layers; the 3rd is not MTP
    cfg["num_nextn_predict_layers"] = 0
    dst = copy_ckpt(src, tmp_path, None, cfg)
    with pytest.raises(CheckpointError, match=re.escape(f"{dst / 'model.safetensors'}: checkpoint has tensors the "
                                                        "config does not account for: model.layers.2.")
                       + r".* \(in model\.safetensors\)"):
        hetero_rt.load(dst)


def test_unaccounted_tensors_name_their_shards(v3, tmp_path):
    """The tensors the config does not account for are named with the shard holding each: the shard's path
    when they are all in one, the directory and every shard's name when they are spread over several."""
    _, src = v3
    tensors = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"] = 2, 0
    extra = sorted(n for n in tensors if n.startswith("model.layers.2."))
    for spread, (a, b) in {False: ([], extra), True: (extra[:1], extra[1:])}.items():
        d = tmp_path / f"spread_{spread}"
        d.mkdir()
        rest = [n for n in tensors if n not in extra]
        parts = {"model-00001-of-00002.safetensors": rest + a, "model-00002-of-00002.safetensors": b}
        for fname, names in parts.items():
            save_file({n: tensors[n] for n in names}, d / fname)
        weight_map = {n: fname for fname, names in parts.items() for n in names}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError) as e:
            hetero_rt.load(d)
        msg = str(e.value)
        where = (f"{d} (model-00001-of-00002.safetensors, model-00002-of-00002.safetensors)" if spread
                 else str(d / "model-00002-of-00002.safetensors"))
        assert msg.startswith(f"{where}: checkpoint has tensors the config does not account for: "), msg
        assert f"{extra[0]} (in {'model-00001' if spread else 'model-00002'}-of-00002.safetensors)" in msg, msg
        assert f"{extra[1]} (in model-00002-of-00002.safetensors)" in msg, msg
        assert f"(+{len(extra) - 5} more)" in msg and str(d / "config.json") in msg, msg


def test_truncated_file(v3, tmp_path):
    _, src = v3
    dst = copy_ckpt(src, tmp_path)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[:len(data) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        hetero_rt.load(dst)


def test_wrong_path():
    with pytest.raises(CheckpointError, match="no such file or directory"):
        hetero_rt.load("/nonexistent/checkpoint")
