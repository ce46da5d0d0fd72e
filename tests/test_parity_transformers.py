"""Logits parity with transformers' DeepseekV2/V3ForCausalLM on tiny random models loaded from disk."""
import json

import numpy as np
import pytest
import torch

import hetero_rt
from hf_models import IDS, VARIANTS, build_hf_model, hf_logits, rel_err, save_hf_model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    variant = request.param
    model = build_hf_model(variant)
    path = save_hf_model(model, variant, tmp_path_factory.mktemp(variant))
    return variant, model, hetero_rt.load(path, dtype="float32")


def test_logits_match_transformers(pair):
    variant, hf, rt = pair
    ref = hf_logits(hf, IDS)
    ours = rt.logits(IDS)
    assert ours.shape == (len(IDS), hf.config.vocab_size)
    assert rel_err(ours, ref) <= 1e-4, variant


def test_routing_is_not_degenerate(pair):
    """The oracle comparison only means something if the logits vary and routing varies."""
    _, hf, rt = pair
    logits = rt.logits(IDS)
    assert logits.std() > 0.1
    assert len(set(logits.argmax(-1).tolist())) > 2


def test_absorbed_equals_naive(pair):
    _, _, rt = pair
    naive = rt.logits(IDS, absorbed=False)
    absorbed = rt.logits(IDS, absorbed=True)
    assert np.abs(naive - absorbed).max() <= 1e-4 * np.abs(naive).max()


def test_decode_with_cache_matches_full_forward(pair):
    _, hf, rt = pair
    ref = hf_logits(hf, IDS).numpy()
    prefill = 5
    got = [rt.step(torch.tensor(IDS[:prefill]), 0).numpy()]
    for pos in range(prefill, len(IDS)):
        got.append(rt.step(torch.tensor([IDS[pos]]), pos).numpy())
    got = np.concatenate(got)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_kimi_k2_model_type(tmp_path):
    """Kimi-K2 ships the DeepSeek-V3 architecture under model_type kimi_k2."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: F401
    variant = "v3"
    hf = build_hf_model(variant)
    path = save_hf_model(hf, variant, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "kimi_k2"
    (path / "config.json").write_text(json.dumps(cfg))
    rt = hetero_rt.load(path, dtype="float32")
    assert rt.args.model_type == "kimi_k2"
    assert rel_err(rt.logits(IDS), hf_logits(hf, IDS)) <= 1e-4


def test_chunked_prefill_matches_full_forward(pair):
    _, hf, rt = pair
    ref = hf_logits(hf, IDS).numpy()
    rt.prefill_chunk = 3
    try:
        got = rt.logits(IDS)
    finally:
        rt.prefill_chunk = 512
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("variant", ["v2_lite", "v3"])
def test_rms_norm_eps_away_from_its_default_is_applied(variant, tmp_path):
    """eps 0.5 (vs 1e-6) changes every norm of these small-activation layers: hetero_rt must read it."""
    hf = build_hf_model(variant, rms_norm_eps=0.5)
    rt = hetero_rt.load(save_hf_model(hf, variant, tmp_path), dtype="float32")
    assert rt.args.rms_norm_eps == 0.5
    ref = hf_logits(hf, IDS)
    assert rel_err(rt.logits(IDS), ref) <= 1e-4
    assert rel_err(hf_logits(build_hf_model(variant), IDS).numpy(), ref) > 1e-2   # eps matters here
