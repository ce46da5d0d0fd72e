"""The numba routed-experts backend against the torch reference (TorchExperts) run in fp32 on the
dequantized stored weights (gguf.quants.dequantize for the block formats): parametrized shapes,
formats, top-k and token counts; duplicate and unused experts; bad input; whole-model logits.

Tolerance: fp32 accumulation in a different order than torch: atol = rtol = 1e-4 on outputs of
magnitude ~1 (observed max differences ~1e-6)."""
import numpy as np
import pytest
import torch

import hetero_rt
from hetero_rt.experts.numba_backend import NumbaExperts
from hetero_rt.experts.torch_backend import TorchExperts
from hetero_rt.quant import ggml
from hetero_models import dequantized_reference

FORMATS = sorted(ggml.FORMATS)
TOL = dict(atol=1e-4, rtol=1e-4)


def torch_experts(n_experts, dim, inter, seed=0):
    g = torch.Generator().manual_seed(seed)
    te = TorchExperts(n_experts, dim, inter)
    with torch.no_grad():
        for p in (te.w1, te.w3, te.w2):
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return te


def routing(tokens, k, n_experts, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(tokens)])
    return ids, torch.rand(tokens, k, generator=g)


_CACHE = {}


def backend(fmt, n_experts, dim, inter):
    key = (fmt, n_experts, dim, inter)
    if key not in _CACHE:
        ne = NumbaExperts.from_torch(torch_experts(n_experts, dim, inter), fmt=fmt)
        _CACHE[key] = ne, dequantized_reference(ne)
    return _CACHE[key]


def check(ne, ref, x, ids, w):
    torch.testing.assert_close(ne(x, ids, w), ref(x, ids, w), **TOL)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 2, 7, 64, 300])
def test_parity_formats_tokens(fmt, tokens):
    ne, ref = backend(fmt, 16, 512, 256)                     # K-quant rows multiple of 256
    ids, w = routing(tokens, 6, 16, seed=tokens)
    check(ne, ref, torch.randn(tokens, 512), ids, w)


@pytest.mark.parametrize("fmt,shape,k", [
    ("fp32", (4, 50, 36), 1), ("bf16", (4, 50, 36), 4), ("fp16", (5, 70, 19), 2),
    ("q8_0", (6, 96, 64), 3), ("q4_0", (6, 64, 160), 2), ("q5_0", (4, 96, 64), 3),
    ("q4_k", (8, 256, 768), 8), ("q5_k", (4, 768, 256), 2), ("q6_k", (8, 256, 512), 5),
    ("q4_k", (6, 512, 288), 3),                              # I % 256 != 0: w2 falls back to q8_0
])
def test_parity_shapes_topk(fmt, shape, k):
    n_experts, dim, inter = shape
    ne, ref = backend(fmt, n_experts, dim, inter)
    for tokens in (1, 7, 64):
        ids, w = routing(tokens, k, n_experts, seed=k)
        check(ne, ref, torch.randn(tokens, dim), ids, w)


def test_kquant_fallback_for_down_rows():
    ne, _ = backend("q4_k", 6, 512, 288)
    assert (ne.fmt13.name, ne.fmt2.name) == ("q4_k", "q8_0")


@pytest.mark.parametrize("fmt", ["fp32", "q4_k"])
def test_duplicate_and_unused_experts(fmt):
    ne, ref = backend(fmt, 16, 512, 256)
    x = torch.randn(5, 512)
    ids = torch.tensor([[3, 3], [3, 7], [7, 3], [3, 3], [0, 3]])       # repeats within and across tokens
    w = torch.rand(5, 2)
    check(ne, ref, x, ids, w)
    check(ne, ref, torch.randn(64, 512), torch.full((64, 2), 11), torch.rand(64, 2))  # one expert only


@pytest.mark.parametrize("fmt", ["bf16", "q4_k", "q6_k"])
def test_mixed_small_and_large_groups(fmt):
    """One call where some experts get many tokens (tiled kernels) and others few (decode kernels),
    both adding into the same output rows."""
    ne, ref = backend(fmt, 16, 512, 256)
    tokens = 24
    ids = torch.stack([torch.tensor([0, 1 + t % 15]) for t in range(tokens)])   # expert 0: 24 tokens
    ids[:12, 1] = 5                                                             # expert 5: 12 + 1 tokens
    check(ne, ref, torch.randn(tokens, 512), ids, torch.rand(tokens, 2))


def test_output_dtype_and_empty_batch():
    ne, ref = backend("bf16", 16, 512, 256)
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    ids, w = routing(3, 2, 16)
    assert ne(x, ids, w).dtype == torch.bfloat16
    assert ne(torch.randn(0, 512), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2)).shape == (0, 512)


def test_bad_inputs_raise_clear_errors():
    ne, _ = backend("q8_0", 6, 96, 64)
    x, (ids, w) = torch.randn(2, 96), routing(2, 2, 6)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 6\)"):
        ne(x, ids + 6, w)
    with pytest.raises(ValueError, match=r"expert ids must lie"):
        ne(x, ids - 7, w)
    with pytest.raises(ValueError, match="hidden size 95"):
        ne(torch.randn(2, 95), ids, w)
    with pytest.raises(ValueError, match=r"\(T, K\)"):
        ne(x, ids, w[:, :1].contiguous())
    with pytest.raises(ValueError, match="contiguous"):
        ne(torch.randn(96, 2).t(), ids, w)
    with pytest.raises(TypeError, match="int64"):
        ne.run(x.numpy(), ids.int().numpy(), w.numpy())


def test_bad_weights_raise_clear_errors():
    w1 = np.zeros((2, 64, 4 * 34), np.uint8)
    w2 = np.zeros((2, 128, 2 * 34), np.uint8)
    NumbaExperts(w1, w1, w2, fmt="q8_0")                     # D=128, I=64: consistent
    with pytest.raises(ValueError, match="34-byte blocks"):
        NumbaExperts(w1[..., :-1].copy(), w1[..., :-1].copy(), w2, fmt="q8_0")
    with pytest.raises(ValueError, match="w2 has shape"):
        NumbaExperts(w1, w1, w2[:, :100].copy(), fmt="q8_0")
    with pytest.raises(ValueError, match="C-contiguous"):
        NumbaExperts(w1[:, ::2], w1[:, ::2], w2, fmt="q8_0")
    with pytest.raises(TypeError, match="raw uint8"):
        NumbaExperts(w1.astype(np.float32), w1, w2, fmt="q8_0")
    with pytest.raises(ValueError, match="multiple of the format's block of 256"):
        NumbaExperts.from_torch(torch_experts(2, 320, 256), fmt="q4_k")
    with pytest.raises(ValueError, match="unknown weight format"):
        NumbaExperts.from_torch(torch_experts(2, 64, 32), fmt="int3")


def test_fp_formats_are_views_not_copies():
    te = torch_experts(4, 64, 32).to(torch.bfloat16)
    ne = NumbaExperts(te.w1.data, te.w3.data, te.w2.data, fmt="bf16")
    assert np.shares_memory(ne.w1, te.w1.data.view(torch.int16).numpy())


def test_warmup_reports_compile_time():
    ne, _ = backend("fp32", 4, 50, 36)
    assert ne.warmup() > 0 and ne.compile_seconds is not None


def test_warmup_runs_decode_and_tiled_kernels(monkeypatch):
    """warmup() calls the kernels once with few tokens on an expert (decode kernels) and once with
    more than any format's decode limit (tiled kernels), so neither compiles inside a timed call."""
    from hetero_rt.kernels import moe
    ne, _ = backend("q5_0", 4, 64, 32)
    per_expert = []
    real = ne.run

    def spy(x, ids, weights, **kw):
        per_expert.append(np.bincount(ids.ravel()).max())
        return real(x, ids, weights, **kw)
    monkeypatch.setattr(ne, "run", spy)
    assert ne.warmup() > 0
    assert min(per_expert) <= min(moe.DECODE_MAX_TOKENS, moe.DECODE_MAX_TOKENS_BLOCK)
    assert max(per_expert) > max(moe.DECODE_MAX_TOKENS, moe.DECODE_MAX_TOKENS_BLOCK)


@pytest.mark.parametrize("variant", ["v2_lite", "v3"])
def test_whole_model_logits_match_torch_backend(variant, tmp_path):
    """Swap every MoE layer's experts for the numba backend (fp32): logits equal within 1e-4 relative."""
    from hf_models import build_hf_model, save_hf_model
    path = save_hf_model(build_hf_model(variant), variant, tmp_path)
    rt = hetero_rt.load(path, dtype="float32")
    ids = [3, 17, 42, 5, 88, 61, 0, 23, 9, 77, 31, 12, 50, 4, 66, 8]
    ref = rt.logits(ids)
    swapped = 0
    for block in rt.model.layers:
        if hasattr(block.ffn, "experts"):
            block.ffn.experts = NumbaExperts.from_torch(block.ffn.experts, fmt="fp32", threads=2)
            swapped += 1
    assert swapped == rt.args.num_hidden_layers - 1
    assert rt.warmup() > 0                                   # every swapped backend warmed up too
    assert all(b.ffn.experts.compile_seconds is not None for b in rt.model.layers if hasattr(b.ffn, "experts"))
    ours = rt.logits(ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("fmt", ["q4_k", "bf16"])
def test_read_only_memory_mapped_weights(fmt, tmp_path):
    """Weights as views of a read-only np.memmap (how GGUF tensors arrive) work, are not copied, and
    match the reference (numba compiles read-only arrays separately, so the summation order, not
    the result, may differ from the writable copy's)."""
    ne, ref = backend(fmt, 16, 512, 256)
    path = tmp_path / "experts.bin"
    with open(path, "wb") as fh:
        for w in (ne.w1, ne.w3, ne.w2):
            fh.write(w.tobytes())
    mm = np.memmap(path, np.uint8, mode="r")
    n1, n3 = ne.w1.size, ne.w3.size
    views = (mm[:n1].reshape(ne.w1.shape), mm[n1:n1 + n3].reshape(ne.w3.shape),
             mm[n1 + n3:].reshape(ne.w2.shape))
    assert not views[0].flags.writeable
    ro = NumbaExperts(*views, fmt=fmt)
    assert np.shares_memory(ro.w1, mm) and not ro.w1.flags.writeable
    for tokens in (1, 64):
        ids, w = routing(tokens, 6, 16, seed=tokens)
        x = torch.randn(tokens, 512)
        torch.testing.assert_close(ro(x, ids, w), ne(x, ids, w), **TOL)
        check(ro, ref, x, ids, w)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "q5_0", "q2_k", "q3_k", "iq4_xs", "bf16",
                                 "float8_e4m3"])
def test_int8_activations_within_stated_tolerance(fmt):
    """act="int8" (decode kernels, ggml block formats): within 2e-2 of max |y| of the fp32 reference
    (measured 3e-3 to 8e-3); fp formats and block FP8 (no int8 dot) ignore it (exact as fp32).
    Prefill (many tokens per expert) stays fp32 and exact."""
    ne, ref = backend(fmt, 16, 512, 256)
    ids, w = routing(2, 6, 16, seed=3)
    x = torch.randn(2, 512)
    want = ref(x, ids, w)
    ne.act = "int8"
    try:
        got = ne(x, ids, w)
        err = ((got - want).abs().max() / want.abs().max()).item()
        if fmt in ("bf16", "float8_e4m3"):
            torch.testing.assert_close(got, want, **TOL)
        else:
            assert 1e-5 < err < 2e-2, err
        check(ne, ref, torch.randn(40, 512), *routing(40, 6, 16, seed=4))   # >8 tokens per expert: tiled, fp32
    finally:
        ne.act = "fp32"
    with pytest.raises(ValueError, match="act must be one of"):
        ne.act = "int4"


def test_run_from_a_worker_thread():
    """run() from a worker thread (how the hetero backend's CPU worker calls it) gives the same result,
    and every parallel kernel it can enter is compiled nogil, so the main thread keeps running meanwhile."""
    import threading

    from numba.core.registry import CPUDispatcher

    from hetero_rt.kernels import gemm, moe
    ne, _ = backend("q4_k", 16, 512, 256)
    x = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)
    ids, w = (a.numpy() for a in routing(2, 6, 16, seed=9))
    want = ne.run(x, ids, w)
    got = []
    worker = threading.Thread(target=lambda: got.extend(ne.run(x, ids, w) for _ in range(20)))
    worker.start()
    worker.join()
    assert len(got) == 20 and all(np.array_equal(g, want) for g in got)
    kernels = [v for m in (moe, gemm) for v in vars(m).values()      # the entry points run() calls
               if isinstance(v, CPUDispatcher) and v.targetoptions.get("parallel")]
    assert kernels and all(k.targetoptions.get("nogil") for k in kernels), \
        [k.__name__ for k in kernels if not k.targetoptions.get("nogil")]


def _int8_blocks(v: np.ndarray) -> np.ndarray:
    """llama.cpp's q8_0 activation quantization as the kernels do it (fp32: d = amax / 127 per 32
    values, q = rint(v / d)), returned dequantized in float64: what an int8 dot multiplies exactly."""
    blocks = v.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(1, keepdims=True) / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    return (np.rint(blocks * inv).astype(np.float64) * d.astype(np.float64)).reshape(v.shape)


def _near_ties(v: np.ndarray) -> np.ndarray:
    """For each value of v, the scale d of its 32-block where v / d lies within 1e-3 of a rounding
    tie (x.5), else 0: where an fp32 v that differs from v in its last bits may round the other way."""
    blocks = v.astype(np.float32).reshape(-1, 32)
    d = (np.abs(blocks).max(1, keepdims=True) / np.float32(127)).astype(np.float64)
    r = np.abs(blocks) / np.where(d > 0, d, 1)
    tie = np.abs(r - np.floor(r) - 0.5) < 1e-3
    return (tie * d).reshape(v.shape)


def int8_reference(ref, x, ids, w) -> tuple[np.ndarray, np.ndarray]:
    """The routed experts with int8 activations, in float64 from the dequantized weights: both
    matmuls see their input quantized to q8_0 blocks (the down projection's input is SiLU(g) * u,
    rounded to fp32 first, as the kernel holds it). Also the slack per output: where an element of
    that input lies at a rounding tie, the kernel's fp32 value of it may round to the neighbouring
    level (an error of one step d times the down weights), which the reference cannot know."""
    w1, w3, w2 = (getattr(ref, n).detach().double().numpy() for n in ("w1", "w3", "w2"))
    y = np.zeros((x.shape[0], w2.shape[1]))
    slack = np.zeros_like(y)
    for t in range(x.shape[0]):
        xq = _int8_blocks(x[t].numpy())
        for e, g in zip(ids[t].tolist(), w[t].double().tolist()):
            a, u = w1[e] @ xq, w3[e] @ xq
            h = (a / (1 + np.exp(-a)) * u).astype(np.float32)
            y[t] += g * (w2[e] @ _int8_blocks(h))
            slack[t] += abs(g) * (np.abs(w2[e]) @ _near_ties(h))
    return y, slack


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "q5_0", "q2_k", "q3_k", "iq4_xs"])
def test_int8_activations_equal_their_exact_float64_reference(fmt):
    """act="int8" computes exactly what it says: the dequantized weights times the q8_0-quantized
    activations, up to fp32 accumulation: measured 1.3e-7 to 3.6e-7 of max |y| on the 9 formats (2-core
    Xeon), where the same outputs are 0.9e-2 to 1.2e-2 from the exact fp32 path."""
    ne, ref = backend(fmt, 16, 512, 256)
    ids, w = routing(3, 6, 16, seed=5)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(8))
    want, slack = int8_reference(ref, x, ids, w)
    ne.act = "int8"
    try:
        got = ne(x, ids, w).double().numpy()
    finally:
        ne.act = "fp32"
    err = (np.maximum(np.abs(got - want) - slack, 0)).max() / np.abs(want).max()
    assert err < 2e-6, err
