"""The default placement (no rules, hetero_rt.placement.defaults): a GGUF on the CPU keeps every weight
as stored (numba experts over the memory map, dense projections format: stored, float32
activations), exactly what placement_rules/gguf-cpu-only.yaml writes out; its logits equal the
dequantized reference; a fresh process's peak RSS stays near the file's size (slow) where the
dequantizing placement's does not; safetensors checkpoints keep the old default."""
from pathlib import Path

import numpy as np
import pytest
import torch

import hetero_rt
from gguf_models import KQUANT_DIMS, dequantized_reference, make_gguf, rel_err
from hetero_rt.api import make_plan
from hetero_rt.bench.rss import rss_growth
from hetero_rt.checkpoint.gguf_write import Lazy, write_gguf
from hetero_rt.checkpoint.names import hf_tensor_shapes
from hetero_rt.checkpoint.source import open_source
from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
from hetero_rt.cli import main as cli_main
from hetero_rt.config import ModelArgs
from hetero_rt.experts import NumbaExperts, TorchExperts
from hf_models import hf_logits

ROOT = Path(__file__).parent.parent
IDS = [3, 17, 42, 5, 88, 61, 0, 23, 9, 77, 31, 12]
FIXTURES = Path(__file__).parent / "fixtures"


def fields(plan):
    return [(p.module.path, p.device, p.dtype, p.format, p.backend, p.threads, p.activations) for p in plan.placements]


@pytest.mark.parametrize("dense_layers", [1, 0])
def test_gguf_default_is_the_shipped_cpu_placement(tmp_path, dense_layers):
    _, path, _ = make_gguf("v3", tmp_path, "Q8_0", first_k_dense_replace=dense_layers, **KQUANT_DIMS)
    args = open_source(path).args()
    default = make_plan(args, None, None, False, in_place=True)
    if dense_layers:    # the shipped file names dense_mlp, which a model without dense layers lacks
        shipped = make_plan(args, ROOT / "placement_rules" / "gguf-cpu-only.yaml", None, False)
        assert fields(default) == fields(shipped)
    kinds = {p.module.kind: p for p in default.placements}
    assert "dense_mlp" in kinds if dense_layers else "dense_mlp" not in kinds
    assert kinds["routed_experts"].backend == "numba" and kinds["attention"].format == "stored"
    assert {p.dtype for p in default.placements} == {"float32"}
    assert make_plan(args, None, None, False, in_place=True, dtype="bf16").main.dtype == "bfloat16"


def test_gguf_default_keeps_weights_as_stored_and_equals_the_dequantized_reference(tmp_path):
    model, path, cfg = make_gguf("v3", tmp_path, "Q4_K_M", **KQUANT_DIMS)
    rt = hetero_rt.load(path)
    assert rt.dtype == torch.float32 and rt.plan.source.startswith("<default")
    experts = rt.model.layers[1].ffn.experts
    assert isinstance(experts, NumbaExperts) and experts.fmt13.name == "q4_k"
    assert rt.model.layers[1].attn.wo.stored is not None and rt.model.layers[0].ffn.w1.stored is not None
    assert experts.act == "int8" and rt.model.layers[1].attn.wo.stored.act == "int8"   # the fast dots
    ref = hf_logits(dequantized_reference(model, path, cfg), IDS)
    assert 1e-6 < rel_err(rt.logits(IDS), ref) <= 2e-2   # int8 dots where an expert has few tokens
    exact = hetero_rt.load(path, FIXTURES / "gguf-cpu-exact.yaml")
    steps = np.concatenate([exact.step(torch.tensor([t]), p).numpy() for p, t in enumerate(IDS)])
    assert rel_err(steps, ref) <= 1e-4                # and so does decode with activations: fp32


def test_exact_fixture_is_the_default_with_fp32_activations():
    shipped = (ROOT / "placement_rules" / "gguf-cpu-only.yaml").read_text()
    body = [ln for ln in shipped.replace("activations: int8", "activations: fp32").splitlines() if not ln.startswith("#")]
    fixture = (FIXTURES / "gguf-cpu-exact.yaml").read_text().splitlines()
    assert [ln for ln in fixture if not ln.startswith("#")] == body


def test_safetensors_default_is_unchanged(tmp_path):
    ckpt = write_synthetic_checkpoint(tmp_path / "ckpt", synthetic_config("tiny"), dtype="float32", tokenizer=False)
    rt = hetero_rt.load(ckpt)
    assert isinstance(rt.model.layers[1].ffn.experts, TorchExperts)
    assert all(p.format is None and p.backend in (None, "torch") for p in rt.plan.placements)


def test_plan_without_rules_shows_the_default(tmp_path, capsys):
    _, path, _ = make_gguf("v3", tmp_path, "Q8_0", **KQUANT_DIMS)
    assert cli_main(["plan", "--model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "<default: on the cpu, weights as stored>" in out
    assert "routed_experts  cpu          dtype=float32 backend=numba" in out
    assert "attention       cpu          dtype=float32 format=stored" in out


def _expert_gguf(path: Path, experts: int, layers: int) -> Path:
    """Q8_0 weights; with 64 experts and 4 layers the experts are about 150 MB of the file, so that
    expanding them to fp32 shows in RSS."""
    cfg = synthetic_config("tiny", hidden_size=512, moe_intermediate_size=512, intermediate_size=512,
                           n_routed_experts=experts, num_experts_per_tok=6, num_hidden_layers=layers,
                           vocab_size=1024, n_group=1, topk_group=1)
    args = ModelArgs.from_dict(cfg)

    def tensor(shape, k):
        return lambda: np.random.default_rng(k).standard_normal(shape, dtype=np.float32) / np.float32(shape[-1] ** 0.5)
    tensors = {name: Lazy(shape, tensor(shape, k)) for k, (name, (_, shape)) in enumerate(hf_tensor_shapes(args).items())}
    return write_gguf(path, cfg, tensors, types="Q8_0")[0]


@pytest.mark.slow
def test_default_placement_does_not_expand_the_experts(tmp_path):
    """Fresh processes: peak RSS above the import baseline grows by at most 1.1x the file's growth from a
    small model of the same formats (which measures the fixed costs: compiled kernels, allocator) to
    a large one with the default placement; the dequantizing placement (the check's own control: the
    experts in bfloat16, the file's dtype default, 1.9x the Q8_0 bytes) grows by more than 2x."""
    small = _expert_gguf(tmp_path / "small.gguf", experts=8, layers=2)
    big = _expert_gguf(tmp_path / "big.gguf", experts=64, layers=4)
    torch_rules = ROOT / "tests" / "fixtures" / "torch-cpu.yaml"

    ratio, report = rss_growth(small, big)
    assert ratio <= 1.1, report
    ratio, report = rss_growth(small, big, torch_rules)
    assert ratio > 2.0, report


@pytest.mark.parametrize("fmt", ["q4_k", "q8_0", "q6_k", "fp32"])
def test_stored_embedding_rows_equal_the_dequantized_rows(fmt):
    from hetero_rt.kernels.stored import StoredWeight
    from hetero_rt.quant.ggml import dequantize, quantize
    w = np.random.default_rng(0).standard_normal((40, 512), dtype=np.float32)
    raw = quantize(w, fmt)
    stored = StoredWeight(raw, fmt, dtype=torch.bfloat16)
    ids = torch.tensor([3, 0, 39, 3, 17])
    rows = stored.rows(ids)
    assert rows.dtype == torch.bfloat16 and rows.shape == (5, 512)
    torch.testing.assert_close(rows, torch.from_numpy(dequantize(raw, fmt))[ids].to(torch.bfloat16), rtol=0, atol=0)
    with pytest.raises(IndexError, match=r"row ids must lie in \[0, 40\), got min 0 max 40"):
        stored.rows(torch.tensor([0, 40]))


def test_stored_weights_of_a_model_share_one_scratch(tmp_path):
    _, path, _ = make_gguf("v3", tmp_path, "Q8_0", **KQUANT_DIMS)
    rt = hetero_rt.load(path)
    stored = [p.stored for p in rt.model.parameters() if getattr(p, "stored", None) is not None]
    assert len(stored) > 5 and len({id(s.scratch) for s in stored}) == 1
    assert rt.model.embed.weight.stored.dtype == torch.float32


def test_plan_says_which_weights_are_dequantized_at_load(tmp_path, capfd):
    """TQ2_0 has no kernel: the default placement dequantizes those weights at load; plan says so, with
    the sizes, as the loader does."""
    _, path, _ = make_gguf("v3", tmp_path, "TQ2_0", **KQUANT_DIMS)
    assert cli_main(["plan", "--model", str(path)]) == 0
    out = capfd.readouterr().out
    notices = [line for line in out.splitlines() if line.startswith("notice:")]
    assert any("routed_experts matrices in TQ2_0" in n and "dequantized at load to float32" in n for n in notices)
    assert any(n.startswith("notice: ") and "attention matrices in TQ2_0" in n for n in notices)
    hetero_rt.load(path)
    assert "TQ2_0" in capfd.readouterr().err
    _, q8, _ = make_gguf("v3", tmp_path / "q8", "Q8_0", **KQUANT_DIMS)
    capfd.readouterr()
    assert cli_main(["plan", "--model", str(q8)]) == 0
    assert "notice:" not in capfd.readouterr().out


def test_set_threads_reaches_every_cpu_kernel(tmp_path):
    _, path, _ = make_gguf("v3", tmp_path, "Q8_0", **KQUANT_DIMS)
    rt = hetero_rt.load(path)
    before = torch.get_num_threads()
    try:
        rt.set_threads(1)
        experts = [m for m in rt.model.modules() if isinstance(m, NumbaExperts)]
        stored = [p.stored for p in rt.model.parameters() if getattr(p, "stored", None) is not None]
        assert experts and stored and {k.threads for k in experts + stored} == {1}
        assert torch.get_num_threads() == 1
        with pytest.raises(hetero_rt.InputError, match="threads must be a positive integer, got 0"):
            rt.set_threads(0)
    finally:
        torch.set_num_threads(before)
