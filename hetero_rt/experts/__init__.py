"""The routed-experts seam: every backend is an nn.Module called as

    experts(x (T, D), ids (T, K) int64, weights (T, K) fp32) -> (T, D) in x's dtype

computing sum_k weights[t, k] * FFN_{ids[t, k]}(x[t]) with FFN(x) = w2(silu(w1 x) * w3 x).
Backends: `torch` (reference, stacked weights); `numba` (CPU kernels) comes with its issue.
"""
from .torch_backend import TorchExperts
from .numba_backend import NumbaExperts  # noqa: F401  (CPU kernels, hetero_rt.kernels.moe)

__all__ = ["TorchExperts"]
