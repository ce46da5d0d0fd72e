"""GGUF checkpoints (architecture deepseek2): logits against transformers (f32 files) and against the
exact reference (quantized files: the same model with every tensor dequantized by gguf.quants, run in
fp32 by transformers), on both routed-expert backends; split files; tokenizer from metadata; errors."""
import json
import shutil

import numpy as np
from pathlib import Path
import pytest

import hetero_rt
from gguf_models import KQUANT_DIMS, dequantized_reference, make_gguf, rel_err
from hetero_rt.checkpoint.gguf import GGUFCheckpoint
from hetero_rt.errors import CheckpointError, ConfigError
from hetero_rt.checkpoint.tokenizer import Tokenizer
from hf_models import hf_logits

IDS = [3, 17, 42, 5, 88, 61, 0, 23, 9, 77, 31, 12, 50, 4, 66, 8]
FIXTURES = Path(__file__).parent / "fixtures"
RULES = Path(__file__).parent.parent / "placement_rules"
# The torch reference, numba experts with the dense part dequantized, and the default placement (no
# rules: numba experts and the dense projections as stored, placement.defaults).
EXACT = FIXTURES / "gguf-cpu-exact.yaml"   # the default placement with fp32 activations
BACKENDS = {"torch": FIXTURES / "torch-cpu.yaml", "numba": str(RULES / "cpu-only.yaml"), "in-place": EXACT}
# YaRN in GGUF keeps one magnitude (yarn_log_multiplier = 0.1 * mscale_all_dim): mscale == mscale_all_dim,
# as in every released DeepSeek-V3/R1 and Kimi-K2 config.
YARN = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                            "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                            "mscale": 0.707, "mscale_all_dim": 0.707}}


@pytest.mark.parametrize("variant,extra", [("v2_lite", {}), ("v2", {}), ("v3", {}), ("v3_tied", {}),
                                           ("v3", YARN)], ids=["v2_lite", "v2", "v3", "v3_tied", "v3_yarn"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_f32_gguf_matches_transformers(tmp_path, variant, extra, backend):
    model, path, _ = make_gguf(variant, tmp_path, "F32", **extra)
    # in place: the default placement itself (F32 has no int8 dot, so it is exact; tied models have no lm_head rule)
    rt = hetero_rt.load(path, None if backend == "in-place" else BACKENDS[backend], dtype="float32")
    assert type(rt.model.layers[1].ffn.experts).__name__ == ("TorchExperts" if backend == "torch" else "NumbaExperts")
    assert (getattr(rt.model.layers[1].attn.wo, "stored", None) is not None) == (backend == "in-place")
    ref = hf_logits(model, IDS)
    assert rel_err(rt.logits(IDS), ref) <= 1e-4
    assert ref.std() > 0.1


def test_old_layout_attn_kv_b_loads(tmp_path):
    model, path, _ = make_gguf("v3", tmp_path, "F32", kv_b="whole")
    with GGUFCheckpoint(path) as ck:
        assert "blk.0.attn_kv_b.weight" in ck and "blk.0.attn_k_b.weight" not in ck
    rt = hetero_rt.load(path, dtype="float32")
    assert getattr(rt.model.layers[0].attn.wkv_b, "stored", None) is None     # whole kv_b: dequantized
    assert rel_err(rt.logits(IDS), hf_logits(model, IDS)) <= 1e-4


@pytest.mark.parametrize("types", ["Q8_0", "Q4_K_M", "Q4_0", "Q5_0", "Q5_K", "Q6_K", "BF16", "F16"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_quantized_gguf_matches_dequantized_reference(tmp_path, types, backend):
    model, path, cfg = make_gguf("v3", tmp_path, types, **KQUANT_DIMS)
    ref_model = dequantized_reference(model, path, cfg)
    ref = hf_logits(ref_model, IDS)
    rt = hetero_rt.load(path, BACKENDS[backend], dtype="float32")
    if backend != "torch":  # experts run in place in their stored format
        with GGUFCheckpoint(path) as ck:
            stored = ck.info("blk.1.ffn_gate_exps.weight").type.lower()
        assert rt.model.layers[1].ffn.experts.fmt13.name == {"bf16": "bf16", "f16": "fp16"}.get(stored, stored)
    assert rel_err(rt.logits(IDS), ref) <= 1e-4
    # the quantization is real: the original fp32 model differs from the reference
    assert rel_err(hf_logits(model, IDS), ref) > 1e-4


def test_q4_k_m_mixes_formats_per_layer(tmp_path):
    _, path, _ = make_gguf("v3", tmp_path, "Q4_K_M", **KQUANT_DIMS)
    rt = hetero_rt.load(path, str(RULES / "cpu-only.yaml"), dtype="float32")
    downs = {rt.model.layers[i].ffn.experts.fmt2.name for i in (1, 2)}
    assert downs == {"q4_k", "q6_k"}


def test_split_gguf_loads_like_one_file(tmp_path):
    model, one, _ = make_gguf("v3", tmp_path / "one", "Q8_0", **KQUANT_DIMS)
    _, first, _ = make_gguf("v3", tmp_path / "split", "Q8_0", split_max_tensors=12, **KQUANT_DIMS)
    parts = sorted(first.parent.glob("model-*-of-*.gguf"))
    assert len(parts) >= 3 and first.name.endswith("-00001-of-%05d.gguf" % len(parts))
    a = hetero_rt.load(one, EXACT, dtype="float32").logits(IDS)
    b = hetero_rt.load(parts[-1], str(RULES / "cpu-only.yaml"), dtype="float32").logits(IDS)  # any part
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    parts[1].unlink()
    with pytest.raises(CheckpointError, match=parts[1].name):
        hetero_rt.load(first)


def test_tokenizer_and_chat_template_from_metadata(tmp_path):
    _, path, _ = make_gguf("v3", tmp_path, "F32", tokenizer=True, vocab_size=512)
    rt = hetero_rt.load(path, dtype="float32")
    ref = Tokenizer.from_dir(tmp_path / "hf")
    texts = ["The quick brown fox, 12345 times!", "  spaces\tand\nnewlines  ", "<｜User｜>hi<｜Assistant｜>",
             "naïve café — ünïcode ✓"]
    for t in texts:
        assert rt.tokenizer.encode(t) == ref.encode(t)
        assert rt.tokenizer.decode(ref.encode(t)) == ref.decode(ref.encode(t))
    msgs = [{"role": "user", "content": "Hello"}]
    assert rt.tokenizer.apply_chat_template(msgs) == ref.apply_chat_template(msgs)
    assert rt.tokenizer.bos_id == ref.bos_id and rt.tokenizer.eos_ids == ref.eos_ids


def test_deepseek_v3_pre_tokenizer(tmp_path):
    """A tokenizer.json with DeepSeek-V3's own pre-tokenizer (regex splits + byte level) round-trips
    through GGUF metadata as tokenizer.ggml.pre = deepseek-v3 and tokenizes identically."""
    from hetero_rt.checkpoint.gguf_tokenizer import PRE_TOKENIZERS
    from hetero_rt.checkpoint.tokenizer_builder import build_tokenizer
    hf = tmp_path / "tok"
    hf.mkdir()
    build_tokenizer(hf, 512)
    tj = json.loads((hf / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
        for r in PRE_TOKENIZERS["deepseek-v3"]] + [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (hf / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    from hetero_rt.checkpoint.gguf_write import write_gguf
    from hf_models import BASE
    cfg = {**BASE, "vocab_size": 512, "q_lora_rank": None}
    write_gguf(tmp_path / "t.gguf", cfg, {}, tokenizer_dir=hf)
    with GGUFCheckpoint(tmp_path / "t.gguf") as ck:
        assert ck.meta["tokenizer.ggml.pre"] == "deepseek-v3"
        ours = Tokenizer.from_gguf(ck.meta, "t.gguf")
    ref = Tokenizer.from_dir(hf)
    for t in ["Numbers 1234567 and punctuation!?... (x+y)", "汉字かなカナ mixed", "a\n\n b   c\r\n"]:
        assert ours.encode(t) == ref.encode(t)


# ---- errors ---------------------------------------------------------------------------------------

def test_truncated_file_is_named(tmp_path):
    _, path, _ = make_gguf("v3", tmp_path, "Q8_0", **KQUANT_DIMS)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])
    with pytest.raises(CheckpointError, match="truncated"):
        hetero_rt.load(path)
    path.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        hetero_rt.load(path)


def test_not_gguf_and_missing_path(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF"):
        hetero_rt.load(bad)
    with pytest.raises(CheckpointError, match="no such file"):
        hetero_rt.load(tmp_path / "missing.gguf")


def test_wrong_architecture(tmp_path):
    import gguf
    w = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture is 'llama'"):
        hetero_rt.load(tmp_path / "llama.gguf")


def test_missing_tensor_is_named(tmp_path):
    _, path, _ = make_gguf("v3", tmp_path, "F32", drop=("model.layers.2.self_attn.o_proj.weight",))
    with pytest.raises(CheckpointError, match="blk.2.attn_output.weight"):
        hetero_rt.load(path)


def test_missing_key_is_named(tmp_path):
    _, path, _ = make_gguf("v3", tmp_path, "F32")
    with GGUFCheckpoint(path) as ck:
        meta = {k: v for k, v in ck.meta.items() if k != "deepseek2.expert_count"}
        names = ck.names()
    from hetero_rt.checkpoint.gguf import metadata_config
    with pytest.raises(ConfigError, match="deepseek2.expert_count"):
        metadata_config(meta, names, str(path))


def test_mismatched_shape_is_named(tmp_path):
    """Metadata that disagrees with the tensors (here: expert width) names the tensor and both shapes."""
    _, path, _ = make_gguf("v3", tmp_path, "F32")
    shutil.copy(path, tmp_path / "copy.gguf")
    from hetero_rt.api import make_plan
    from hetero_rt.checkpoint.gguf_loader import GGUFLoader
    from hetero_rt.placement.apply import load_model
    import dataclasses
    import torch
    with GGUFCheckpoint(tmp_path / "copy.gguf") as ck:
        args = dataclasses.replace(ck.args(), moe_intermediate_size=16)
        with pytest.raises(CheckpointError, match="ffn_(gate|up|down)_exps.*expected"):
            load_model(GGUFLoader(ck, args), args, make_plan(args, None, None, False), torch.float32)


@pytest.mark.parametrize("in_place", [False, True], ids=["dequantized", "stored"])
def test_kv_b_parts_that_do_not_match_the_metadata_are_named(tmp_path, in_place):
    """attn_k_b / attn_v_b against a config whose v_head_dim disagrees: a CheckpointError naming both
    tensors and the expected shapes, whether kv_b is dequantized or kept as stored (StoredKvB)."""
    import dataclasses
    import torch
    from hetero_rt.api import make_plan
    from hetero_rt.checkpoint.gguf_loader import GGUFLoader
    from hetero_rt.placement.apply import load_model
    _, path, _ = make_gguf("v3", tmp_path, "Q8_0", **KQUANT_DIMS)
    with GGUFCheckpoint(path) as ck:
        args = dataclasses.replace(ck.args(), v_head_dim=ck.args().v_head_dim * 2)
        with pytest.raises(CheckpointError, match="attn_k_b.*attn_v_b.*do not make.*wkv_b"):
            load_model(GGUFLoader(ck, args), args, make_plan(args, None, None, False, in_place=in_place), torch.float32)


def test_format_without_kernel_is_dequantized_at_load_and_said(tmp_path, capfd):
    """TQ2_0 experts have no numba kernel: dequantized once at load to the placement dtype, with a notice."""
    model, path, cfg = make_gguf("v3", tmp_path, "TQ2_0", **KQUANT_DIMS)
    ref = hf_logits(dequantized_reference(model, path, cfg), IDS)
    rt = hetero_rt.load(path, str(RULES / "cpu-only.yaml"), dtype="float32")
    assert "TQ2_0" in capfd.readouterr().err
    experts = rt.model.layers[1].ffn.experts
    assert (experts.fmt13.name, experts.fmt2.name) == ("fp32", "fp32")
    assert rel_err(rt.logits(IDS), ref) <= 1e-4


def test_planner_reads_gguf_headers(tmp_path, capsys):
    """`plan` on a GGUF: HF-named shapes (experts per expert, kv_b from k_b + v_b) equal the HF
    checkpoint's; numba experts count at their stored (quantized) size, torch experts dequantized."""
    from hetero_rt.api import make_plan
    from hetero_rt.checkpoint.names import hf_tensor_shapes
    from hetero_rt.cli import main
    from hetero_rt.checkpoint.source import read_tensor_meta
    from hetero_rt.placement.memory import plan_memory
    _, path, _ = make_gguf("v3", tmp_path, "Q4_K_M", **KQUANT_DIMS)
    with GGUFCheckpoint(path) as ck:
        args = ck.args()
        stored = sum(ck.info(n).nbytes for n in ck.names() if n.endswith("_exps.weight"))
    meta = read_tensor_meta(path, args)
    assert {n: s for n, (_, s) in meta.items()} == {n: s for n, (_, s) in hf_tensor_shapes(args).items()}
    numba = plan_memory(args, make_plan(args, str(RULES / "cpu-only.yaml"), None, False), meta, 256, "float32")
    assert numba.devices["cpu"].weights["routed_experts"] == stored
    torch_plan = plan_memory(args, make_plan(args, None, None, False), meta, 256, "float32")
    n_expert_params = sum(np.prod(s) for n, (_, s) in meta.items() if ".mlp.experts." in n)
    assert torch_plan.devices["cpu"].weights["routed_experts"] == 4 * n_expert_params
    assert main(["plan", "--model", str(path), "--rules", str(RULES / "cpu-only.yaml")]) == 0
    assert "routed_experts" in capsys.readouterr().out


@pytest.mark.parametrize("types", ["Q4_K_M", "Q5_0", "F16"])
def test_stored_format_dense_weights_match_reference(tmp_path, types):
    """format: stored keeps attention, shared experts, dense FFN and lm_head in the file's ggml types,
    multiplied in place (gemv for decode, blocked decode + GEMM for prefill): same logits."""
    import torch
    model, path, cfg = make_gguf("v3", tmp_path, types, **KQUANT_DIMS)
    ref = hf_logits(dequantized_reference(model, path, cfg), IDS).numpy()
    rt = hetero_rt.load(path, EXACT)
    assert hasattr(rt.model.layers[1].attn.wo, "stored") and hasattr(rt.model.head, "stored")
    assert rt.model.layers[1].attn.wo.dtype == torch.uint8                     # no dequantized copy
    kv_b = rt.model.layers[1].attn.wkv_b                                        # attn_k_b / attn_v_b as stored
    assert kv_b.dtype == torch.uint8 and hasattr(kv_b.stored, "absorb")
    assert rel_err(rt.logits(IDS), ref) <= 1e-4
    steps = [rt.step(torch.tensor(IDS[:5]), 0).numpy()]
    steps += [rt.step(torch.tensor([t]), p).numpy() for p, t in enumerate(IDS[5:], start=5)]
    assert rel_err(np.concatenate(steps), ref) <= 1e-4


@pytest.mark.parametrize("types", ["Q4_K_M", "Q5_0", "Q8_0"])
def test_int8_activations_on_a_gguf(tmp_path, types):
    """The default placement's `activations: int8` (routed experts and every stored projection) on
    a GGUF whose experts mix formats: token-by-token decode (the int8 dots) stays finite, picks the
    reference's top token, and stays close to the dequantized reference's logits. Measured on this
    tiny random model (every position's top-1 equal): Q4_K_M max |diff| / max |logit| 1.8e-2
    (cosine 0.9998), Q5_0 1.9e-2 (0.9998), Q8_0 0.58 (cosine 0.74: its reference routes near ties;
    int8 in the experts alone gives 0.12, in attention alone 0.12, each within the per-dot bound of
    tests/test_kernels_ggml.py; the routing flips where both apply). Bounds: top-1 >= 0.9 and, but
    for Q8_0, cosine >= 0.99 and relative error <= 0.05 (a wrong kernel gives NaN or an unrelated row)."""
    import torch
    model, path, cfg = make_gguf("v3", tmp_path, types, **KQUANT_DIMS)
    ref = hf_logits(dequantized_reference(model, path, cfg), IDS).numpy()
    rt = hetero_rt.load(path, str(RULES / "gguf-cpu-only.yaml"))
    assert rt.model.layers[1].ffn.experts.act == "int8" and rt.model.layers[1].attn.wo.stored.act == "int8"
    steps = [rt.step(torch.tensor([t]), p).numpy() for p, t in enumerate(IDS)]
    got = np.concatenate(steps)
    assert np.isfinite(got).all() and (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    if types != "Q8_0":
        assert cos.min() >= 0.99 and 1e-6 < rel_err(got, ref) <= 0.05


def test_stored_format_errors(tmp_path):
    from hetero_rt.placement.schema import PlacementError, parse_rules
    with pytest.raises(PlacementError, match="available for attention.*not gate"):
        parse_rules("rules:\n  - match: {kind: gate}\n    place: {format: stored}\n", "r.yaml")
    from hetero_rt.api import make_plan
    _, path, _ = make_gguf("v3", tmp_path, "F32")
    rules = tmp_path / "gpu.yaml"
    rules.write_text("defaults: {device: cuda}\nrules:\n  - match: {kind: attention}\n    place: {format: stored}\n")
    with GGUFCheckpoint(path) as ck:
        args = ck.args()
    with pytest.raises(PlacementError, match="on the CPU"):
        make_plan(args, rules, None, False, check_devices=False)
    hf_dir = tmp_path / "hf"  # on safetensors, stored == dtype: the same logits as the default
    a = hetero_rt.load(hf_dir, str(RULES / "gguf-cpu-only.yaml")).logits(IDS)
    b = hetero_rt.load(hf_dir, str(RULES / "cpu-only.yaml"), dtype="float32").logits(IDS)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("hetero", ["{cache: 3}", "{cache: 8, prefetch: false}"])
def test_hetero_backend_over_quantized_gguf_experts(tmp_path, hetero):
    """The scheduler wraps the GGUF experts left in the memory map; cached experts (dequantized for the
    "GPU", here the CPU under cpu_fallback) and CPU experts together give the reference logits."""
    import torch
    model, path, cfg = make_gguf("v3", tmp_path, "Q4_K_M", **KQUANT_DIMS)
    ref = hf_logits(dequantized_reference(model, path, cfg), IDS).numpy()
    rules = tmp_path / "hetero.yaml"
    rules.write_text("defaults: {device: cuda, dtype: float32}\nrules:\n  - match: {kind: routed_experts}\n"
                     f"    place: {{device: cpu, backend: hetero, hetero: {hetero}}}\n")
    rt = hetero_rt.load(path, rules, cpu_fallback=True, context=64)
    assert rel_err(rt.logits(IDS), ref) <= 1e-4
    steps = [rt.step(torch.tensor(IDS[:5]), 0).numpy()]
    steps += [rt.step(torch.tensor([t]), p).numpy() for p, t in enumerate(IDS[5:], start=5)]
    assert rel_err(np.concatenate(steps), ref) <= 1e-4


def test_split_parts_out_of_order_are_named(tmp_path):
    _, first, _ = make_gguf("v3", tmp_path, "F32", split_max_tensors=12)
    parts = sorted(first.parent.glob("model-*-of-*.gguf"))
    a, b = parts[1], parts[2]
    tmp = a.with_suffix(".tmp")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    with pytest.raises(CheckpointError, match="split.no=2 .* but its name says part 2"):
        hetero_rt.load(first)


@pytest.mark.parametrize("key,value,needle", [
    ("deepseek2.expert_gating_func", 3, "expected 1 \\(softmax\\) or 2 \\(sigmoid\\)"),
    ("deepseek2.rope.scaling.type", "longrope", "DeepSeek models use 'yarn'"),
    ("deepseek2.attention.key_length", 999, "expected kv_lora_rank \\+ rope dims"),
])
def test_bad_metadata_values_are_named(tmp_path, key, value, needle):
    from hetero_rt.checkpoint.gguf import metadata_config
    _, path, _ = make_gguf("v3", tmp_path, "F32")
    with GGUFCheckpoint(path) as ck:
        meta, names = {**ck.meta, key: value}, ck.names()
    with pytest.raises(ConfigError, match=needle):
        metadata_config(meta, names, str(path))


def test_cli_runs_a_gguf(tmp_path, capsys):
    from hetero_rt.cli import main
    _, path, _ = make_gguf("v3", tmp_path, "Q8_0", tokenizer=True, **KQUANT_DIMS)
    assert main(["run", "--model", str(path), "--rules", str(RULES / "gguf-cpu-only.yaml"),
                 "--prompt", "The quick brown fox", "-n", "4", "--chat"]) == 0
    out = capsys.readouterr()
    want = hetero_rt.load(path, RULES / "gguf-cpu-only.yaml").generate("The quick brown fox", max_new_tokens=4,
                                                                     chat=True)
    assert out.out == want.text + "\n" and len(want.new_ids) == 4 and "decode" in out.err
