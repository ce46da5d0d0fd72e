"""The weight decoders where the per-format tests do not reach: cases found by mutation testing
(scripts/mutation_test.py --preset decoders, docs/reliability.md), each against an independent
reference (gguf.quants dequantization, or the block-FP8 formula written in tests/fp8_models.py)."""
import numpy as np
import pytest
import torch

from fp8_models import fp8_dequantize, fp8_quantize
from hetero_rt.kernels.dequant import decode_tile
from hetero_rt.quant import fp8, ggml


def test_fp8_dequantize_in_row_chunks():
    """quant.fp8.dequantize works ROW_CHUNK (1024) rows at a time: a weight of 1153 rows (a second chunk of
    129 rows, one past a 128-row scale block) equals fp8 * scale_inv exactly, in fp32 and in bf16."""
    assert fp8.ROW_CHUNK == 1024
    w = torch.randn(1153, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    q, s = fp8_quantize(w)
    want = fp8_dequantize(q, s)
    torch.testing.assert_close(fp8.dequantize(q, s, torch.float32), want, rtol=0, atol=0)
    torch.testing.assert_close(fp8.dequantize(q, s), want.to(torch.bfloat16), rtol=0, atol=0)
    np.testing.assert_array_equal(fp8.unpack(fp8.pack(q, s)).numpy(), want.numpy())


@pytest.mark.parametrize("fmt", sorted(ggml.FORMATS))
def test_decode_tile_of_several_blocks(fmt):
    """decode_tile over many blocks in one call (kernels.linear decodes whole rows: n = C), from column 0
    and from a later block, rows from an offset, equals gguf's dequantization exactly; nothing is written
    past n."""
    f = ggml.get_format(fmt)
    cols = 5 * max(f.block, 256)
    raw = ggml.quantize(np.random.default_rng(31).standard_normal((4, cols)).astype(np.float32) * 2, fmt)
    ref = ggml.dequantize(raw, fmt)
    for r0, rows, c0, n in ((0, 4, 0, cols), (1, 3, f.block, cols - 2 * f.block), (2, 1, 3 * f.block, 2 * f.block)):
        out = np.full((rows + 1, cols + 1), np.nan, np.float32)
        decode_tile(f.code, raw, r0, rows, c0, n, out)
        np.testing.assert_array_equal(out[:rows, :n], ref[r0:r0 + rows, c0:c0 + n])
        assert np.isnan(out[:, n:]).all() and np.isnan(out[rows:]).all()


def q8_act_numpy(x: np.ndarray, d: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's q8_0 activations in fp32: per 32 values d = max |x| / 127 (or the d given),
    q = rint(x * (1 / d)) (half to even; 0 for an all-zero block)."""
    b = x.astype(np.float32).reshape(-1, 32)
    d = np.abs(b).max(1) / np.float32(127) if d is None else d
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    return np.rint(b * inv[:, None]).astype(np.int8).ravel(), d


@pytest.mark.parametrize("fmt", [f for f in sorted(ggml.GGML_TYPES.values()) if ggml.get_format(f).block > 1])
def test_dot_row_i8_equals_float64(fmt):
    """quantize_act against numpy (d within one fp32 rounding of max |x| / 127, q exactly; an all-zero
    block, values at exact rounding ties, both signs), and
    dot_row_i8 of every ggml format (rows of an odd number of blocks) equal to the float64 product of
    gguf's dequantized weights and the dequantized int8 activations, up to fp32 accumulation
    (2e-6 of sum |w * x|)."""
    from hetero_rt.kernels.dot import act_sums_size, dot_row_i8, quantize_act
    f = ggml.get_format(fmt)
    cols = 2048 + 256 + (32 if f.block == 32 else 0)
    raw = ggml.quantize(np.random.default_rng(41).standard_normal((8, cols)).astype(np.float32) * 3, fmt)
    w = ggml.dequantize(raw, fmt).astype(np.float64)
    x = np.random.default_rng(42).standard_normal(cols).astype(np.float32)
    x[32:64] = 0                                                       # d = 0
    x[64:96] = [127, -127, 2.5, -2.5, 3.5, -3.5, 0.5, -0.5] * 4        # d = 1: ties to even
    xq, xd, xs = np.empty(cols, np.int8), np.empty(cols // 32, np.float32), np.empty(act_sums_size(cols), np.float32)
    quantize_act(x, xq, xd, xs)
    np.testing.assert_allclose(xd, q8_act_numpy(x)[1], rtol=1.2e-7, atol=0)   # fastmath: amax * (1 / 127)
    np.testing.assert_array_equal(xq, q8_act_numpy(x, xd)[0])
    assert list(xq[64:72]) == [127, -127, 2, -2, 4, -4, 0, 0]
    xdq = xq.astype(np.float64) * np.repeat(xd.astype(np.float64), 32)
    for r in range(8):
        got = dot_row_i8(f.code, raw[r], xq, xd, xs)
        assert abs(got - w[r] @ xdq) <= 2e-6 * np.abs(w[r] * xdq).sum(), (r, got, w[r] @ xdq)
