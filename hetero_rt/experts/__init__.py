"""The routed-experts seam: the one protocol the model calls, whichever backend runs the experts.

    experts(x (T, D), ids (T, K) int64, weights (T, K) fp32, shared=None) -> (T, D) in x's dtype

computes sum_k weights[t, k] * FFN_{ids[t, k]}(x[t]) with FFN(x) = w2(silu(w1 x) * w3 x), plus
shared(x) when the layer's shared experts are given. The shared experts are handed to the backend
(rather than added by the model) so that a backend may run them while the routed experts run
elsewhere: `hetero` computes them on the GPU while the CPU computes the routed ones. Hidden states
cross devices inside the backend and nowhere else; the result is on x's device.

Backends (registry.py declares each once: name, devices, options, formats run in place):
  torch   torch_backend.TorchExperts   stacked tensors on the placement device (the reference)
  numba   numba_backend.NumbaExperts   CPU kernels over the stored bytes (kernels.moe)
  hetero  hetero.HeteroExperts         numba on the CPU plus a GPU expert cache, overlapped
Every layer's experts are built once by build.ExpertsBuilder from the ExpertWeights (weights.py) a
checkpoint loader hands over.

Legend: T tokens, D hidden size, K experts per token.
"""
from __future__ import annotations

import torch
from torch import nn


class RoutedExperts(nn.Module):
    """Base of the backends: forward adds the shared experts to `routed`; a backend that overlaps
    them with its routed work overrides forward."""

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                shared: nn.Module | None = None) -> torch.Tensor:
        y = self.routed(x, ids, weights)
        return y if shared is None else y + shared(x)

    def routed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


from .torch_backend import TorchExperts  # noqa: E402  (the backends derive from RoutedExperts)
from .numba_backend import NumbaExperts  # noqa: E402
from .weights import ExpertWeights  # noqa: E402
from .build import ExpertsBuilder  # noqa: E402

__all__ = ["RoutedExperts", "TorchExperts", "NumbaExperts", "ExpertWeights", "ExpertsBuilder"]
