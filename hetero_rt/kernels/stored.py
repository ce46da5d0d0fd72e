"""A 2-D weight kept in its stored format (a GGUF tensor's ggml type, or fp32/bf16/fp16) and
multiplied in place by the numba kernels of kernels.linear: what `format: stored` in the
placement rules gives the dense projections of a GGUF model that run on the CPU.

The model sees an nn.Parameter holding the raw bytes (R, row_bytes) uint8 with this object as its
`.stored` attribute; model.layers.linear() and quant.fp8.materialize() dispatch on it.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ..quant.ggml import get_format
from .linear import decode_rows, gemv
from .threads import default_threads, use_threads

GEMV_MAX_TOKENS = 8        # up to this many tokens: one pass over the bytes (gemv); more: blocked GEMM
BLOCK_ROWS = 1024          # rows decoded to fp32 at a time for the GEMM path


class StoredWeight:
    def __init__(self, raw: np.ndarray, fmt: str, threads: int | None = None):
        self.fmt = get_format(fmt)
        if raw.dtype != np.uint8 or raw.ndim != 2 or not raw.flags.c_contiguous:
            raise ValueError(f"stored weight: expected C-contiguous uint8 (rows, row_bytes), got {raw.dtype} "
                             f"{raw.shape}")
        self.raw = raw
        self.shape = (raw.shape[0], self.fmt.cols(raw.shape[1]))
        self.threads = threads or default_threads()
        self._block = None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> (..., R) in x's dtype."""
        if x.device.type != "cpu":
            raise ValueError(f"stored-format weights run on the CPU; x is on {x.device}")
        lead = x.shape[:-1]
        xs = x.detach().reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
        rows, cols = self.shape
        if xs.shape[1] != cols:
            raise ValueError(f"stored weight {self.shape}: x has {xs.shape[1]} features")
        use_threads(self.threads)
        if xs.shape[0] <= GEMV_MAX_TOKENS:
            y = np.empty((xs.shape[0], rows), np.float32)
            gemv(self.fmt.code, self.raw, xs.numpy(), y)
            out = torch.from_numpy(y)
        else:
            out = torch.empty(xs.shape[0], rows, dtype=torch.float32)
            if self._block is None:
                self._block = np.empty((min(BLOCK_ROWS, rows), cols), np.float32)
            for r0 in range(0, rows, BLOCK_ROWS):
                n = min(BLOCK_ROWS, rows - r0)
                blk = self._block[:n]
                decode_rows(self.fmt.code, self.raw, r0, blk)
                out[:, r0:r0 + n] = xs @ torch.from_numpy(blk).T
        return out.reshape(*lead, rows).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        out = np.empty(self.shape, np.float32)
        decode_rows(self.fmt.code, self.raw, 0, out)
        return torch.from_numpy(out)


def stored_parameter(raw: np.ndarray, fmt: str, threads: int | None = None) -> torch.nn.Parameter:
    weight = StoredWeight(raw, fmt, threads)
    with warnings.catch_warnings():  # read-only memory map: the parameter is never written
        warnings.simplefilter("ignore", UserWarning)
        param = torch.nn.Parameter(torch.from_numpy(raw), requires_grad=False)
    param.stored = weight
    return param
