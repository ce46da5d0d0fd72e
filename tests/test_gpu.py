"""The same model on a CUDA device gives the CPU's logits (skipped where no GPU is present)."""
import numpy as np
import pytest
import torch

import hetero_rt
from hf_models import build_hf_model, hf_logits, save_hf_model

IDS = [3, 17, 42, 5, 88, 61, 0, 23]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["v2_lite", "v3_yarn"])
def test_cuda_logits_match_transformers(variant, tmp_path):
    hf = build_hf_model(variant)
    path = save_hf_model(hf, variant, tmp_path)
    rt = hetero_rt.load(path, dtype="float32", device="cuda")
    assert rt.model.embed.weight.device.type == "cuda" and rt.cache.data.device.type == "cuda"
    ref = hf_logits(hf, IDS).numpy()
    # TF32 may be enabled on the GPU: allow a looser bound than the CPU's 1e-4
    assert np.abs(rt.logits(IDS) - ref).max() <= 2e-3 * np.abs(ref).max()
    res = rt.generate(IDS, max_new_tokens=6)
    with torch.no_grad():
        want = hf.generate(torch.tensor([IDS]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(IDS):].tolist()
    assert res.new_ids == want
