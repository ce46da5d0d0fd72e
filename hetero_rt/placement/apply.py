"""apply(plan): turn a resolved Plan into the pieces the loader needs: a routed-experts factory
(backend per layer) and, for every model parameter, the device and dtype its weight goes to.
The weights then stream from the memory map straight to that device, one tensor at a time."""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from ..checkpoint.names import hf_name
from ..config import ModelArgs
from ..errors import HeteroRTError
from ..experts import TorchExperts
from ..experts.numba_backend import NumbaExperts
from .plan import Plan

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NUMBA_FORMATS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_EXPERT_PARAM = re.compile(r"^layers\.(\d+)\.ffn\.experts\.")

Where = Callable[[str], tuple[torch.device, torch.dtype, str | None]]


def experts_factory(plan: Plan, args: ModelArgs) -> Callable[[int], nn.Module]:
    def make(layer: int) -> nn.Module:
        backend = plan.experts(layer).backend
        if backend in ("torch", "numba", "hetero"):  # numba/hetero: filled like torch's, converted in finish
            return TorchExperts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size)
        raise HeteroRTError(f"{plan.source}: routed-experts backend {backend!r} for layer {layer} is unknown")
    return make


def finish(model: nn.Module, plan: Plan) -> None:
    """After the weights are loaded: hand each layer placed on the numba or hetero backend its stacked
    expert weights (zero-copy byte views when already in fp32/bf16/fp16 host memory); then wrap the
    hetero layers in the scheduler (hetero_rt.experts.hetero), its cache on the main device."""
    hetero = {}
    for layer, block in enumerate(model.layers):
        experts = getattr(block.ffn, "experts", None)
        backend = plan.experts(layer).backend if experts is not None else None
        if backend not in ("numba", "hetero"):
            continue
        if not isinstance(experts, NumbaExperts):  # the GGUF loader builds them over the memory map itself
            fmt = _NUMBA_FORMATS[experts.w1.dtype]
            experts = block.ffn.experts = NumbaExperts.from_torch(experts, fmt, threads=plan.experts(layer).threads)
        experts.act = plan.experts(layer).activations or "fp32"
        if plan.experts(layer).backend == "hetero":
            hetero[layer] = plan.experts(layer).hetero
    if hetero:
        from ..experts.hetero import install
        install(model, hetero, plan.main.device)


def param_placement(plan: Plan, main_dtype: torch.dtype) -> Where:
    """where(our parameter name) -> (device, dtype, weight format or None)."""
    main = torch.device(plan.main.device)

    def where(name: str) -> tuple[torch.device, torch.dtype, str | None]:
        m = _EXPERT_PARAM.match(name)
        if m is None:
            return main, main_dtype, plan.owner(hf_name(name)).format
        p = plan.experts(int(m.group(1)))
        return torch.device(p.device), TORCH_DTYPES[p.dtype] if p.dtype else main_dtype, None
    return where
