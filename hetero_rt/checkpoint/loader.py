"""Build the Transformer on the meta device and fill it from a safetensors checkpoint.

Contract: every parameter of the model is filled from exactly one checkpoint tensor (routed experts:
E tensors each, stacked into one (E, ...) block per layer and handed to the experts builder as
ExpertWeights) with its shape checked; every checkpoint tensor is either used or deliberately
ignored (MTP layers, fp8 scales): anything else is an error, so a checkpoint that does not match
its config.json never runs silently wrong.
Weights whose stored dtype equals the requested dtype stay zero-copy views of the memory map.
"""
from __future__ import annotations

import os
import re
from typing import Callable

import torch
from torch import nn

from ..config import ModelArgs
from ..errors import CheckpointError
from ..experts.weights import ExpertWeights, stacked_shapes
from ..model.transformer import ExpertsFactory, Transformer
from ..quant import fp8
from .names import EXPERT_NAMES, expert_hf_name, hf_name, is_ignored
from .safetensors import SafetensorsCheckpoint

EXPERT_PARAM = re.compile(r"^layers\.(\d+)\.ffn\.experts\.")   # built by experts.build, not loaded here
# Small tensors kept in fp32 whatever the model dtype: routing precision decides which experts run.
KEEP_FP32 = re.compile(r"ffn\.gate\.bias$")
Where = Callable[[str], tuple[torch.device, torch.dtype, str | None]]


def dense_params(model: nn.Module, where: Where):
    """(name, param, device, dtype to load in, format) of every parameter the loaders fill, i.e. all
    but the routed experts (built before the model); small routing tensors stay fp32 (KEEP_FP32)."""
    for name, param in list(model.named_parameters()):
        if EXPERT_PARAM.match(name):
            continue
        device, dtype, fmt = where(name)
        yield name, param, device, torch.float32 if KEEP_FP32.search(name) else dtype, fmt


def build_model(args: ModelArgs, make_experts: ExpertsFactory | None = None) -> Transformer:
    with torch.device("meta"):
        return Transformer(args, make_experts)


class SafetensorsLoader:
    """The weights of one safetensors checkpoint for the model its config.json describes: first each
    MoE layer's routed experts (expert_weights), then everything else (load)."""

    def __init__(self, ckpt: SafetensorsCheckpoint, args: ModelArgs):
        self.ckpt, self.args = ckpt, args
        self.used: set[str] = set()

    def expert_weights(self, layer: int, backend, dtype: torch.dtype) -> ExpertWeights:
        """The layer's experts stacked in `dtype` in host memory (whatever the backend: safetensors
        weights are converted to the placement dtype at load)."""
        w = {which: _load_stacked(self.ckpt, layer, which, shape, dtype, self.used)
             for which, shape in stacked_shapes(self.args).items()}
        return ExpertWeights.dense(layer, w["w1"], w["w3"], w["w2"])

    def load(self, model: Transformer, where: Where) -> None:
        """Every parameter but the routed experts. where(our parameter name) -> (device, dtype, format)
        it is placed with (placement.apply.param_placement); format "float8_e4m3" keeps 2-D weights
        block-FP8; format "stored" (GGUF ggml types kept in place) means the same as "dtype" here."""
        ckpt, used = self.ckpt, self.used
        for name, param, device, want, fmt in dense_params(model, where):
            src = hf_name(name)
            _require(ckpt, src, name)
            scale = None
            if fmt == "float8_e4m3" and param.dim() == 2:
                tensor, scale = _load_fp8(ckpt, src, tuple(param.shape))
            else:
                tensor = ckpt.load(src, tuple(param.shape), want)
            used.add(src)
            assign(model, name, tensor.to(device), None if scale is None else scale.to(device))
        if model.args.tie_word_embeddings and "lm_head.weight" in ckpt:
            used.add("lm_head.weight")  # a duplicate of the embedding some tied checkpoints still carry
        _check_unused(ckpt, used, model.args.num_hidden_layers, model.args.num_nextn_predict_layers)


def _load_stacked(ckpt, layer: int, which: str, shape: tuple[int, ...], dtype, used: set[str]) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)                                # (E, I, D) or (E, D, I)
    for e in range(shape[0]):
        src = expert_hf_name(layer, e, which)
        _require(ckpt, src, f"layers.{layer}.ffn.experts.{which}[{e}]")
        _fill(out[e], ckpt, src)
        used.add(src)
    return out


def _fill(out: torch.Tensor, ckpt: SafetensorsCheckpoint, src: str) -> None:
    """Copy one expert matrix into its slot of the stacked block. Plain dtypes are read from the file
    straight into the slot (no pass through the memory map), so stacking does not also leave the
    source pages resident in this process: peak RSS stays about one copy of the experts."""
    info = ckpt.info(src)
    stored = ckpt.load(src, tuple(out.shape), out.dtype if info.dtype == "F8_E4M3" else None)  # checks
    if info.dtype == "F8_E4M3":
        out.copy_(stored)                                                # dequantized temporary
    elif stored.dtype == out.dtype:
        _pread(info.file, info.offset, out)
    else:
        tmp = torch.empty(out.shape, dtype=stored.dtype)
        _pread(info.file, info.offset, tmp)
        out.copy_(tmp)


def _pread(file, offset: int, out: torch.Tensor) -> None:
    buf = memoryview(out.view(torch.uint8).numpy()).cast("B")
    with open(file, "rb") as f:
        done = 0
        while done < len(buf):
            n = os.preadv(f.fileno(), [buf[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{file}: unexpected end of file reading at byte {offset + done}")
            done += n


def _require(ckpt: SafetensorsCheckpoint, src: str, ours: str) -> None:
    if src not in ckpt:
        raise CheckpointError(f"checkpoint has no tensor '{src}' (needed for {ours}); the checkpoint does "
                              f"not match its config.json or is incomplete")


def _load_fp8(ckpt: SafetensorsCheckpoint, src: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight as block FP8: as stored when the checkpoint is FP8, else quantized now."""
    info = ckpt.info(src)
    if info.dtype == "F8_E4M3" and src + "_scale_inv" in ckpt:
        if info.shape != shape:
            raise CheckpointError(f"{info.file}: tensor '{src}' has shape {list(info.shape)}, expected {list(shape)}")
        w, scale = ckpt.raw(src), ckpt.raw(src + "_scale_inv").float()
        try:
            fp8.check_scale_shape(w, scale)
        except ValueError as e:
            raise CheckpointError(f"{info.file}: tensor '{src}': {e}") from None
        return w, scale
    return fp8.quantize(ckpt.load(src, shape, torch.float32))


def assign(model: nn.Module, name: str, tensor: torch.Tensor, scale_inv: torch.Tensor | None = None) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    param = nn.Parameter(tensor, requires_grad=False)
    if scale_inv is not None:
        param.scale_inv = scale_inv  # block scales travel with the FP8 weight (quant.fp8.materialize)
    setattr(owner, attr, param)


def _check_unused(ckpt: SafetensorsCheckpoint, used: set[str], n_layers: int, n_mtp: int) -> None:
    extra = sorted(n for n in ckpt.names() if n not in used and not is_ignored(n, n_layers, n_mtp))
    if extra:
        shown = ", ".join(extra[:5]) + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
        raise CheckpointError(f"checkpoint has tensors the config does not account for: {shown}; "
                              f"check that config.json belongs to these weights")


__all__ = ["build_model", "SafetensorsLoader", "EXPERT_NAMES"]
