"""The one build path of routed experts: each MoE layer's ExpertWeights (from either loader) and its
placement become that layer's experts module, built once as the plan says, by the backend the
registry names. What layers of one backend share (the hetero session) is made here, once.

Use: builder.build(weights, placement) for every MoE layer, then build the model with
`make_experts=builder.experts_for`, which hands each layer its module as the model is constructed.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import PREFILL_CHUNK, ModelArgs
from ..errors import HeteroRTError
from . import registry
from .hetero import HeteroSession, link
from .weights import ExpertWeights


class ExpertsBuilder:
    def __init__(self, args: ModelArgs, main_device: torch.device | str, main_dtype: torch.dtype):
        self.args, self.main_device, self.main_dtype = args, torch.device(main_device), main_dtype
        self.modules: dict[int, nn.Module] = {}
        self._session = None
        self._previous: nn.Module | None = None   # the last MoE layer handed to the model

    def build(self, weights: ExpertWeights, placement) -> nn.Module:
        """placement: the layer's placement.plan.Placement (backend, device, threads, activations, hetero)."""
        if weights.layer in self.modules:
            raise HeteroRTError(f"layer {weights.layer}: routed experts built twice")
        module = registry.get(placement.backend).build(weights, placement, self)
        self.modules[weights.layer] = module
        return module

    def experts_for(self, layer: int, gate: nn.Module) -> nn.Module:
        """The model's experts factory: the module built for `layer`, linked to the previous MoE
        layer's (a hetero layer predicts the next layer's experts with that layer's gate)."""
        try:
            module = self.modules[layer]
        except KeyError:
            raise HeteroRTError(f"layer {layer}: no routed experts were built for this MoE layer") from None
        link(self._previous, gate, module)
        self._previous = module
        return module

    def hetero_session(self):
        """The session every hetero layer of this model shares (made on first use)."""
        if self._session is None:
            self._session = HeteroSession(self.main_device, self.main_dtype, self.args.hidden_size,
                                          self.args.num_experts_per_tok, PREFILL_CHUNK)
        return self._session
