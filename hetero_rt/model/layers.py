"""Small building blocks shared by attention and MoE: RMSNorm and the SwiGLU feed-forward.

Legend: T tokens, D hidden size, I intermediate size.
Weights may be any float dtype or block FP8; norms compute in fp32 and return the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.fp8 import materialize


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:   # one fused op (decode: ~50 per token)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x @ w.T with w (out, in); a block-FP8 weight is expanded to x's dtype for the product; a
    weight in its stored GGUF format (`.stored`, kernels.stored) is multiplied in place on the CPU."""
    stored = getattr(w, "stored", None)
    if stored is not None:
        return stored.matmul(x)
    return F.linear(x, materialize(w, x.dtype))


def embedding(ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """ids (T,) -> rows (T, D) of w (Vocab, D); a weight in its stored GGUF format is decoded row by row
    in place."""
    stored = getattr(w, "stored", None)
    return stored.rows(ids) if stored is not None else F.embedding(ids, w)


class MLP(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x). Dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(inter_dim, dim))  # gate_proj (I, D)
        self.w3 = nn.Parameter(torch.empty(inter_dim, dim))  # up_proj   (I, D)
        self.w2 = nn.Parameter(torch.empty(dim, inter_dim))  # down_proj (D, I)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, D) -> (T, D)
        return linear(F.silu(linear(x, self.w1)) * linear(x, self.w3), self.w2)
