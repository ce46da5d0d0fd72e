"""Checkpoints carrying more than the model (issue 18): a GGUF with llama.cpp's multi-token-prediction
block (`deepseek2.nextn_predict_layers`, blk.{L}.nextn.*) loads as the same model without it; a tensor
neither the model nor a known-ignorable kind accounts for is refused, naming it (GGUF and safetensors);
and `hetero-rt demo` end to end in a temporary cache directory."""
import json
import re

import gguf
import numpy as np
import pytest
import torch
from pathlib import Path
from safetensors.torch import load_file

import hetero_rt
from fp8_models import copy_ckpt
from gguf_models import KQUANT_DIMS, dequantized_reference, make_gguf, rel_err
from hetero_rt.api import make_plan
from hetero_rt.checkpoint import synthetic
from hetero_rt.checkpoint.gguf import GGUFCheckpoint
from hetero_rt.checkpoint.source import read_tensor_meta
from hetero_rt.cli import DEMO_PROMPT, main
from hetero_rt.errors import CheckpointError
from hetero_rt.placement.memory import plan_memory
from hf_models import build_hf_model, hf_logits, save_hf_model

IDS = [3, 17, 42, 5, 88, 61, 0, 23, 9, 77, 31, 12]
EXACT = Path(__file__).parent / "fixtures" / "gguf-cpu-exact.yaml"   # fp32 activations: equal to the reference
ARCH = "deepseek2"
# llama.cpp's MTP tensors (gguf-py MODEL_TENSOR.NEXTN_*: "blk.{bid}.nextn.<suffix>"), shapes for hidden size D
# and vocabulary V: eh_proj (D, 2D) projects [enorm(embedding); hnorm(hidden)], shared_head_* its output head.
NEXTN = {"eh_proj": lambda d, v: (d, 2 * d), "enorm": lambda d, v: (d,), "hnorm": lambda d, v: (d,),
         "shared_head_norm": lambda d, v: (d,), "embed_tokens": lambda d, v: (v, d),
         "shared_head_head": lambda d, v: (v, d)}


def rewrite_gguf(src: Path, dst: Path, extra: dict[str, tuple] = (), meta: dict[str, int] = ()) -> Path:
    """A copy of the GGUF at src (every tensor byte for byte, in its ggml type) with `meta` (deepseek2.*
    uint32 keys) set and `extra` tensors appended: name -> (ggml-packed numpy data, GGMLQuantizationType)."""
    reader = gguf.GGUFReader(src)
    out = gguf.GGUFWriter(dst, ARCH)
    meta = dict(meta)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key.removeprefix(f"{ARCH}.") in meta:
            continue                                                    # the writer's own, or set below
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        out.add_key_value(key, field.contents(), field.types[0], sub)
    for key, value in meta.items():
        out.add_uint32(f"{ARCH}.{key}", value)
    for t in reader.tensors:
        out.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, (data, qtype) in dict(extra).items():
        out.add_tensor(name, data, raw_dtype=qtype)
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()
    return dst


def with_mtp_block(src: Path, dst: Path, seed: int = 1) -> Path:
    """src plus one MTP block as llama.cpp lays it out: block_count + 1, nextn_predict_layers = 1, and
    blk.{L} holding a full MoE block (here the last layer's tensors, in their ggml types) and the six
    nextn tensors (random F32: a loader that used them would change the logits)."""
    reader = gguf.GGUFReader(src)
    layers = int(reader.fields[f"{ARCH}.block_count"].contents())
    d = int(reader.fields[f"{ARCH}.embedding_length"].contents())
    v = int(reader.fields[f"{ARCH}.vocab_size"].contents())
    last = f"blk.{layers - 1}."
    extra = {t.name.replace(last, f"blk.{layers}.", 1): (np.array(t.data), t.tensor_type)
             for t in reader.tensors if t.name.startswith(last)}
    rng = np.random.default_rng(seed)
    for suffix, shape in NEXTN.items():
        extra[f"blk.{layers}.nextn.{suffix}"] = (rng.standard_normal(shape(d, v)).astype(np.float32),
                                                 gguf.GGMLQuantizationType.F32)
    return rewrite_gguf(src, dst, extra, {"block_count": layers + 1, "nextn_predict_layers": 1})


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    """(transformers model, Q8_0 GGUF, config, the same GGUF with an MTP block)."""
    d = tmp_path_factory.mktemp("q8")
    model, path, cfg = make_gguf("v3", d, "Q8_0", **KQUANT_DIMS)
    return model, path, cfg, with_mtp_block(path, d / "mtp.gguf")


def test_gguf_mtp_block_is_not_part_of_the_model(q8):
    model, path, cfg, mtp = q8
    with GGUFCheckpoint(mtp) as ck:
        assert ck.meta[f"{ARCH}.block_count"] == cfg["num_hidden_layers"] + 1
        args = ck.args()
        assert {f"blk.{args.num_hidden_layers}.nextn.{s}" for s in NEXTN} <= set(ck.names())
        assert f"blk.{args.num_hidden_layers}.ffn_gate_exps.weight" in ck
    assert (args.num_hidden_layers, args.num_nextn_predict_layers) == (cfg["num_hidden_layers"], 1)
    rt = hetero_rt.load(mtp, EXACT)
    assert len(rt.model.layers) == cfg["num_hidden_layers"]
    got = rt.logits(IDS)
    base = hetero_rt.load(path, EXACT).logits(IDS)
    assert np.abs(got - base).max() <= 1e-6 * np.abs(base).max()
    # the oracle: the file's own weights dequantized by gguf.quants, run by transformers
    assert rel_err(got, hf_logits(dequantized_reference(model, path, cfg), IDS)) <= 1e-4


def test_planner_does_not_count_the_mtp_block(q8, capsys):
    _, path, cfg, mtp = q8
    n = cfg["num_hidden_layers"]
    meta, base_meta = read_tensor_meta(mtp), read_tensor_meta(path)
    assert any(k.startswith(f"model.layers.{n}.") for k in meta)        # the planner does see the block ...
    with GGUFCheckpoint(mtp) as ck:
        args = ck.args()
    plan = make_plan(args, None, None, False, in_place=True)
    mem, base_mem = (plan_memory(args, plan, m, 256, "float32") for m in (meta, base_meta))
    assert mem.devices["cpu"].weights == base_mem.devices["cpu"].weights   # ... and counts none of it
    assert main(["plan", "--model", str(mtp), "--host-mem", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert main(["plan", "--model", str(path), "--host-mem", "64GiB"]) == 0
    assert out == capsys.readouterr().out and "routed_experts" in out


def _f32(*shape):
    return np.full(shape, 0.5, np.float32), gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("name", ["blk.0.ffn_extra.weight",       # a suffix no layer has
                                  "blk.3.attn_norm.weight",       # a block beyond block_count (3), no nextn key
                                  "blk.1.nextn.eh_proj",          # MTP tensors in a main block
                                  "output_extra.weight"])         # a global no model has
def test_gguf_tensor_the_metadata_does_not_account_for_is_named(tmp_path, name):
    _, path, cfg = make_gguf("v3", tmp_path, "F32")
    bad = rewrite_gguf(path, tmp_path / "extra.gguf", {name: _f32(cfg["hidden_size"])})
    with pytest.raises(CheckpointError, match=rf"extra\.gguf: GGUF has tensors the metadata does not account "
                                              rf"for: {name.replace('.', r'[.]')}"):
        hetero_rt.load(bad, dtype="float32")


def test_gguf_rope_freqs_buffer_is_ignored(tmp_path):
    model, path, cfg = make_gguf("v3", tmp_path, "F32")
    ok = rewrite_gguf(path, tmp_path / "rope.gguf", {"rope_freqs.weight": _f32(cfg["qk_rope_head_dim"] // 2)})
    assert rel_err(hetero_rt.load(ok, dtype="float32").logits(IDS), hf_logits(model, IDS)) <= 1e-4


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    hf = build_hf_model("v3", seed=1)
    return hf, save_hf_model(hf, "v3", tmp_path_factory.mktemp("v3"))


@pytest.mark.parametrize("name", ["model.layers.9.mlp.gate_proj.weight",    # beyond the main and MTP layers
                                  "model.layers.0.mlp.extra_proj.weight",   # a suffix no layer has
                                  "model.extra.weight"])
def test_safetensors_tensor_the_config_does_not_account_for_is_named(v3, tmp_path, name):
    _, src = v3
    tensors = {**load_file(src / "model.safetensors"), name: torch.zeros(4, 4)}
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["num_hidden_layers"] + cfg.get("num_nextn_predict_layers", 0) <= 9   # layer 9 is neither
    ckpt = copy_ckpt(src, tmp_path, tensors)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(ckpt / 'model.safetensors'))}: .*does not account for: "
                                              rf"{re.escape(name)} \(in model\.safetensors\); check that "
                                              rf"{re.escape(str(ckpt / 'config.json'))} belongs to these weights"):
        hetero_rt.load(ckpt, dtype="float32")


def test_safetensors_rotary_buffer_is_ignored(v3, tmp_path):
    hf, src = v3
    tensors = {**load_file(src / "model.safetensors"), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    got = hetero_rt.load(copy_ckpt(src, tmp_path, tensors), dtype="float32").logits(IDS)
    assert rel_err(got, hf_logits(hf, IDS)) <= 1e-4


@pytest.mark.parametrize("preset", ["tiny", pytest.param("demo", marks=pytest.mark.slow)])
def test_cli_demo_builds_once_in_the_cache_dir_and_generates(tmp_path, capsys, monkeypatch, preset):
    """`demo` end to end: the checkpoint built under --cache-dir, the printed text what the library
    generates from it, and a second run reusing the files. "demo" is the real one (527 MB bf16: about
    5 s to build, 50 s for the whole test on 2 cores); "tiny" builds the tiny preset in its place."""
    real = synthetic.synthetic_config
    monkeypatch.setattr(synthetic, "synthetic_config", lambda name="demo", **kw: real(preset, **kw))
    assert main(["demo", "--cache-dir", str(tmp_path), "-n", "4"]) == 0
    out, err = capsys.readouterr()
    built = [p.parent for p in tmp_path.glob("*/config.json")]
    assert len(built) == 1 and f"synthetic checkpoint: {built[0]}" in err and "generated 4 tokens" in err
    assert json.loads((built[0] / "config.json").read_text())["hidden_size"] == real(preset)["hidden_size"]
    files = {p: p.stat().st_mtime_ns for p in built[0].iterdir()}
    assert any(p.suffix == ".safetensors" for p in files)
    text = hetero_rt.load(built[0]).generate(DEMO_PROMPT, max_new_tokens=4).text
    assert text and out == text + "\n"
    assert main(["demo", "--cache-dir", str(tmp_path), "-n", "4"]) == 0
    assert capsys.readouterr().out == out
    assert {p: p.stat().st_mtime_ns for p in built[0].iterdir()} == files
    assert [p.parent for p in tmp_path.glob("*/config.json")] == built
