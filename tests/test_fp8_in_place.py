"""Block FP8 checkpoints (the official DeepSeek-V3/R1 and Kimi-K2 layout: `weight` F8_E4M3 with a
128x128 `weight_scale_inv`) run in place on the CPU by default: the routed experts stay FP8 in the
numba kernels' rows and the dense weights stay FP8 as stored-format weights, never expanded. The
oracle is the same model with every FP8 weight dequantized (fp8 * scale, fp32) by the test itself."""
from pathlib import Path

import numpy as np
import pytest
import torch

import hetero_rt
from hetero_rt.checkpoint.source import open_source
from hetero_rt.experts.numba_backend import NumbaExperts
from hetero_rt.quant import fp8, ggml
from fp8_models import fp8_checkpoints, fp8_dequantize, fp8_quantize
from hf_models import build_hf_model, save_hf_model

IDS = [5, 9, 33, 2, 71, 40, 18, 90]

# every matrix's input dimension a multiple of 128, as in the released checkpoints
DIMS = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, q_lora_rank=128, kv_lora_rank=128,
            num_attention_heads=4, v_head_dim=32, vocab_size=96)


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """(FP8 checkpoint dir, the same weights dequantized, as a second dir)."""
    tmp = tmp_path_factory.mktemp("fp8")
    return fp8_checkpoints(save_hf_model(build_hf_model("v3", seed=3, **DIMS), "v3", tmp / "src"), tmp)


def test_pack_round_trips_the_official_layout():
    """quant.fp8.pack's rows decode (gguf-independent unpack, and the kernels' tile decoder) to exactly
    fp8 * scale_inv, including rows in a partial last 128-row block."""
    from hetero_rt.kernels.dequant import decode_tile
    w = torch.randn(200, 384) * 0.05
    q, s = fp8_quantize(w)
    raw = fp8.pack(q, s)
    assert raw.shape == (200, 3 * 132)
    want = fp8_dequantize(q, s).numpy()
    np.testing.assert_array_equal(fp8.unpack(raw).numpy(), want)
    out = np.empty((200, 256), np.float32)
    decode_tile(ggml.FP8, raw, 0, 200, 128, 256, out)
    np.testing.assert_array_equal(out, want[:, 128:])
    with pytest.raises(ValueError, match="whole 128-value blocks"):
        fp8.pack(q[:, :200], s[:, :2])


def test_fp8_checkpoint_runs_in_place_by_default(fp8_pair, capfd):
    fp8_dir, deq_dir = fp8_pair
    assert open_source(fp8_dir).in_place and not open_source(deq_dir).in_place
    capfd.readouterr()
    rt = hetero_rt.load(fp8_dir)
    notices = capfd.readouterr().err
    assert "dequantized" not in notices and "not read as stored" not in notices, notices
    experts = [m for m in rt.model.modules() if isinstance(m, NumbaExperts)]
    assert experts and {(e.fmt13.name, e.fmt2.name) for e in experts} == {("float8_e4m3", "float8_e4m3")}
    stored = {n: p.stored.fmt.name for n, p in rt.model.named_parameters() if getattr(p, "stored", None) is not None}
    assert stored["layers.0.attn.wq_b"] == "float8_e4m3" and stored["layers.1.ffn.shared_experts.w2"] == "float8_e4m3"
    assert not any(p.dtype == torch.float8_e4m3fn for p in rt.model.parameters())
    ref = hetero_rt.load(deq_dir, dtype="float32").logits(IDS)     # torch, dequantized weights
    got = rt.logits(IDS)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_fp8_experts_are_planned_and_held_at_stored_size(fp8_pair):
    """The planner counts FP8 experts as the kernels hold them (132 bytes per 128 values), the loader
    holds exactly that, and both are about the checkpoint's own FP8 bytes."""
    from hetero_rt.api import make_plan
    from hetero_rt.placement.memory import plan_memory
    fp8_dir, _ = fp8_pair
    source = open_source(fp8_dir)
    args, meta = source.args(), source.tensor_meta()
    plan = make_plan(args, None, None, False, in_place=True)
    planned = plan_memory(args, plan, meta, 64, "float32").devices["cpu"].weights["routed_experts"]
    stored = sum(np.prod(shape) for n, (d, shape) in meta.items() if ".mlp.experts." in n and d == "F8_E4M3")
    assert planned == stored * 132 // 128
    rt = hetero_rt.load(fp8_dir)
    held = sum(e.weight_bytes(e.n_experts) for e in rt.model.modules() if isinstance(e, NumbaExperts))
    assert held == planned


@pytest.mark.slow
def test_fp8_default_placement_does_not_expand_the_experts(tmp_path):
    """Fresh processes: peak RSS above the import baseline grows by at most 1.1x the checkpoint's growth
    from a small FP8 model to a large one (the fixed costs cancel) with the default placement; the
    torch placement in float32 (the check's control: experts dequantized, 4x the FP8 bytes) grows by
    more than 2x."""
    from hetero_rt.bench.rss import rss_growth
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    small = write_synthetic_checkpoint(tmp_path / "small", synthetic_config("demo", num_hidden_layers=2,
                                       n_routed_experts=16), dtype="fp8", tokenizer=False)
    big = write_synthetic_checkpoint(tmp_path / "big", synthetic_config("demo", num_hidden_layers=4), dtype="fp8",
                                     tokenizer=False)
    torch_rules = tmp_path / "torch-fp32.yaml"
    torch_rules.write_text((Path(__file__).parent / "fixtures" / "torch-cpu.yaml").read_text().replace(
        "  device: cpu\n", "  device: cpu\n  dtype: float32\n"))

    ratio, report = rss_growth(small, big)
    assert ratio <= 1.1, report
    ratio, report = rss_growth(small, big, torch_rules)
    assert ratio > 2.0, report
