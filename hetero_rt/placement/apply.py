"""apply(plan): turn a resolved Plan into the pieces the loader needs: a routed-experts factory
(backend per layer) and, for every model parameter, the device and dtype its weight goes to.
The weights then stream from the memory map straight to that device, one tensor at a time."""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from ..config import ModelArgs
from ..errors import HeteroRTError
from ..experts import TorchExperts
from .plan import Plan

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EXPERT_PARAM = re.compile(r"^layers\.(\d+)\.ffn\.experts\.")

Where = Callable[[str], tuple[torch.device, torch.dtype]]


def experts_factory(plan: Plan, args: ModelArgs) -> Callable[[int], nn.Module]:
    def make(layer: int) -> nn.Module:
        backend = plan.experts(layer).backend
        if backend == "torch":
            return TorchExperts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size)
        raise HeteroRTError(f"{plan.source}: routed-experts backend {backend!r} for layer {layer} is not "
                            f"available in this build; use backend: torch")
    return make


def param_placement(plan: Plan, main_dtype: torch.dtype) -> Where:
    main = torch.device(plan.main.device)

    def where(name: str) -> tuple[torch.device, torch.dtype]:
        m = _EXPERT_PARAM.match(name)
        if m is None:
            return main, main_dtype
        p = plan.experts(int(m.group(1)))
        return torch.device(p.device), TORCH_DTYPES[p.dtype] if p.dtype else main_dtype
    return where
