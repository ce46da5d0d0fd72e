"""The whole model with int8 activations (`activations: int8`, placement_rules/gguf-cpu-only.yaml, the
default for a GGUF on the CPU) against an exact float64 reference of that mode.

The reference is transformers' model holding the GGUF's weights dequantized by gguf.quants
(gguf_models.dequantized_reference), run in float64, with every projection hetero_rt runs on int8
activations (found on the loaded model: stored weights of a ggml block format with act "int8", and
the routed experts) given its input quantized as llama.cpp's q8_0 activations are (written here in
numpy, independently of hetero_rt.kernels.dot.quantize_act): per 32 values d = max|x| / 127,
q = x / d rounded half to even, then q * d multiplied by the dequantized weight in float64. The
routed experts' down projections see SiLU(gate) * up quantized the same way. MLA's per-head kv_b
products, the router, norms and the embedding keep exact activations (as hetero_rt does).

Ties: hetero_rt holds every activation in fp32, the reference in float64, so a value whose x / d lies
at a rounding tie (x.5) may round to the other neighbour in hetero_rt. Where x / d lies within TIE of
the boundary between the two roundings, the reference takes hetero_rt's rounding: for a projection's
input from hetero_rt's own fp32 input (recorded), quantized by this file's quantizer; for the routed
experts' hidden SiLU(g) * u (inside the numba kernel) from hetero_rt's expert output, the rounding whose
one-step change d * W2[:, j] moves the reference's output towards it (the two differ by far more than
fp32 accumulation does). Anywhere else a differing rounding stays a difference, so a wrong quantizer
or kernel still fails. Apart from ties the only differences are fp32 accumulation and the fp32 stages
transformers keeps in a float64 model (RMSNorm, the router's scores, eager attention's softmax).
"""
from pathlib import Path

import numpy as np
import pytest
import torch

import hetero_rt
from gguf_models import KQUANT_DIMS, dequantized_reference, make_gguf, rel_err
from hetero_rt.checkpoint.names import LAYER_NAMES
from hetero_rt.kernels.dot import has_int8_dot
from hetero_rt.kernels.stored import StoredWeight
from hf_models import IDS, hf_logits

RULES = Path(__file__).parent.parent / "placement_rules" / "gguf-cpu-only.yaml"
TIE = 2e-3        # |x / d - boundary| in quantization steps within which hetero_rt's rounding is taken
# max |logits - reference| / max |reference logits| at any of the 16 decode steps. Measured (2-core Xeon,
# 2026-12-01): Q4_K_M 3.0e-7, Q5_0 3.3e-7, Q8_0 3.1e-7, with 1, 1 and 4 roundings taken from hetero_rt at
# ties; without taking them 9.8e-4, 1.8e-2 and 1.5e-2 (one flipped level moves later layers' inputs, and
# their levels, far more than fp32 does). The exact (fp32-activation) reference is 2.0e-2, 1.6e-2 and
# 0.58 away (Q8_0's routes near ties).
BOUND = 1e-6


def q8_levels(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (..., C) float -> (r, d): r = x / d per 32-value block (float64), d = max |x| / 127 per block
    (..., C // 32, 1); q8_0's levels are rint(r)."""
    b = np.asarray(x, np.float64).reshape(*x.shape[:-1], -1, 32)
    d = np.abs(b).max(-1, keepdims=True) / 127.0
    return b / np.where(d > 0, d, 1.0), d


def q8_fp32_levels(x32: np.ndarray) -> np.ndarray:
    """The levels an fp32 x rounds to when d and 1 / d are fp32 and x * (1 / d) is one fp32 product."""
    b = np.asarray(x32, np.float32).reshape(*x32.shape[:-1], -1, 32)
    d = np.abs(b).max(-1, keepdims=True) / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    return np.rint(b * inv).astype(np.float64)


def quantize_following(x: np.ndarray, x_rt: np.ndarray, ties: list) -> np.ndarray:
    """x (T, C) float64 quantized to q8_0 and dequantized, in float64; where its level differs from the one
    hetero_rt's fp32 input x_rt rounds to and x / d lies within TIE of the boundary between the two, the
    latter (appended to ties)."""
    r, d = q8_levels(x)
    q = np.rint(r)
    q_rt = q8_fp32_levels(x_rt)
    differ = q != q_rt
    at_tie = differ & (np.abs(r - (q + q_rt) / 2) < TIE) & (np.abs(q - q_rt) == 1)
    ties.append(int(at_tie.sum()))
    q = np.where(at_tie, q_rt, q)
    return (q * d).reshape(x.shape)


def int8_projections(rt) -> dict[str, StoredWeight]:
    """transformers module name -> hetero_rt's stored weight, for every dense projection that runs with
    int8 activations (a stored ggml block format with act "int8"); kv_b (StoredKvB) stays fp32."""
    ours_to_hf = {v: k for k, v in LAYER_NAMES.items()}
    out = {}
    for name, p in rt.model.named_parameters():
        s = getattr(p, "stored", None)
        if not isinstance(s, StoredWeight) or s.act != "int8" or not has_int8_dot(s.fmt.code) or name == "embed.weight":
            continue
        if name == "head":
            out["lm_head"] = s
            continue
        _, i, suffix = name.split(".", 2)
        out[f"model.layers.{i}.{ours_to_hf[suffix].removesuffix('.weight')}"] = s
    return out


def record(rt, projections):
    """Wrap the stored weights' matmul and the routed experts to record hetero_rt's inputs / outputs."""
    seen = {name: [] for name in projections}
    for name, s in projections.items():
        def matmul(x, _orig=s.matmul, _log=seen[name]):
            _log.append(x.detach().float().reshape(-1, x.shape[-1]).numpy().copy())
            return _orig(x)
        s.matmul = matmul
    experts = {}
    for i, layer in enumerate(rt.model.layers):
        ex = getattr(layer.ffn, "experts", None)
        if ex is None:
            continue
        assert ex.act == "int8" and has_int8_dot(ex.fmt13.code) and has_int8_dot(ex.fmt2.code)
        log = experts[i] = []

        def routed(x, ids, w, _orig=ex.routed, _log=log):
            y = _orig(x, ids, w)
            _log.append(tuple(a.detach().numpy().copy() for a in (x.float(), ids, w.float(), y.float())))
            return y
        ex.routed = routed
    return seen, experts


def expert_weights(ref_layer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ex = ref_layer.mlp.experts
    gate_up = ex.gate_up_proj.detach().double().numpy()          # (E, 2I, D)
    half = gate_up.shape[1] // 2
    return gate_up[:, :half], gate_up[:, half:], ex.down_proj.detach().double().numpy()


def int8_experts_forward(w1, w3, w2, rt_calls, ties):
    """A forward for transformers' experts module: the routed experts on q8_0-quantized inputs in float64,
    with hetero_rt's roundings at ties (see the module docstring)."""
    def forward(hidden, top_k_index, top_k_weights):
        x = hidden.detach().double().numpy()                                      # (T, D)
        x_rt = np.concatenate([c[0] for c in rt_calls])
        ids_rt = np.concatenate([c[1] for c in rt_calls])
        y_rt = np.concatenate([c[3] for c in rt_calls]).astype(np.float64)
        idx = top_k_index.numpy()
        assert (np.sort(idx, 1) == np.sort(ids_rt, 1)).all(), "routing differs from hetero_rt's"
        xq = quantize_following(x, x_rt, ties)
        y = np.zeros_like(x)
        for t in range(x.shape[0]):
            cand = []                                         # (one-step change of y[t], how far from the tie)
            for e, g in zip(idx[t], top_k_weights[t].double().numpy()):
                a, u = w1[e] @ xq[t], w3[e] @ xq[t]
                h = (a / (1 + np.exp(-a)) * u)
                r, d = q8_levels(h[None])
                r, d = r[0], d[0]
                q = np.rint(r)
                y[t] += g * (w2[e] @ (q * d).ravel())
                frac = np.abs(r - np.floor(r) - 0.5)
                for blk, j in zip(*np.nonzero(frac < TIE)):
                    step = np.floor(r[blk, j]) + (1 if q[blk, j] == np.floor(r[blk, j]) else 0) - q[blk, j]
                    cand.append(g * step * d[blk, 0] * w2[e][:, 32 * blk + j])
            resid = y_rt[t] - y[t]
            for c in cand:                                    # take the other rounding where hetero_rt did
                if resid @ c > 0.5 * (c @ c):
                    y[t] += c
                    resid -= c
                    ties.append(1)
        return torch.from_numpy(y)
    return forward


def rms_norm_float64(self, h):
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.mark.parametrize("types", ["Q4_K_M", "Q5_0", "Q8_0"])
def test_int8_decode_equals_its_float64_reference(tmp_path, types, monkeypatch):
    """Token-by-token decode with the default GGUF placement (int8 activations in the routed experts and
    every stored projection) equals the float64 reference of that arithmetic within BOUND of max |logit|
    at every step, and is far from the exact (fp32-activation) reference, so the int8 path ran."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf
    monkeypatch.setattr(hf.DeepseekV3RMSNorm, "forward", rms_norm_float64)
    model, path, cfg = make_gguf("v3", tmp_path, types, **KQUANT_DIMS)
    ref = dequantized_reference(model, path, cfg)
    exact = hf_logits(ref, IDS).numpy()                  # fp32 activations everywhere
    ref = ref.double()

    rt = hetero_rt.load(path, str(RULES))
    projections = int8_projections(rt)
    assert {"lm_head", "model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj",
            "model.layers.1.mlp.shared_experts.down_proj"} <= set(projections)
    seen, experts = record(rt, projections)
    got = np.concatenate([rt.step(torch.tensor([t]), p).numpy() for p, t in enumerate(IDS)]).astype(np.float64)
    assert set(experts) == {1, 2} and all(len(v) == len(IDS) for v in seen.values())

    ties = []
    modules = dict(ref.named_modules())
    for name in projections:
        x_rt = np.concatenate(seen[name])
        modules[name].register_forward_pre_hook(
            lambda m, args, _x=x_rt: (torch.from_numpy(quantize_following(args[0][0].numpy(), _x, ties))[None],))
    for i, calls in experts.items():
        monkeypatch.setattr(modules[f"model.layers.{i}.mlp.experts"], "forward",
                            int8_experts_forward(*expert_weights(modules[f"model.layers.{i}"]), calls, ties))
    with torch.no_grad():
        want = ref(torch.tensor([IDS])).logits[0].numpy()

    err = np.abs(got - want).max(1) / np.abs(want).max()
    print(f"{types}: int8 reference {err.max():.2e} (per step max), exact-activation reference "
          f"{rel_err(got, exact):.2e}, roundings taken from hetero_rt at ties: {sum(ties)}")
    assert err.max() <= BOUND, err
    assert rel_err(got, exact) > 100 * BOUND
