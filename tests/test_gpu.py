"""The same model on a CUDA device gives transformers' logits and the CPU's tokens (skipped where
no GPU is present)."""
import numpy as np
import pytest
import torch

import hetero_rt
from hf_models import build_hf_model, hf_logits, save_hf_model

IDS = [3, 17, 42, 5, 88, 61, 0, 23]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["v2_lite", "v3_yarn"])
def test_cuda_matches_transformers_and_cpu(variant, tmp_path):
    hf = build_hf_model(variant)
    path = save_hf_model(hf, variant, tmp_path)
    gpu = hetero_rt.load(path, dtype="float32", device="cuda")
    assert gpu.model.embed.weight.device.type == "cuda" and gpu.cache.data.device.type == "cuda"
    ref = hf_logits(hf, IDS).numpy()
    assert np.abs(gpu.logits(IDS) - ref).max() <= 1e-4 * np.abs(ref).max()
    # decode with the cache on the GPU, against the full forward
    steps = [gpu.step(torch.tensor(IDS[:3]), 0).numpy()] + \
            [gpu.step(torch.tensor([t]), i).numpy() for i, t in enumerate(IDS[3:], start=3)]
    assert np.abs(np.concatenate(steps) - ref).max() <= 1e-4 * np.abs(ref).max()
    cpu = hetero_rt.load(path, dtype="float32")
    assert gpu.generate(IDS, max_new_tokens=8).new_ids == cpu.generate(IDS, max_new_tokens=8).new_ids


@pytest.mark.gpu
def test_cuda_placement_with_cpu_experts_and_fp8_weights(tmp_path):
    """Dense part on the GPU (attention and shared experts kept in block FP8), routed experts on the
    CPU: the logits of the same FP8 checkpoint run entirely on the CPU."""
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    cfg = synthetic_config("tiny", hidden_size=256, moe_intermediate_size=160, intermediate_size=384)
    ckpt = write_synthetic_checkpoint(tmp_path / "fp8", cfg, seed=4, dtype="fp8")
    rules = tmp_path / "r.yaml"
    rules.write_text("defaults: {device: cuda}\nrules:\n  - match: {kind: routed_experts}\n"
                     "    place: {device: cpu}\n  - match: {kind: attention}\n    place: {format: float8_e4m3}\n"
                     "  - match: {kind: shared_experts}\n    place: {format: float8_e4m3}\n")
    rt = hetero_rt.load(ckpt, rules, dtype="float32")
    assert rt.model.layers[1].attn.wq_b.device.type == "cuda"
    assert rt.model.layers[1].attn.wq_b.dtype == torch.float8_e4m3fn
    assert rt.model.layers[1].ffn.experts.w1.device.type == "cpu"
    ref = hetero_rt.load(ckpt, dtype="float32").logits(IDS)
    assert np.abs(rt.logits(IDS) - ref).max() <= 1e-4 * np.abs(ref).max()
    cpu = hetero_rt.load(ckpt, dtype="float32")
    assert rt.generate(IDS, max_new_tokens=8).new_ids == cpu.generate(IDS, max_new_tokens=8).new_ids
