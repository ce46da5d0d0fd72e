"""llama.cpp's own routed-expert matmuls on the same bytes, for the benchmark: the ggml graph that
llama.cpp builds for a MoE FFN (build_moe_ffn: ggml_mul_mat_id for gate and up, swiglu, mul_mat_id
for down, times the routing weights), run by ggml's CPU backend through ctypes on the libraries that
llama-cpp-python ships. The expert weights are copied once into a ggml context in the same block
layout (GGUF bytes are ggml bytes), so both sides read the same formats from the same kind of
memory. ggml quantizes the activations itself (q8_K / q8_0 / bf16, per weight type): that is
llama.cpp's design, not ours, and the comparison includes it.

Not a part of the runtime; imported only by hetero_rt.bench.kernels when llama_cpp is importable.
Legend: T tokens, K experts per token, E experts, D hidden, I expert inter size.
"""
from __future__ import annotations

import ctypes
import os
import time

import numpy as np

GGML_TYPES = {"fp32": 0, "fp16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q2_k": 10, "q3_k": 11,
              "q4_k": 12, "q5_k": 13, "q6_k": 14, "iq4_xs": 23,
              "bf16": 30}
GGML_TYPE_I32 = 26


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _libs():
    import llama_cpp
    d = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    base = ctypes.CDLL(os.path.join(d, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(os.path.join(d, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sigs = {
        (base, "ggml_init"): (p, [_InitParams]),
        (base, "ggml_free"): (None, [p]),
        (base, "ggml_new_tensor_2d"): (p, [p, i32, i64, i64]),
        (base, "ggml_new_tensor_3d"): (p, [p, i32, i64, i64, i64]),
        (base, "ggml_mul_mat_id"): (p, [p, p, p, p]),
        (base, "ggml_swiglu_split"): (p, [p, p, p]),
        (base, "ggml_mul"): (p, [p, p, p]),
        (base, "ggml_new_graph"): (p, [p]),
        (base, "ggml_build_forward_expand"): (None, [p, p]),
        (base, "ggml_get_data"): (p, [p]),
        (base, "ggml_nbytes"): (ctypes.c_size_t, [p]),
        (base, "ggml_type_name"): (ctypes.c_char_p, [i32]),
        (cpu, "ggml_cpu_init"): (None, []),
        (cpu, "ggml_graph_compute_with_ctx"): (i32, [p, p, i32]),
        (cpu, "ggml_cpu_has_avx512"): (i32, []),
        (cpu, "ggml_cpu_has_avx512_vnni"): (i32, []),
    }
    for (lib, name), (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    cpu.ggml_cpu_init()
    return base, cpu


def available() -> bool:
    try:
        _libs()
        return True
    except (ImportError, OSError, AttributeError):
        return False


class GgmlMoE:
    """The routed-expert FFN of llama.cpp over w1, w3 (E, I, RB13) and w2 (E, D, RB2) uint8 ggml bytes."""

    def __init__(self, w1: np.ndarray, w3: np.ndarray, w2: np.ndarray, fmt13: str, fmt2: str,
                 dim: int, inter: int, max_tokens: int, k: int, threads: int):
        self.ctx = None
        self.base, self.cpu = _libs()
        for f in (fmt13, fmt2):
            if f not in GGML_TYPES:
                raise ValueError(f"llama.cpp reference: no ggml type for weight format {f!r}")
            if self.base.ggml_type_name(GGML_TYPES[f]).decode().lower().replace("_", "") != f.replace("_", "").replace("fp", "f"):
                raise RuntimeError(f"ggml type code {GGML_TYPES[f]} is not {f} in this llama.cpp build")
        n_exp = w1.shape[0]
        t, self.threads, self.k, self.dim, self.n_experts = max_tokens, threads, k, dim, n_exp
        self.max_tokens = max_tokens
        act = 4 * t * k * (4 * inter + 3 * dim) + 8 * t * (dim + k)          # fp32 intermediates
        # + work buffers: ggml_graph_compute_with_ctx takes a new one from the context on every call
        size = w1.nbytes + w3.nbytes + w2.nbytes + 2 * act + (512 << 20)
        self.ctx = self.base.ggml_init(_InitParams(size, None, False))
        if not self.ctx:
            raise MemoryError(f"ggml_init of {size / 2**30:.2f} GiB failed")
        b = self.base
        tw1 = b.ggml_new_tensor_3d(self.ctx, GGML_TYPES[fmt13], dim, inter, n_exp)   # ne = (D, I, E)
        tw3 = b.ggml_new_tensor_3d(self.ctx, GGML_TYPES[fmt13], dim, inter, n_exp)
        tw2 = b.ggml_new_tensor_3d(self.ctx, GGML_TYPES[fmt2], inter, dim, n_exp)
        for tensor, w in ((tw1, w1), (tw3, w3), (tw2, w2)):
            if b.ggml_nbytes(tensor) != w.nbytes:
                raise ValueError(f"ggml tensor of {b.ggml_nbytes(tensor)} bytes for {w.nbytes} bytes of weights")
            ctypes.memmove(b.ggml_get_data(tensor), w.ctypes.data, w.nbytes)
        self.graphs = {}
        self._weights = (tw1, tw3, tw2)

    def _graph(self, tokens: int):
        """(graph, x (D, 1, T) f32, ids (K, T) i32, weights (1, K, T) f32, out (D, K, T)) for T tokens."""
        if tokens not in self.graphs:
            b, ctx = self.base, self.ctx
            tw1, tw3, tw2 = self._weights
            x = b.ggml_new_tensor_3d(ctx, 0, self.dim, 1, tokens)
            ids = b.ggml_new_tensor_2d(ctx, GGML_TYPE_I32, self.k, tokens)
            wts = b.ggml_new_tensor_3d(ctx, 0, 1, self.k, tokens)
            gate = b.ggml_mul_mat_id(ctx, tw1, x, ids)                       # (I, K, T)
            up = b.ggml_mul_mat_id(ctx, tw3, x, ids)
            h = b.ggml_swiglu_split(ctx, gate, up)
            out = b.ggml_mul(ctx, b.ggml_mul_mat_id(ctx, tw2, h, ids), wts)  # (D, K, T) * w
            graph = b.ggml_new_graph(ctx)
            b.ggml_build_forward_expand(graph, out)
            self.graphs[tokens] = graph, x, ids, wts, out
        return self.graphs[tokens]

    def run(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """x (T, D) fp32, ids (T, K), weights (T, K) -> (T, D): sum over k of the weighted experts
        (that last sum in numpy, outside the timed graph: llama.cpp adds the K views, D*K adds)."""
        return self.compute(x, ids, weights)[0].sum(axis=1)

    def compute(self, x, ids, weights):
        """Runs the graph; returns ((T, K, D) weighted expert outputs, seconds of graph compute)."""
        t = x.shape[0]
        if x.shape != (t, self.dim) or ids.shape != (t, self.k) or weights.shape != (t, self.k) or t > self.max_tokens:
            raise ValueError(f"x {x.shape}, ids {ids.shape}, weights {weights.shape}: expected (T, {self.dim}), "
                             f"(T, {self.k}), (T, {self.k}) with T <= {self.max_tokens}")
        graph, tx, tids, twts, out = self._graph(t)
        b = self.base
        for tensor, a, dt in ((tx, x, np.float32), (tids, ids, np.int32), (twts, weights, np.float32)):
            a = np.ascontiguousarray(a, dt)            # held in `a` while memmove reads it
            if tensor == tids and a.size and (a.min() < 0 or a.max() >= self.n_experts):
                raise ValueError(f"expert ids must lie in [0, {self.n_experts})")
            ctypes.memmove(b.ggml_get_data(tensor), a.ctypes.data, a.nbytes)
        t0 = time.perf_counter()
        status = self.cpu.ggml_graph_compute_with_ctx(self.ctx, graph, self.threads)
        seconds = time.perf_counter() - t0
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute failed with status {status}")
        ptr = ctypes.cast(b.ggml_get_data(out), ctypes.POINTER(ctypes.c_float))
        y = np.ctypeslib.as_array(ptr, shape=(t, self.k, self.dim)).copy()
        return y, seconds

    def close(self) -> None:
        if self.ctx:
            self.base.ggml_free(self.ctx)
            self.ctx = None

    def __del__(self):
        self.close()
