"""A 2-D weight kept in its stored format (a GGUF tensor's ggml type, or fp32/bf16/fp16) and
multiplied in place by the numba kernels of kernels.linear: what `format: stored` in the
placement rules gives the dense projections of a GGUF model that run on the CPU.

The model sees an nn.Parameter holding the raw bytes (R, row_bytes) uint8 with this object as its
`.stored` attribute; model.layers.linear(), model.layers.embedding() and quant.fp8.materialize()
dispatch on it. The stored weights of one model share one Scratch (the fp32 block the GEMM path
decodes into), so the decode buffers cost one block, not one per weight.

MLA's kv_b, stored per head by llama.cpp's converter (attn_k_b, attn_v_b), is a StoredKvB: two
StoredWeights multiplied per head (matmul_heads) by the absorbed decode path.

`act` ("fp32" or "int8", as the numba experts' activations): with "int8", few-token matmuls of a
ggml block format quantize x to int8 per 32 columns and use the integer dots (llama.cpp's q8_0
activations); fp formats, block FP8 and the GEMM path stay fp32.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ..quant.ggml import get_format
from .dot import has_int8_dot
from .linear import decode_rows, gather_rows, gemv
from .threads import default_threads, use_threads

GEMV_MAX_TOKENS = 8        # up to this many tokens: one pass over the bytes (gemv); more: blocked GEMM
BLOCK_ROWS = 1024          # rows decoded to fp32 at a time for the GEMM path


class Scratch:
    """An fp32 buffer grown to the largest block asked for; shared by the stored weights of one model,
    whose forward runs in one thread at a time."""

    def __init__(self):
        self._buf = np.empty(0, np.float32)

    def block(self, rows: int, cols: int) -> np.ndarray:
        if self._buf.size < rows * cols:
            self._buf = np.empty(rows * cols, np.float32)
        return self._buf[:rows * cols].reshape(rows, cols)


class StoredWeight:
    def __init__(self, raw: np.ndarray, fmt: str, threads: int | None = None, scratch: Scratch | None = None,
                 dtype: torch.dtype = torch.float32, act: str = "fp32"):
        """dtype: of the rows embedding() returns (matmul returns x's dtype)."""
        self.fmt = get_format(fmt)
        self.act = act
        if raw.dtype != np.uint8 or raw.ndim != 2 or not raw.flags.c_contiguous:
            raise ValueError(f"stored weight: expected C-contiguous uint8 (rows, row_bytes), got {raw.dtype} "
                             f"{raw.shape}")
        self.raw = raw
        self.shape = (raw.shape[0], self.fmt.cols(raw.shape[1]))
        self.threads = threads or default_threads()
        self.scratch = scratch or Scratch()
        self.dtype = dtype

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> (..., R) in x's dtype."""
        if x.device.type != "cpu":
            raise ValueError(f"stored-format weights run on the CPU; x is on {x.device}")
        lead = x.shape[:-1]
        xs = x.detach().reshape(-1, x.shape[-1])
        if xs.dtype != torch.float32 or not xs.is_contiguous():
            xs = xs.to(torch.float32).contiguous()
        rows, cols = self.shape
        if xs.shape[1] != cols:
            raise ValueError(f"stored weight {self.shape}: x has {xs.shape[1]} features")
        use_threads(self.threads)
        if xs.shape[0] <= GEMV_MAX_TOKENS:
            y = np.empty((xs.shape[0], rows), np.float32)
            gemv(self.fmt.code, self.raw, xs.numpy(), y, self._int8, 1)
            out = torch.from_numpy(y)
            if len(lead) == 1 and x.dtype == torch.float32:
                return out
        else:
            out = torch.empty(xs.shape[0], rows, dtype=torch.float32)
            block = self.scratch.block(min(BLOCK_ROWS, rows), cols)
            for r0 in range(0, rows, BLOCK_ROWS):
                n = min(BLOCK_ROWS, rows - r0)
                blk = block[:n]
                decode_rows(self.fmt.code, self.raw, r0, blk)
                out[:, r0:r0 + n] = xs @ torch.from_numpy(blk).T
        return out.reshape(*lead, rows).to(x.dtype)

    def matmul_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head matrices stacked as the rows: W (G * Rg, C), x (T, G, C) fp32 -> (T, G, Rg) fp32,
        head g of token t multiplied by rows g * Rg .. (g + 1) * Rg - 1 (one pass over the bytes for
        few tokens; more: each head's block decoded and multiplied by torch)."""
        t, g, c = x.shape
        rows = self.shape[0]
        if c != self.shape[1] or rows % g:
            raise ValueError(f"stored weight {self.shape}: x {tuple(x.shape)} is not (tokens, heads, {self.shape[1]}) "
                             f"with the rows a multiple of the heads")
        xs = x.detach().to(torch.float32).contiguous()
        if t <= GEMV_MAX_TOKENS:
            use_threads(self.threads)
            y = np.empty((t, rows), np.float32)
            gemv(self.fmt.code, self.raw, xs.reshape(t * g, c).numpy(), y, self._int8, g)
            return torch.from_numpy(y).view(t, g, rows // g)
        return torch.einsum("tgc,grc->tgr", xs, self.dequantize().view(g, rows // g, c))

    @property
    def act(self) -> str:
        return self._act

    @act.setter
    def act(self, value: str) -> None:
        if value not in ("fp32", "int8"):
            raise ValueError(f"stored weight: act must be 'fp32' or 'int8', got {value!r}")
        self._act = value
        self._int8 = value == "int8" and bool(has_int8_dot(self.fmt.code))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (T,) int64 -> the rows (T, C) in self.dtype (an embedding lookup, decoded in place)."""
        idx = ids.detach().to("cpu", torch.int64).contiguous().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise IndexError(f"stored weight {self.shape}: row ids must lie in [0, {self.shape[0]}), got "
                             f"min {idx.min()} max {idx.max()}")
        out = np.empty((idx.shape[0], self.shape[1]), np.float32)
        use_threads(self.threads)
        gather_rows(self.fmt.code, self.raw, idx, out)
        return torch.from_numpy(out).to(self.dtype)

    def dequantize(self) -> torch.Tensor:
        out = np.empty(self.shape, np.float32)
        decode_rows(self.fmt.code, self.raw, 0, out)
        return torch.from_numpy(out)


class StoredKvB:
    """MLA's kv_b projection as a GGUF stores it for absorbed decode: k_b (H * C, N), head h's rows
    mapping its N no-rope query dims to the C latent dims, and v_b (H * V, C), each a StoredWeight in
    its own ggml type. absorb() and expand() are the decode path's per-head products, read in place;
    matmul() / dequantize() give the dense wkv_b (H * (N + V), C) of the naive (prefill) path,
    decoded on each call (2 * H * C * N values: no fp32 copy kept)."""

    def __init__(self, k_b: StoredWeight, v_b: StoredWeight, heads: int):
        n, c = k_b.shape[1], v_b.shape[1]
        if k_b.shape[0] != heads * c or v_b.shape[0] % heads:
            raise ValueError(f"kv_b: k_b {k_b.shape} and v_b {v_b.shape} are not (H * C, N) and (H * V, C) for "
                             f"H = {heads}, C = {c}")
        self.k_b, self.v_b, self.heads = k_b, v_b, heads
        self.n, self.c, self.v = n, c, v_b.shape[0] // heads
        self.shape = (heads * (n + self.v), c)
        self.raw = k_b.raw                 # the bytes the model's parameter holds (v_b's are held here)
        self.fmt = k_b.fmt
        self.scratch = k_b.scratch

    @property
    def threads(self) -> int:
        return self.k_b.threads

    @threads.setter
    def threads(self, n: int) -> None:
        self.k_b.threads = self.v_b.threads = n

    @property
    def act(self) -> str:
        """Always "fp32": the per-head products keep exact activations whatever the placement asks for
        (their bytes are ~2% of a decode token's; with int8 there, the whole-model agreement with
        llama.cpp on its own Q4_K_M file fell from 2.6e-2 to 0.35, one routing decision flipped)."""
        return "fp32"

    @act.setter
    def act(self, value: str) -> None:
        if value not in ("fp32", "int8"):
            raise ValueError(f"stored kv_b: act must be 'fp32' or 'int8', got {value!r}")

    def absorb(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope (T, H, N) -> (T, H, C): q_nope[t, h] times head h's W_UK."""
        return self.k_b.matmul_heads(q_nope)

    def expand(self, o_lat: torch.Tensor) -> torch.Tensor:
        """o_lat (T, H, C) -> (T, H, V): head h's W_UV times o_lat[t, h]."""
        return self.v_b.matmul_heads(o_lat)

    def dequantize(self) -> torch.Tensor:
        h = self.heads
        k = self.k_b.dequantize().view(h, self.c, self.n).transpose(1, 2)     # (H, N, C)
        v = self.v_b.dequantize().view(h, self.v, self.c)                     # (H, V, C)
        return torch.cat([k, v], dim=1).reshape(self.shape)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) @ self.dequantize().T).to(x.dtype)


def stored_parameter(raw: np.ndarray, fmt: str, threads: int | None = None, scratch: Scratch | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.nn.Parameter:
    return _parameter(StoredWeight(raw, fmt, threads, scratch, dtype))


def stored_kv_b_parameter(k_b: np.ndarray, k_fmt: str, v_b: np.ndarray, v_fmt: str, heads: int,
                          scratch: Scratch | None = None) -> torch.nn.Parameter:
    """k_b (H * C, row bytes) and v_b (H * V, row bytes) raw -> the wkv_b parameter (StoredKvB)."""
    return _parameter(StoredKvB(StoredWeight(k_b, k_fmt, scratch=scratch), StoredWeight(v_b, v_fmt, scratch=scratch),
                                heads))


def _parameter(weight) -> torch.nn.Parameter:
    with warnings.catch_warnings():  # read-only memory map: the parameter is never written
        warnings.simplefilter("ignore", UserWarning)
        param = torch.nn.Parameter(torch.from_numpy(weight.raw), requires_grad=False)
    param.stored = weight
    return param
