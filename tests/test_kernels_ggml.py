"""Weight formats and the row-chunk decoder: hetero_rt.quant.ggml against the gguf package's numpy
dequantizers (the reference), and hetero_rt.kernels.dequant.decode_tile against both."""
import numpy as np
import pytest

from hetero_rt.kernels.dequant import CHUNK, decode_tile
from hetero_rt.kernels.gemm import block_matmul
from hetero_rt.quant import ggml

FORMATS = sorted(ggml.FORMATS)
# quantization error bound relative to the weights' max |w|, per format (sanity, not a spec)
MAX_ERR = {"fp32": 0, "bf16": 4e-3, "fp16": 5e-4, "q8_0": 1e-2, "q4_0": 0.15, "q4_k": 0.15,
           "q5_k": 0.06, "q6_k": 0.04, "q5_0": 0.08, "q2_k": 0.3, "q3_k": 0.2, "iq4_xs": 0.1, "q4_1": 0.1, "q5_1": 0.05,
           "float8_e4m3": 0.07}


def weights(rows, cols, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_roundtrip(fmt):
    w = weights(6, 768)
    raw = ggml.quantize(w, fmt)
    f = ggml.get_format(fmt)
    assert raw.dtype == np.uint8 and raw.shape == (6, f.row_bytes(768))
    back = ggml.dequantize(raw, fmt)
    assert back.shape == w.shape
    assert np.abs(back - w).max() <= MAX_ERR[fmt] * np.abs(w).max()


@pytest.mark.parametrize("fmt", ["q4_k", "q5_k", "q6_k", "q2_k", "q3_k", "iq4_xs"])
def test_kquant_uses_all_levels(fmt):
    """The reference quantizers must exercise every bit of the layout (5th/6th bits, high scales)."""
    w = weights(4, 512, seed=1)
    back = ggml.dequantize(ggml.quantize(w, fmt), fmt)
    assert np.corrcoef(back.ravel(), w.ravel())[0, 1] > {"q2_k": 0.94, "q3_k": 0.98}.get(fmt, 0.99)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cols", [256, 768, 320])
def test_decode_tile_matches_gguf(fmt, cols):
    f = ggml.get_format(fmt)
    if cols % f.block:
        pytest.skip(f"{fmt} rows must be multiples of {f.block}")
    raw = ggml.quantize(weights(3, cols, seed=2), fmt)
    ref = ggml.dequantize(raw, fmt)                          # gguf's numpy dequantizer
    buf = np.full((3, CHUNK + 1), np.nan, np.float32)
    for c0 in range(0, cols, CHUNK):
        n = min(CHUNK, cols - c0)
        decode_tile(f.code, raw, 0, 3, c0, n, buf)
        np.testing.assert_array_equal(buf[:, :n], ref[:, c0:c0 + n])
        assert np.isnan(buf[:, CHUNK]).all()                   # nothing written past n
    decode_tile(f.code, raw, 1, 2, 0, CHUNK, buf)              # a row offset: rows 1 and 2
    np.testing.assert_array_equal(buf[:2, :CHUNK], ref[1:3, :CHUNK])


def test_format_errors_name_the_block():
    with pytest.raises(ValueError, match="multiple of the format's block of 256"):
        ggml.quantize(weights(2, 320), "q4_k")
    with pytest.raises(ValueError, match="34-byte blocks"):
        ggml.get_format("q8_0").cols(35)
    with pytest.raises(ValueError, match="unknown weight format"):
        ggml.get_format("iq2_xxs")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cols", [256, 768, 2048 + 32 * 3])
def test_fused_dot_row_matches_gguf(fmt, cols):
    """dot_row straight from the bytes == dequantize (gguf) then dot, for every format; odd block
    counts exercise the one-block tails of the two-blocks-per-step loops."""
    from hetero_rt.kernels.dot import block_sums, dot_row
    f = ggml.get_format(fmt)
    if cols % f.block:
        pytest.skip(f"{fmt} rows must be multiples of {f.block}")
    raw = ggml.quantize(weights(4, cols, seed=3), fmt)
    x = np.random.default_rng(4).standard_normal(cols).astype(np.float32)
    xs = np.empty(cols // 32, np.float32)
    block_sums(x, xs)
    ref = ggml.dequantize(raw, fmt).astype(np.float64) @ x
    got = [dot_row(f.code, raw[r], x, xs) for r in range(4)]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if ggml.get_format(f).block > 1 and f != "float8_e4m3"])
def test_int8_activation_dot_within_stated_tolerance(fmt):
    """dot_row_i8 (x quantized per 32 columns to int8, integer block sums) vs the exact fp32 dot of
    the dequantized weights: within 2% of max |dot| over 64 rows (measured 4e-3 to 7e-3), and not
    exact (so the int8 path really ran)."""
    from hetero_rt.kernels.dot import act_sums_size, dot_row_i8, quantize_act
    f = ggml.get_format(fmt)
    cols = 2048 + 256 + (32 if f.block == 32 else 0)
    raw = ggml.quantize(weights(64, cols, seed=5), fmt)
    x = np.random.default_rng(6).standard_normal(cols).astype(np.float32)
    xq, xd, xs = np.empty(cols, np.int8), np.empty(cols // 32, np.float32), np.empty(act_sums_size(cols), np.float32)
    quantize_act(x, xq, xd, xs)
    np.testing.assert_allclose(xq * np.repeat(xd, 32), x, atol=np.abs(x).max() / 254 * 1.001)
    ref = ggml.dequantize(raw, fmt).astype(np.float64) @ x
    got = np.array([dot_row_i8(f.code, raw[r], xq, xd, xs) for r in range(64)])
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 1e-5 < err < 2e-2


@pytest.mark.parametrize("rows,n_pad,kc", [(1, 8, 1), (7, 16, 33), (8, 24, 256), (19, 40, 100), (64, 56, 256)])
def test_block_matmul_against_numpy(rows, n_pad, kc):
    """The register-blocked kernel (every 8-row / 1-row and 24 / 16 / 8-token block shape) with row
    and column offsets into xp and acc, against a float64 matmul; cells outside the target stay."""
    rng = np.random.default_rng(rows)
    buf = rng.standard_normal((rows + 3, kc + 5)).astype(np.float32)
    xp = rng.standard_normal((kc + 9, n_pad + 16)).astype(np.float32)
    acc = rng.standard_normal((rows + 2, n_pad + 24)).astype(np.float32)
    before = acc.copy()
    k0, xt, at = 4, 8, 16
    block_matmul(buf, rows, xp, k0, xt, kc, acc, at, n_pad, np.zeros((1, 64), np.uint8), 0, 0, 0)
    want = before[:rows, at:at + n_pad] + buf[:rows, :kc].astype(np.float64) @ xp[k0:k0 + kc, xt:xt + n_pad]
    np.testing.assert_allclose(acc[:rows, at:at + n_pad], want, rtol=1e-5, atol=1e-4)
    untouched = np.ones(acc.shape, bool)
    untouched[:rows, at:at + n_pad] = False
    np.testing.assert_array_equal(acc[untouched], before[untouched])
    with pytest.raises(ValueError, match="shapes do not match"):
        block_matmul(buf, rows, xp, k0, xt, kc, acc, at + 16, n_pad, np.zeros((1, 64), np.uint8), 0, 0, 0)


@pytest.mark.parametrize("rb", [1, 4, 8])
@pytest.mark.parametrize("nv", [1, 2, 3])
def test_micro_kernels_of_every_block_shape(rb, nv):
    """Each (rows, vectors) micro-kernel, including the 4-row ones block_matmul uses on CPUs with 16
    vector registers (AVX2), which this machine's block_matmul may not reach."""
    from numba import njit
    from hetero_rt.kernels.gemm import _micro_kernel
    mk = _micro_kernel(rb, nv)

    @njit
    def call(buf, r, xp, k0, xt, kc, acc, at):
        mk(buf, r, xp, k0, xt, kc, acc, at)

    rng = np.random.default_rng(rb * 10 + nv)
    buf = rng.standard_normal((rb + 2, 70)).astype(np.float32)
    xp = rng.standard_normal((80, 8 * nv + 8)).astype(np.float32)
    acc = np.zeros((rb + 3, 8 * nv + 16), np.float32)
    call(buf, 1, xp, 3, 8, 65, acc, 16)
    want = np.zeros_like(acc, dtype=np.float64)
    want[1:1 + rb, 16:16 + 8 * nv] = buf[1:1 + rb, :65].astype(np.float64) @ xp[3:68, 8:8 + 8 * nv]
    np.testing.assert_allclose(acc, want, rtol=1e-5, atol=1e-4)


def test_act_sums_against_numpy():
    """The int8 activations' block sums: per 32 then per 16, each the block's scale times the sum of
    its int8 values (the extremes -128 / 127 included)."""
    from hetero_rt.kernels.dot import act_sums, act_sums_size
    rng = np.random.default_rng(3)
    xq = rng.integers(-128, 128, 512, dtype=np.int8)
    xq[:32], xq[64:80] = -128, 127
    xd = rng.random(16).astype(np.float32)
    xs = np.full(act_sums_size(512), np.nan, np.float32)
    act_sums(xq, xd, xs)
    q = xq.astype(np.float64)
    np.testing.assert_allclose(xs[:16], xd * q.reshape(16, 32).sum(1), rtol=1e-6)
    np.testing.assert_allclose(xs[16:], np.repeat(xd, 2) * q.reshape(32, 16).sum(1), rtol=1e-6)


def _fresh(intrinsic_fn):
    """A new numba intrinsic of the same definition: numba keeps the (signature, codegen) an intrinsic
    chose at its first typing for the process, so a code path chosen by a monkeypatched flag needs an
    intrinsic object that has not been typed yet."""
    from numba.extending import intrinsic
    return intrinsic(intrinsic_fn._defn)


@pytest.mark.parametrize("vnni", [False, True])
def test_q8_0_dot_i8_both_code_paths(vnni, monkeypatch):
    """The int8 Q8_0 row dot (signed weights offset by 128 for vpdpbusd, then corrected), with and
    without VNNI, against numpy; extremes -128 / 127 on both sides."""
    from numba import njit
    from hetero_rt.kernels import intrinsics
    if vnni and not intrinsics.VNNI:
        pytest.skip("this CPU has no AVX512-VNNI")
    monkeypatch.setattr(intrinsics, "VNNI", vnni)

    fn = _fresh(intrinsics.q8_0_dot_i8)

    @njit
    def call(row, xq, xd, xs, nb):
        return fn(row, xq, xd, xs, nb)

    rng = np.random.default_rng(5 + int(vnni))
    raw = ggml.quantize(weights(1, 96, seed=4), "q8_0")[0].copy()
    q = raw.reshape(3, 34)[:, 2:].view(np.int8)
    q[0, :8], q[1, :8] = -128, 127
    xq = rng.integers(-128, 128, 96, dtype=np.int8)
    xq[:4], xq[32:36] = -128, 127
    xd = rng.random(3).astype(np.float32)
    d = raw.reshape(3, 34)[:, :2].copy().view(np.float16).astype(np.float64).ravel()
    want = sum(d[b] * xd[b] * float((q[b].astype(np.int64) * xq[32 * b:32 * b + 32]).sum()) for b in range(3))
    np.testing.assert_allclose(call(raw, xq, xd, _sums(xq, xd), 3), want, rtol=1e-5)


@pytest.mark.parametrize("path", ["portable", "vnni", "avx512"])
@pytest.mark.parametrize("fmt", ["q4_0", "q5_0", "q4_k", "q5_k", "q6_k", "q2_k", "q3_k", "iq4_xs"])
def test_vector_row_dots_i8_every_code_path(fmt, path, monkeypatch):
    """The whole-row int8 dots written as vector IR (levels unpacked in vectors, offsets and mins taken
    from the activations' block sums, the 16 sub-block scales of Q2_K/Q3_K/Q6_K applied per vector
    lane, Q4_K's 6-bit scales and mins unpacked as vectors, IQ4_XS's levels by table lookup), with
    on each code path this CPU can run (256-bit without VNNI, 256-bit vpdpbusd, 512-bit vpdpbusd with
    AVX-512BW's word shifts for the 256-blocks), against float64 numpy on gguf's dequantized weights
    and the dequantized int8 activations (an exact reference: the only difference is fp32 summation
    order); activations at the int8 extremes -128 / 127 and every level of the format; rows of 4 and
    5 blocks (the unrolled loop and its remainder)."""
    from numba import njit
    from hetero_rt.kernels import intrinsics
    vnni, avx512 = path != "portable", path == "avx512"
    if (vnni and not intrinsics.VNNI) or (avx512 and not intrinsics.AVX512):
        pytest.skip(f"this CPU cannot run the {path} path")
    monkeypatch.setattr(intrinsics, "VNNI", vnni)
    monkeypatch.setattr(intrinsics, "AVX512", avx512)
    fn = _fresh(getattr(intrinsics, f"{fmt}_dot_i8"))

    @njit
    def call(row, xq, xd, xs, nb):
        return fn(row, xq, xd, xs, nb)

    f = ggml.get_format(fmt)
    cols = 1024 + (64 if f.block == 32 else 256)
    rng = np.random.default_rng(11 + int(vnni))
    raw = ggml.quantize(weights(6, cols, seed=12) * 3, fmt)
    w = ggml.dequantize(raw, fmt).astype(np.float64)
    assert len(np.unique(np.round(w[0] / np.abs(w[0]).max() * 1e6))) > {"q6_k": 60, "q2_k": 3, "q3_k": 7, "q4_k": 40, "q5_k": 40}.get(fmt, 15)
    xq = rng.integers(-128, 128, cols, dtype=np.int8)
    xq[:16], xq[40:56] = -128, 127
    xd = (rng.random(cols // 32) + 0.5).astype(np.float32)
    xdq = xq.astype(np.float64) * np.repeat(xd.astype(np.float64), 32)
    for r in range(6):
        want = w[r] @ xdq
        got = call(raw[r], xq, xd, _sums(xq, xd), cols // f.block)
        assert abs(got - want) <= 2e-6 * np.abs(w[r] * xdq).sum(), (r, got, want)


def test_dot_row_i8_refuses_a_format_without_int8_dot():
    """Block FP8 has no int8 dot: dot_row_i8 says so instead of reading the row as another format (the
    kernels never call it for FP8 or the fp formats: has_int8_dot keeps those rows on fp32 activations)."""
    from hetero_rt.kernels.dot import BF16, FP8, dot_row_i8, has_int8_dot
    assert not has_int8_dot(FP8) and not has_int8_dot(BF16)
    assert all(has_int8_dot(ggml.get_format(f).code) for f in ggml.GGML_TYPES.values() if ggml.get_format(f).block > 1)
    raw = ggml.quantize(weights(1, 128, seed=1), "float8_e4m3")[0]
    with pytest.raises(ValueError, match="no int8 dot for this format"):
        dot_row_i8(FP8, raw, np.zeros(128, np.int8), np.zeros(4, np.float32), np.zeros(4, np.float32))


@pytest.mark.parametrize("fmt", ["q4_k", "q8_0", "q6_k", "q2_k", "iq4_xs", "bf16", "float8_e4m3"])
def test_stored_weight_int8_gemv(fmt):
    """StoredWeight with act="int8": few-token matmuls of ggml block formats take the integer dots
    (within 2% of max |y| of the exact product, and not exact); fp formats and block FP8 stay exact;
    many-token matmuls (the GEMM path) stay exact whatever act says."""
    import torch
    from hetero_rt.kernels.stored import StoredWeight
    w = weights(96, 512, seed=7)
    raw = ggml.quantize(w, fmt)
    exact = ggml.dequantize(raw, fmt).astype(np.float64)
    sw = StoredWeight(raw, fmt, act="int8")
    x = torch.from_numpy(np.random.default_rng(8).standard_normal((3, 512)).astype(np.float32))
    ref = x.double().numpy() @ exact.T
    err = np.abs(sw.matmul(x).numpy() - ref).max() / np.abs(ref).max()
    if fmt in ("bf16", "float8_e4m3"):
        assert err < 1e-5
    else:
        assert 1e-6 < err < 2e-2, err
    big = torch.from_numpy(np.random.default_rng(9).standard_normal((20, 512)).astype(np.float32))
    np.testing.assert_allclose(sw.matmul(big).numpy(), big.double().numpy() @ exact.T, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="act must be"):
        sw.act = "int4"


@pytest.mark.parametrize("tokens", [1, 3, 12])
def test_stored_kv_b_per_head_products(tokens):
    """StoredKvB (MLA's kv_b as a GGUF stores it: k_b (H * C, N) in Q5_0, v_b (H * V, C) in Q4_K) against
    float64 numpy on the dequantized matrices: absorb = q_nope x W_UK per head, expand = W_UV x o_lat
    per head (the grouped gemv for few tokens, the decoded einsum for more), and dequantize() the
    dense wkv_b layout (H, N + V, C); exact activations even when int8 is asked for."""
    import torch
    from hetero_rt.kernels.stored import stored_kv_b_parameter
    h, n, v, c = 4, 64, 32, 256
    k_raw = ggml.quantize(weights(h * c, n, seed=21), "q5_0")
    v_raw = ggml.quantize(weights(h * v, c, seed=22), "q4_k")
    kv = stored_kv_b_parameter(k_raw, "q5_0", v_raw, "q4_k", h).stored
    kv.act = "int8"
    wk = ggml.dequantize(k_raw, "q5_0").astype(np.float64).reshape(h, c, n)
    wv = ggml.dequantize(v_raw, "q4_k").astype(np.float64).reshape(h, v, c)
    rng = np.random.default_rng(23)
    q, o = rng.standard_normal((tokens, h, n)), rng.standard_normal((tokens, h, c))
    got_q = kv.absorb(torch.tensor(q, dtype=torch.float32)).numpy()
    got_o = kv.expand(torch.tensor(o, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got_q, np.einsum("thn,hcn->thc", q, wk), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_o, np.einsum("thc,hvc->thv", o, wv), rtol=1e-4, atol=1e-4)
    dense = kv.dequantize().numpy().reshape(h, n + v, c)
    np.testing.assert_array_equal(dense[:, :n], wk.transpose(0, 2, 1).astype(np.float32))
    np.testing.assert_array_equal(dense[:, n:], wv.astype(np.float32))
    with pytest.raises(ValueError, match="not \\(tokens, heads"):
        kv.k_b.matmul_heads(torch.zeros(1, 3, n))
    with pytest.raises(ValueError, match="act must be 'fp32' or 'int8'"):
        kv.act = "bf16"
    with pytest.raises(ValueError, match="are not \\(H \\* C, N\\) and \\(H \\* V, C\\)"):
        stored_kv_b_parameter(k_raw, "q5_0", v_raw, "q4_k", h + 1)


def _sums(xq, xd):
    """The block sums the row dots take with xq, xd (kernels.dot.act_sums)."""
    from hetero_rt.kernels.dot import act_sums, act_sums_size
    xs = np.empty(act_sums_size(xq.shape[0]), np.float32)
    act_sums(xq, xd, xs)
    return xs
