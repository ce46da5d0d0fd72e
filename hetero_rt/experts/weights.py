"""ExpertWeights: one MoE layer's routed experts as a checkpoint loader hands them to the builder,
the same for safetensors and GGUF files.

Legend: E experts, I expert intermediate size, D hidden size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import ModelArgs
from ..quant.ggml import format_of_dtype


def stacked_shapes(args: ModelArgs) -> dict[str, tuple[int, int, int]]:
    """The shapes of one layer's stacked projections: w1, w3 (E, I, D), w2 (E, D, I)."""
    e, i, d = args.n_routed_experts, args.moe_intermediate_size, args.hidden_size
    return {"w1": (e, i, d), "w3": (e, i, d), "w2": (e, d, i)}


@dataclass(frozen=True)
class ExpertWeights:
    """w1 (gate) and w3 (up) are (E, I, D), w2 (down) (E, D, I). Each is either a torch tensor in
    fp32/bf16/fp16 (its format follows its dtype) or raw bytes, uint8 (E, rows, row_bytes), in the
    format `fmt13` (w1, w3) or `fmt2` (w2), named as in hetero_rt.quant.ggml; raw bytes are usually
    read-only views of the checkpoint's memory map."""
    layer: int
    w1: torch.Tensor | np.ndarray
    w3: torch.Tensor | np.ndarray
    w2: torch.Tensor | np.ndarray
    fmt13: str
    fmt2: str
    shape: tuple[int, int, int]        # (E, I, D)

    @classmethod
    def dense(cls, layer: int, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> "ExpertWeights":
        fmt = format_of_dtype(w1.dtype)
        return cls(layer, w1, w3, w2, fmt, fmt, tuple(w1.shape))

    @property
    def is_dense(self) -> bool:
        """All three are torch tensors (what the torch backend runs)."""
        return all(isinstance(w, torch.Tensor) for w in (self.w1, self.w3, self.w2))
