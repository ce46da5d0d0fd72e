"""Oracle tests written to kill the surviving mutants of the routing and attention math
(scripts/mutation_test.py; docs/reliability.md, "Mutation testing of the routing and attention math").
Each compares with transformers' modules or a float64 formula of DeepSeek's definitions, in the
configurations the five transformers parity models (tests/test_parity_transformers.py) do not reach."""
import math

import pytest
import torch

from hetero_rt.checkpoint.synthetic import synthetic_config
from hetero_rt.config import ModelArgs
from hetero_rt.model.moe import Gate

T, D, E = 16, 24, 16


def gate_args(**overrides) -> ModelArgs:
    cfg = synthetic_config("tiny", hidden_size=D, n_routed_experts=E, **overrides)
    return ModelArgs.from_dict(cfg, source="test_math_mutants")


def oracle_route(x, w, bias, a: ModelArgs):
    """DeepSeek-V2/V3 routing in float64: -> {token: {expert: weight}}."""
    logits = x.double() @ w.double().T                                   # (T, E)
    scores = logits.softmax(-1) if a.scoring_func == "softmax" else logits.sigmoid()
    choice = scores + bias.double() if bias is not None else scores.clone()
    if a.topk_method != "greedy" and a.n_group > 1:
        grouped = choice.view(len(x), a.n_group, -1)                      # (T, G, E/G)
        if a.topk_method == "noaux_tc":                                  # V3: sum of each group's top 2
            group_scores = grouped.sort(-1, descending=True).values[..., :2].sum(-1)
        else:                                                            # V2: each group's best expert
            group_scores = grouped.max(-1).values
        for t in range(len(x)):
            best = group_scores[t].argsort(descending=True)[:a.topk_group].tolist()
            for g in range(a.n_group):
                if g not in best:
                    grouped[t, g] = -math.inf
        choice = grouped.view(len(x), -1)
    out = []
    for t in range(len(x)):
        ids = choice[t].argsort(descending=True)[:a.num_experts_per_tok].tolist()
        wts = scores[t, ids]
        if a.norm_topk_prob:
            wts = wts / wts.sum()
        out.append(dict(zip(ids, (wts * a.routed_scaling_factor).tolist())))
    return out


GATES = {   # name -> config overrides; each reaches a branch the five parity models do not
    "greedy-in-groups": dict(scoring_func="softmax", topk_method="greedy", n_group=4, topk_group=1,
                             norm_topk_prob=False, routed_scaling_factor=1.0, num_experts_per_tok=4),
    "group-limited-1-of-4": dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4,
                                 topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
                                 num_experts_per_tok=3),
    "noaux-sigmoid-3-of-8": dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=3,
                                 norm_topk_prob=True, routed_scaling_factor=2.5, num_experts_per_tok=4),
    "noaux-unnormalised": dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1,
                               norm_topk_prob=False, routed_scaling_factor=0.5, num_experts_per_tok=2),
    "noaux-softmax": dict(scoring_func="softmax", topk_method="noaux_tc", n_group=4, topk_group=2,
                          norm_topk_prob=True, routed_scaling_factor=1.0, num_experts_per_tok=3),
}


@pytest.mark.parametrize("name", sorted(GATES))
def test_gate_equals_the_float64_routing_formula(name):
    a = gate_args(**GATES[name])
    g = torch.Generator().manual_seed(1)
    gate = Gate(a)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(E, D, generator=g) / math.sqrt(D) * 3)
        if gate.bias is not None:
            gate.bias.copy_(0.5 * torch.randn(E, generator=g))
    x = torch.randn(T, D, generator=g)
    weights, ids = gate(x)
    assert weights.dtype == torch.float32 and ids.shape == (T, a.num_experts_per_tok)
    want = oracle_route(x, gate.weight.detach(), gate.bias, a)
    for t in range(T):
        got = dict(zip(ids[t].tolist(), weights[t].tolist()))
        assert got.keys() == want[t].keys(), (name, t)
        for e, w in want[t].items():
            assert got[e] == pytest.approx(w, rel=1e-5), (name, t, e)


def oracle_rope(x, pos, R, base, interleave):
    """RoPE in float64: pair j of frequency base^(-2j/R) rotated by pos*freq; pairs (2j, 2j+1) when
    interleaved (DeepSeek's reference), (j, j+R/2) in the rotate-half layout. x (T, H, R), pos (T,)."""
    out = torch.empty(x.shape, dtype=torch.float64)
    xd = x.double()
    for j in range(R // 2):
        angle = pos.double() * base ** (-2 * j / R)                      # (T,)
        c, s = angle.cos()[:, None], angle.sin()[:, None]
        i0, i1 = (2 * j, 2 * j + 1) if interleave else (j, j + R // 2)
        out[..., i0] = xd[..., i0] * c - xd[..., i1] * s
        out[..., i1] = xd[..., i1] * c + xd[..., i0] * s
    return out


@pytest.mark.parametrize("interleave", [True, False], ids=["interleaved", "rotate-half"])
def test_rope_equals_the_float64_rotation(interleave):
    from hetero_rt.model.mla import Rope
    a = gate_args(rope_interleave=interleave)
    R = a.qk_rope_head_dim
    rope = Rope(a, 64)
    x = torch.randn(5, 3, R, generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([0, 7, 8, 30, 63])
    want = oracle_rope(x, pos, R, a.rope_theta, interleave)
    torch.testing.assert_close(rope.apply(x, pos).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rope.apply(x[:, 0], pos).double(), want[:, 0], rtol=1e-5, atol=1e-5)   # (T, R)
    # an int is the start of consecutive positions
    torch.testing.assert_close(rope.apply(x, 9).double(), oracle_rope(x, torch.arange(9, 14), R, a.rope_theta,
                                                                       interleave), rtol=1e-5, atol=1e-5)


def test_rotate_half_layout_matches_transformers(tmp_path):
    """rope_interleave=false (a DeepSeek-V3 config key) against transformers, which the parity models,
    all interleaved, never reach."""
    from hf_models import IDS, build_hf_model, hf_logits, rel_err, save_hf_model

    import hetero_rt
    hf = build_hf_model("v3", rope_interleave=False)
    rt = hetero_rt.load(save_hf_model(hf, "v3", tmp_path), dtype="float32")
    assert rt.args.rope_interleave is False
    ref = hf_logits(hf, IDS)
    assert rel_err(rt.logits(IDS), ref) <= 1e-4
    assert rel_err(hf_logits(build_hf_model("v3"), IDS).numpy(), ref) > 1e-2   # the layout matters here


def oracle_yarn(R, base, y):
    """DeepSeek-V3's precompute_freqs_cis (inference/model.py) in float64, plus the cos/sin magnitude
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) (transformers; 0.1 m ln s + 1)."""
    def corr(rot):
        return R * math.log(y.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(math.floor(corr(y.beta_fast)), 0), min(math.ceil(corr(y.beta_slow)), R - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(R // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    freqs = 1.0 / base ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    smooth = 1 - ramp
    freqs = freqs / y.factor * (1 - smooth) + freqs * smooth

    def m(scale, k=1.0):
        return 0.1 * k * math.log(scale) + 1.0 if scale > 1 else 1.0
    mag = m(y.factor, y.mscale) / m(y.factor, y.mscale_all_dim) if y.mscale_all_dim else m(y.factor)
    return freqs, mag


YARNS = {   # name -> (R, rope_theta, YarnScaling kwargs)
    "deepseek-v3": (64, 10000.0, dict(factor=40, original_max_position_embeddings=4096, mscale=1.0,
                                      mscale_all_dim=1.0)),
    "deepseek-v2": (64, 10000.0, dict(factor=40, original_max_position_embeddings=4096, mscale=0.707,
                                      mscale_all_dim=0.707)),
    "mscale-only": (64, 50000.0, dict(factor=4, original_max_position_embeddings=1024, beta_fast=16, beta_slow=2)),
    "mscale-ratio": (32, 10000.0, dict(factor=8, original_max_position_embeddings=2048, mscale=1.0,
                                       mscale_all_dim=0.5)),
    # a small base: the slow correction dim passes R-1 and is clamped there, while the fast one is below R/2
    "high-clamped": (32, 23.0, dict(factor=8, original_max_position_embeddings=4096, beta_fast=64, beta_slow=1)),
}


@pytest.mark.parametrize("name", sorted(YARNS))
def test_yarn_frequencies_equal_deepseeks_formula(name):
    from types import SimpleNamespace

    from hetero_rt.config import YarnScaling
    from hetero_rt.model.mla import rope_inv_freq
    R, base, kw = YARNS[name]
    y = YarnScaling(**kw)
    inv_freq, factor = rope_inv_freq(SimpleNamespace(qk_rope_head_dim=R, rope_theta=base, rope_scaling=y))
    want, mag = oracle_yarn(R, base, y)
    torch.testing.assert_close(inv_freq.double(), want, rtol=1e-6, atol=0)
    assert factor == pytest.approx(mag, rel=1e-9)


@pytest.mark.parametrize("chunk", [2, 4])
def test_two_token_chunks_are_causally_masked(chunk, tmp_path):
    """Prefill in chunks of 2 (and 4) tokens against transformers: a segment of two new tokens needs
    the causal mask as much as a long one (the parity tests' segments have 16, 5, 3 or 1 tokens)."""
    from hf_models import IDS, build_hf_model, hf_logits, rel_err, save_hf_model

    import hetero_rt
    hf = build_hf_model("v2_lite")
    rt = hetero_rt.load(save_hf_model(hf, "v2_lite", tmp_path), dtype="float32")
    rt.prefill_chunk = chunk
    assert rel_err(rt.logits(IDS), hf_logits(hf, IDS)) <= 1e-4


def test_latent_norms_equal_transformers_on_small_activations():
    """q_a / kv_a norms against transformers' layers on activations of mean square ~1e-6, where the
    eps (1e-6 there, whatever rms_norm_eps says) is half the denominator and so must match exactly."""
    from hf_models import BASE
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    from hetero_rt.model.mla import MLA
    hf = DeepseekV3Attention(DeepseekV3Config(**{**BASE, "q_lora_rank": 48, "rms_norm_eps": 0.5}), layer_idx=0)
    mla = MLA(gate_args(q_lora_rank=48, kv_lora_rank=BASE["kv_lora_rank"], rms_norm_eps=0.5))
    g = torch.Generator().manual_seed(3)
    C = BASE["kv_lora_rank"]
    for ours, theirs, dim in ((mla.q_norm, hf.q_a_layernorm, 48), (mla.kv_norm, hf.kv_a_layernorm, C)):
        x = 1e-3 * torch.randn(4, dim, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=0)
