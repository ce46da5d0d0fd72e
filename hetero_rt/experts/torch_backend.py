"""Reference routed-experts backend in plain torch. Weights stored stacked per layer so that each
expert is one contiguous block: w1, w3 (E, I, D) and w2 (E, D, I).

Legend: T tokens, D hidden, I expert intermediate size, E experts, K experts per token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HeteroRTError
from . import RoutedExperts


class TorchExperts(RoutedExperts):
    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # gate_proj (E, I, D)
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # up_proj   (E, I, D)
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # down_proj (E, D, I)

    @classmethod
    def from_weights(cls, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> "TorchExperts":
        """Around stacked tensors as they are (no copy): w1, w3 (E, I, D), w2 (E, D, I)."""
        with torch.device("meta"):
            experts = cls(w1.shape[0], w1.shape[2], w1.shape[1])
        experts.w1, experts.w3, experts.w2 = (nn.Parameter(w, requires_grad=False) for w in (w1, w3, w2))
        return experts

    def routed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Runs where the weights live; hidden states cross devices here and only here."""
        home, dtype = x.device, x.dtype
        dev = self.w1.device
        x, ids, weights = x.to(dev, self.w1.dtype), ids.to(dev), weights.to(dev)
        return self.compute(x, ids, weights).to(home, dtype)

    def compute(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # (T, D) accumulate in fp32
        flat_ids = ids.flatten()                                         # (T*K,)
        order = flat_ids.argsort()
        counts = torch.bincount(flat_ids, minlength=self.n_experts).tolist()
        token_of = order // ids.shape[1]                                 # token index per sorted slot
        w_sorted = weights.flatten()[order]
        pos = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok = token_of[pos:pos + n]
            xe = x[tok]                                                  # (n, D)
            h = F.silu(F.linear(xe, self.w1[e])) * F.linear(xe, self.w3[e])
            out = F.linear(h, self.w2[e]).float() * w_sorted[pos:pos + n, None]
            y.index_add_(0, tok, out)
            pos += n
        return y


def build(weights, placement, builder) -> TorchExperts:
    """The registry's builder: weights (experts.weights.ExpertWeights, torch tensors) moved to the
    placement's device."""
    if not weights.is_dense:
        raise HeteroRTError(f"layer {weights.layer}: the torch backend runs tensors in the placement dtype, but "
                            f"the loader handed it {weights.fmt13}/{weights.fmt2} bytes")
    dev = torch.device(placement.device)
    return TorchExperts.from_weights(*(w.to(dev) for w in (weights.w1, weights.w3, weights.w2)))
