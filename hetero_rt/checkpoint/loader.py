"""Build the Transformer on the meta device and fill it from a safetensors checkpoint.

Contract: every parameter of the model is filled from exactly one checkpoint tensor (routed experts:
E tensors each, stacked into one (E, ...) block per layer and handed to the experts builder as
ExpertWeights) with its shape checked; every checkpoint tensor is either used or deliberately
ignored (MTP layers, fp8 scales): anything else is an error, so a checkpoint that does not match
its config.json never runs silently wrong.
Weights whose stored dtype equals the requested dtype stay zero-copy views of the memory map.

Stored formats: when the experts' backend reads the checkpoint's format as stored (experts.registry),
routed experts stay in it: fp32/bf16/fp16 stacked as they are, block FP8 (`weight` F8_E4M3 +
`weight_scale_inv`, the official DeepSeek-V3/R1 and Kimi-K2 layout) repacked into the kernels' rows
(quant.fp8.pack: 1.03x the stored bytes), never expanded. `format: stored` does the same for 2-D
dense weights (kernels.stored); a tensor the kernels cannot read (rows not whole 128-blocks) is
loaded in the placement dtype with a notice.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..config import ModelArgs
from ..errors import CheckpointError
from ..experts.weights import ExpertWeights, stacked_shapes
from ..kernels.stored import Scratch, stored_parameter
from ..model.transformer import ExpertsFactory, Transformer
from ..quant import fp8
from ..quant.ggml import stored_bytes, stored_format
from .names import EXPERT_NAMES, HFNames, is_ignored, names_for
from .safetensors import DTYPES, SCALE_DTYPES, SCALE_SUFFIX, WEIGHT_DTYPES, SafetensorsCheckpoint

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

    def __init__(self, ckpt: SafetensorsCheckpoint, args: ModelArgs, log: Callable[[str], None] | None = None):
        self.ckpt, self.args, self.names = ckpt, args, names_for(args)
        self.used: set[str] = set()
        self.log = log or (lambda msg: print(f"hetero_rt: {msg}", file=sys.stderr))
        self.scratch = Scratch()   # shared by this model's stored-format weights
        self._said: set[str] = set()

    def _once(self, msg: str) -> None:
        if msg not in self._said:
            self._said.add(msg)
            self.log(msg)

    def expert_weights(self, layer: int, backend, dtype: torch.dtype) -> ExpertWeights:
        """The layer's experts stacked in host memory: in their stored format when the backend reads it
        as stored (see the module docstring), else converted to `dtype`."""
        w, fmts = {}, {}
        for which, shape in stacked_shapes(self.args).items():
            fmt = self._expert_format(layer, which, shape, backend)
            if fmt is None:
                w[which], fmts[which] = self._stacked(layer, which, shape, dtype), None
            elif fmt == "float8_e4m3":
                w[which], fmts[which] = _load_stacked_fp8(self.ckpt, self.names, layer, which, shape, self.used), fmt
            else:
                w[which], fmts[which] = self._stacked(layer, which, shape, _TORCH_OF_FORMAT[fmt]), fmt
        if all(f is None for f in fmts.values()):
            return ExpertWeights.dense(layer, w["w1"], w["w3"], w["w2"])
        if fmts["w1"] != fmts["w3"]:
            raise CheckpointError(f"layer {layer}: routed experts' gate and up projections are stored in different "
                                  f"formats ({fmts['w1']}, {fmts['w3']}); hetero_rt needs them alike")
        fmt13 = fmts["w1"] or _FORMAT_OF_TORCH[dtype]
        fmt2 = fmts["w2"] or _FORMAT_OF_TORCH[dtype]
        return ExpertWeights(layer, w["w1"], w["w3"], w["w2"], fmt13, fmt2, stacked_shapes(self.args)["w1"])

    def _stacked(self, layer: int, which: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return _load_stacked(self.ckpt, self.names, layer, which, shape, dtype, self.used)

    def _expert_format(self, layer: int, which: str, shape: tuple[int, ...], backend) -> str | None:
        """The format the layer's `which` experts stay in, or None (converted to the placement dtype)."""
        if not backend.stored_formats:
            return None
        src = self.names.expert_hf_name(layer, 0, which)
        _require(self.ckpt, src, f"layers.{layer}.ffn.experts.{which}[0]")
        info = self.ckpt.info(src)
        fmt = stored_format(info.dtype, shape[1:])
        if fmt == "float8_e4m3" and src + SCALE_SUFFIX not in self.ckpt:
            fmt = None   # an F8_E4M3 tensor without block scales: load() names the problem
        if fmt is None and info.dtype == "F8_E4M3":
            self._once(f"routed experts {which}: F8_E4M3 rows of {shape[2]} values are not whole 128-value "
                       f"blocks, which the CPU kernels need: dequantized at load")
        return fmt if fmt is not None and backend.runs_stored(fmt) else None

    def load(self, model: Transformer, where: Where) -> None:
        """Every parameter but the routed experts. where(our parameter name) -> (device, dtype, format)
        it is placed with (placement.apply.param_placement); format "float8_e4m3" keeps 2-D weights
        block-FP8 as torch tensors; format "stored" keeps 2-D weights on the CPU as the kernels read
        them (see the module docstring)."""
        ckpt, used = self.ckpt, self.used
        for name, param, device, want, fmt in dense_params(model, where):
            src = self.names.hf_name(name)
            _require(ckpt, src, name)
            used.add(src)
            if fmt == "stored" and param.dim() == 2:
                stored = self._stored(src, tuple(param.shape), want)
                if stored is not None:
                    set_param(model, name, stored)
                    continue
            scale = None
            if fmt == "float8_e4m3" and param.dim() == 2:
                tensor, scale = _load_fp8(ckpt, src, tuple(param.shape))
            else:
                tensor = ckpt.load(src, tuple(param.shape), want)
            assign(model, name, tensor.to(device), None if scale is None else scale.to(device))
        if model.args.tie_word_embeddings and "lm_head.weight" in ckpt:
            used.add("lm_head.weight")  # a duplicate of the embedding some tied checkpoints still carry
        _check_unused(ckpt, used, model.args.num_hidden_layers, model.args.num_nextn_predict_layers)

    def _stored(self, src: str, shape: tuple[int, ...], dtype: torch.dtype):
        """The tensor as a stored-format parameter (kernels.stored, rows looked up in `dtype`), or None
        with a notice when the kernels do not read it as stored."""
        info = self.ckpt.info(src)
        ckpt_shape_ok = info.shape == shape
        fmt = stored_format(info.dtype, shape) if ckpt_shape_ok else None
        if fmt == "float8_e4m3" and src + SCALE_SUFFIX not in self.ckpt:
            fmt = None
        if fmt is None:
            if ckpt_shape_ok and info.dtype in WEIGHT_DTYPES:
                self.log(f"{src}: {info.dtype} {list(shape)} is not read as stored by the CPU kernels: loaded "
                         f"in {str(dtype).removeprefix('torch.')} instead of format: stored")
            return None   # the caller's load() checks shape and dtype and names any problem
        if fmt == "float8_e4m3":
            raw = _packed_fp8(self.ckpt, src, shape)
        else:
            raw = np.empty((shape[0], stored_bytes(fmt, shape[1:])), np.uint8)
            _pread(info.file, info.offset, torch.from_numpy(raw))
        return stored_parameter(raw, fmt, scratch=self.scratch, dtype=dtype)


_TORCH_OF_FORMAT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_FORMAT_OF_TORCH = {t: f for f, t in _TORCH_OF_FORMAT.items()}


def set_param(model: nn.Module, name: str, param: nn.Parameter) -> None:
    """Put an already built parameter (e.g. a stored-format one) at our parameter name."""
    owner_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner_name) if owner_name else model, attr, param)


def _packed_fp8(ckpt: SafetensorsCheckpoint, src: str, shape: tuple[int, ...], out: np.ndarray | None = None):
    """One F8_E4M3 weight (O, I) and its scale as quant.fp8.pack's rows, into `out` when given. The fp8
    bytes are read with pread (not through the memory map, so they do not stay resident)."""
    info = ckpt.info(src)
    if info.shape != shape:
        raise CheckpointError(f"{info.file}: tensor '{src}' has shape {list(info.shape)}, expected {list(shape)}")
    sinfo = ckpt.info(src + SCALE_SUFFIX)
    if sinfo.dtype not in SCALE_DTYPES:
        raise CheckpointError(f"{sinfo.file}: fp8 scale '{sinfo.name}' is stored as {sinfo.dtype}; expected one of "
                              f"{sorted(SCALE_DTYPES)}")
    scale = torch.empty(sinfo.shape, dtype=DTYPES[sinfo.dtype])   # pread too: touching the memory map here would
    _pread(sinfo.file, sinfo.offset, scale)                         # map the neighbouring weight pages as well
    scale = scale.float()
    tmp = torch.empty(shape, dtype=torch.uint8)
    _pread(info.file, info.offset, tmp)
    try:
        return fp8.pack(tmp, scale, out)
    except ValueError as e:
        raise CheckpointError(f"{info.file}: tensor '{src}': {e}") from None


def _load_stacked(ckpt, names: HFNames, layer: int, which: str, shape: tuple[int, ...], dtype,
                  used: set[str]) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)                                # (E, I, D) or (E, D, I)
    for e in range(shape[0]):
        src = names.expert_hf_name(layer, e, which)
        _require(ckpt, src, f"layers.{layer}.ffn.experts.{which}[{e}]")
        _fill(out[e], ckpt, src)
        used.add(src)
    return out


def _load_stacked_fp8(ckpt, names: HFNames, layer: int, which: str, shape: tuple[int, ...],
                      used: set[str]) -> np.ndarray:
    """The layer's F8_E4M3 experts as one uint8 (E, rows, row_bytes) block of quant.fp8.pack rows."""
    e_count, rows, cols = shape
    out = np.empty((e_count, rows, stored_bytes("float8_e4m3", (cols,))), np.uint8)
    for e in range(e_count):
        src = names.expert_hf_name(layer, e, which)
        _require(ckpt, src, f"layers.{layer}.ffn.experts.{which}[{e}]")
        if ckpt.info(src).dtype != "F8_E4M3" or src + SCALE_SUFFIX not in ckpt:
            raise CheckpointError(f"{ckpt.info(src).file}: tensor '{src}' is {ckpt.info(src).dtype}"
                                  f"{'' if src + SCALE_SUFFIX in ckpt else ' without ' + src + SCALE_SUFFIX}, while "
                                  f"expert 0 of the layer is block FP8; the experts of a layer must be stored alike")
        _packed_fp8(ckpt, src, (rows, cols), out[e])
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
        files = sorted({ckpt.info(n).file for n in extra})
        where = files[0] if len(files) == 1 else f"{ckpt.directory} ({', '.join(f.name for f in files)})"
        shown = ", ".join(f"{n} (in {ckpt.info(n).file.name})" for n in extra[:5])
        shown += f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        raise CheckpointError(f"{where}: checkpoint has tensors the config does not account for: {shown}; "
                              f"check that {ckpt.directory / 'config.json'} belongs to these weights")


__all__ = ["build_model", "SafetensorsLoader", "EXPERT_NAMES"]
