"""llama.cpp's routed-expert graph (hetero_rt.bench.llama_cpp_ref, the benchmark's comparison)
computes the same function as the numba backend on the same bytes. Skipped without llama_cpp.

Tolerance: ggml quantizes activations (q8_K/q8_0 for block formats, bf16 for bf16 weights), so
fp32 must agree to fp32 rounding and the rest within 5e-2 of max |y| (measured 3e-4 to 2.3e-2)."""
import numpy as np
import pytest

pytest.importorskip("llama_cpp")
from hetero_rt.bench import kernels as bench  # noqa: E402
from hetero_rt.bench.llama_cpp_ref import GgmlMoE, available  # noqa: E402

if not available():
    pytest.skip("llama_cpp's ggml libraries cannot be loaded", allow_module_level=True)


@pytest.mark.parametrize("fmt,tol", [("fp32", 1e-5), ("bf16", 1e-2), ("q8_0", 5e-2), ("q4_k", 5e-2),
                                     ("q6_k", 5e-2), ("q5_0", 5e-2), ("q4_0", 5e-2)])
def test_ggml_moe_matches_numba_experts(fmt, tol):
    dim, inter, k, n_exp = 512, 256, 4, 8
    ne = bench.make_experts(fmt, n_exp, dim, inter, threads=2)
    g = GgmlMoE(ne.w1, ne.w3, ne.w2, ne.fmt13.name, ne.fmt2.name, dim, inter, 64, k, threads=2)
    rng = np.random.default_rng(0)
    for tokens in (1, 64):
        x = rng.standard_normal((tokens, dim)).astype(np.float32)
        ids = np.stack([rng.permutation(n_exp)[:k] for _ in range(tokens)]).astype(np.int64)
        w = rng.random((tokens, k)).astype(np.float32)
        want, got = ne.run(x, ids, w), g.run(x, ids, w)
        assert np.abs(got - want).max() <= tol * np.abs(want).max()
    g.close()


def test_ggml_moe_refuses_a_format_without_ggml_type():
    ne = bench.make_experts("q4_k", 2, 256, 256, threads=2)
    with pytest.raises(ValueError, match="no ggml type for weight format 'q9_9'"):
        GgmlMoE(ne.w1, ne.w3, ne.w2, "q9_9", ne.fmt2.name, 256, 256, 4, 1, threads=2)
