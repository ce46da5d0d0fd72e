"""Routed experts on the CPU in numba kernels (hetero_rt.kernels.moe), weights read in place.

Weights are kept as raw bytes in the format they arrive in (hetero_rt.quant.ggml): w1, w3 (E, I, RB13)
and w2 (E, D, RB2) uint8, each expert one contiguous block; fp32/bf16/fp16 tensors are viewed, not
copied. Activations are fp32 (`act="fp32"`, the default: equal to the dequantized reference up to
summation order). `act="int8"` makes the decode kernels quantize the activations of block-format
weights to int8 per 32 columns and sum integer products (llama.cpp's q8_0 activations); off by
default, parity ~1e-2 relative (tests/test_numba_experts.py); experts with more tokens in a call
than the decode kernels take (kernels.moe.DECODE_MAX_TOKENS*) stay fp32 (the tiled kernels). The kernels
release the GIL; `threads` (default: physical cores) is applied with numba.set_num_threads on every
call. Weights may be read-only (views of a read-only memory map).

Legend: T tokens, D hidden, I expert intermediate size, E experts, K experts per token.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..kernels.moe import DECODE_MAX_TOKENS, moe_forward
from ..kernels.threads import default_threads, use_threads
from ..quant.ggml import FORMATS, QUANT_FORMATS, get_format, quantize
from . import RoutedExperts

# Row-tile heights: decode wants many small parallel tasks, prefill wants each decoded weight
# chunk reused over many rows of activations (see hetero_rt.kernels.moe).
DECODE_TILE, PREFILL_TILE = 16, 64
PREFILL_MIN_TOKENS_PER_EXPERT = 8
# Formats used for w2 when its rows (I) are not a multiple of 256; llama.cpp falls back likewise.
KQUANT_FALLBACK = {"q4_k": "q8_0", "q5_k": "q8_0", "q6_k": "q8_0", "q2_k": "q8_0", "q3_k": "q8_0", "iq4_xs": "q8_0"}
ACTIVATIONS = ("fp32", "int8")


class NumbaExperts(RoutedExperts):
    """experts(x (T, D), ids (T, K) int64, weights (T, K) fp32) -> (T, D) in x's dtype."""

    def __init__(self, w1, w3, w2, fmt: str = "fp32", fmt_down: str | None = None,
                 threads: int | None = None, act: str = "fp32"):
        """w1, w3: (E, I, D) and w2: (E, D, I) for fp32/bf16/fp16 (torch tensors or numpy arrays:
        float32, bfloat16 / uint16 bits, float16), or raw bytes as uint8 in any format (ggml block bytes
        for the quant formats):
        uint8 w1, w3 (E, I, D // block * block_bytes) and w2 (E, D, I // block * block_bytes).
        `fmt` is the format of w1 and w3, `fmt_down` that of w2 (default: fmt). `act`: "fp32" or
        "int8" (see the module docstring); an attribute, may be changed between calls."""
        super().__init__()
        self.act = act
        self.fmt13, self.fmt2 = get_format(fmt), get_format(fmt_down or fmt)
        self._keep = (w1, w3, w2)  # the raw arrays below may be views of these
        self.w1 = _as_bytes(w1, self.fmt13, "w1")
        self.w3 = _as_bytes(w3, self.fmt13, "w3")
        self.w2 = _as_bytes(w2, self.fmt2, "w2")
        self.n_experts, self.inter_dim = self.w1.shape[:2]
        self.dim = self.fmt13.cols(self.w1.shape[2])
        if self.w3.shape != self.w1.shape:
            raise ValueError(f"w3 shape {self.w3.shape} differs from w1 {self.w1.shape} (both (E, I, bytes))")
        want = (self.n_experts, self.dim, self.fmt2.row_bytes(self.inter_dim))
        if self.w2.shape != want:
            raise ValueError(f"w2 has shape {self.w2.shape} as bytes; for E={self.n_experts}, D={self.dim}, "
                             f"I={self.inter_dim} in {self.fmt2.name} expected {want}")
        self.threads = threads or default_threads()

    @property
    def act(self) -> str:
        return self._act

    @act.setter
    def act(self, value: str) -> None:
        if value not in ACTIVATIONS:
            raise ValueError(f"numba experts: act must be one of {ACTIVATIONS}, got {value!r}")
        self._act = value
        self.compile_seconds: float | None = None

    @classmethod
    def from_torch(cls, experts, fmt: str = "bf16", threads: int | None = None,
                   fmt_down: str | None = None, act: str = "fp32") -> "NumbaExperts":
        """Convert a TorchExperts (w1, w3 (E, I, D), w2 (E, D, I)), quantizing to `fmt`. K-quant
        w2 whose I is not a multiple of 256 falls back to KQUANT_FALLBACK unless fmt_down is given."""
        f = get_format(fmt)
        inter = experts.w1.shape[1]
        if fmt_down is None:
            fmt_down = KQUANT_FALLBACK[fmt] if f.block == 256 and inter % 256 else fmt
        ws = [experts.w1, experts.w3, experts.w2]
        return cls(*(_convert(w.detach(), name) for w, name in zip(ws, [fmt, fmt, fmt_down])),
                   fmt=fmt, fmt_down=fmt_down, threads=threads, act=act)

    def weight_bytes(self, n_experts: int = 1) -> int:
        """Bytes of weights read for n_experts experts."""
        return n_experts * (self.w1[0].nbytes + self.w3[0].nbytes + self.w2[0].nbytes)

    def warmup(self) -> float:
        """Compile (or load from numba's cache) every kernel a call can take for this format, the
        decode kernels (2 tokens on one expert) and the tiled prefill kernels (more tokens on one
        expert than the decode kernels take); returns seconds taken."""
        t0 = time.perf_counter()
        for tokens, tile in ((2, DECODE_TILE), (DECODE_MAX_TOKENS + 1, PREFILL_TILE)):
            x = np.zeros((tokens, self.dim), np.float32)
            ids = np.zeros((tokens, 1), np.int64)
            self.run(x, ids, np.ones((tokens, 1), np.float32), tile_up=tile, tile_down=tile)
        self.compile_seconds = time.perf_counter() - t0
        return self.compile_seconds

    def routed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        home, dtype = x.device, x.dtype
        xs = _cpu_array(x, np.float32, "x")
        y = self.run(xs, _cpu_array(ids, np.int64, "ids"), _cpu_array(weights, np.float32, "weights"))
        return torch.from_numpy(y).to(home, dtype)

    def run(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
            tile_up: int | None = None, tile_down: int | None = None) -> np.ndarray:
        """numpy entry point: x (T, D) fp32, ids (T, K) int64, weights (T, K) fp32 -> (T, D) fp32."""
        self._check_inputs(x, ids, weights)
        tokens_per_expert = ids.size / max(1, min(self.n_experts, ids.size))
        tile = PREFILL_TILE if tokens_per_expert >= PREFILL_MIN_TOKENS_PER_EXPERT else DECODE_TILE
        use_threads(self.threads)
        return moe_forward(x, ids, weights, self.w1, self.w3, self.w2, self.fmt13.code, self.fmt2.code,
                           tile_up or tile, tile_down or tile, self._act == "int8")

    def _check_inputs(self, x, ids, weights) -> None:
        for name, a, dt in (("x", x, np.float32), ("ids", ids, np.int64), ("weights", weights, np.float32)):
            if not isinstance(a, np.ndarray) or a.dtype != dt or a.ndim != 2:
                raise TypeError(f"numba experts: {name} must be a 2-D {np.dtype(dt).name} array, got "
                                f"{getattr(a, 'dtype', type(a))} with shape {getattr(a, 'shape', None)}")
            if not a.flags.c_contiguous:
                raise ValueError(f"numba experts: {name} {a.shape} must be C-contiguous")
        if x.shape[1] != self.dim:
            raise ValueError(f"numba experts: x has hidden size {x.shape[1]}, the experts expect {self.dim}")
        if ids.shape != weights.shape or ids.shape[0] != x.shape[0]:
            raise ValueError(f"numba experts: ids {ids.shape} and weights {weights.shape} must both be "
                             f"(T, K) with T = {x.shape[0]} tokens of x")
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_experts):
            raise ValueError(f"numba experts: expert ids must lie in [0, {self.n_experts}), "
                             f"got min {ids.min()} max {ids.max()}")

    def extra_repr(self) -> str:
        return (f"E={self.n_experts}, D={self.dim}, I={self.inter_dim}, fmt={self.fmt13.name}, "
                f"fmt_down={self.fmt2.name}, threads={self.threads}, act={self._act}")


def _cpu_array(t: torch.Tensor, dtype, name: str) -> np.ndarray:
    if not t.is_contiguous():
        raise ValueError(f"numba experts: {name} {tuple(t.shape)} must be contiguous")
    return t.detach().to("cpu", _TORCH[dtype]).numpy()


_TORCH = {np.float32: torch.float32, np.int64: torch.int64}


def _as_bytes(w, fmt, name: str) -> np.ndarray:
    """Stacked weight -> uint8 (E, R, row bytes), a view when the input is already in fmt."""
    if isinstance(w, torch.Tensor):
        if w.device.type != "cpu":
            raise ValueError(f"numba experts: {name} must live in host memory, it is on {w.device}")
        if w.dtype == torch.bfloat16:
            w = w.view(torch.int16)
        w = w.detach().numpy()
    if not isinstance(w, np.ndarray):
        raise TypeError(f"numba experts: {name} must be a torch tensor or numpy array, got {type(w)}")
    if w.ndim != 3:
        raise ValueError(f"numba experts: {name} must be stacked (E, rows, cols), got shape {w.shape}")
    if not w.flags.c_contiguous:
        raise ValueError(f"numba experts: {name} {w.shape} must be C-contiguous (each expert one block)")
    expected = {"fp32": (np.float32,), "bf16": (np.int16, np.uint16), "fp16": (np.float16, np.int16, np.uint16)}
    if w.dtype == np.uint8:  # raw bytes in any format: whole blocks per row
        fmt.cols(w.shape[2])
        return w
    if fmt.name in QUANT_FORMATS:
        if w.dtype != np.uint8:
            raise TypeError(f"numba experts: {name} in {fmt.name} must be raw uint8 block bytes, got {w.dtype}")
        fmt.cols(w.shape[2])  # whole blocks per row
        return w
    if w.dtype not in expected[fmt.name]:
        raise TypeError(f"numba experts: {name} in {fmt.name} must have dtype in "
                        f"{[np.dtype(d).name for d in expected[fmt.name]]}, got {w.dtype}")
    return w.view(np.uint8)


def _convert(w: torch.Tensor, fmt: str) -> np.ndarray:
    """(E, R, C) torch weight -> numpy in fmt: dtype views for fp formats, block bytes for quants."""
    f = FORMATS[fmt]
    f.check_cols(w.shape[-1])
    if fmt == "fp32":
        return w.float().contiguous().numpy()
    if fmt == "bf16":
        return w.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    if fmt == "fp16":
        return w.to(torch.float16).contiguous().numpy()
    e, r, c = w.shape
    return quantize(w.float().reshape(e * r, c).numpy(), fmt).reshape(e, r, -1)


def build(weights, placement, builder) -> NumbaExperts:
    """The registry's builder: the ExpertWeights as they are (stored bytes, or fp32/bf16/fp16 tensors
    viewed as bytes), with the placement's threads and activations."""
    return NumbaExperts(weights.w1, weights.w3, weights.w2, fmt=weights.fmt13, fmt_down=weights.fmt2,
                        threads=placement.threads, act=placement.activations or "fp32")
