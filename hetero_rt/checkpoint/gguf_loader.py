"""Assign every weight of a Transformer built on the meta device from a deepseek2 GGUF.

Contract (as loader.py for safetensors): every parameter comes from one GGUF tensor (wkv_b: from
attn_k_b + attn_v_b, or attn_kv_b) with its shape checked; every GGUF tensor is used or deliberately
ignored; anything else is a CheckpointError naming the tensor.
- Routed experts of layers on the `numba` backend stay in the memory map, in their stored format,
  and run through the kernels of that format (hetero_rt.experts.numba_backend). A format without a
  kernel (Q5_0, Q2_K, IQ*, ...) is dequantized once at load to the experts' placement dtype and the
  loader says so; `plan` shows the same (placement.memory).
- Everything else (and routed experts on the torch backend) is dequantized once at load with
  `gguf.quants.dequantize` to the dtype the placement asks for.
"""
from __future__ import annotations

import re
import sys
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError
from ..experts.numba_backend import NumbaExperts
from ..quant import fp8
from ..kernels.stored import stored_parameter
from .gguf import KERNEL_FORMATS, GGUFCheckpoint
from .loader import _assign
from .names import GGUF_KV_B_SPLIT, gguf_name

_EXPERTS = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(w[123])$")
_FP32 = re.compile(r"ffn\.gate\.bias$")
_IGNORED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.nextn\..*)$")
_FALLBACK_FORMAT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

Where = Callable[[str], tuple[torch.device, torch.dtype, str | None]]
ExpertBackend = Callable[[int], tuple[str, int | None]]


def load_gguf_weights(model: nn.Module, ckpt: GGUFCheckpoint, where: Where, expert_backend: ExpertBackend,
                      log=None) -> None:
    """where(our name) -> (device, dtype, format); expert_backend(layer) -> (backend, threads)."""
    log = log or (lambda msg: print(f"hetero_rt: {msg}", file=sys.stderr))
    used: set[str] = set()
    done_layers: set[int] = set()
    for name, param in list(model.named_parameters()):
        device, dtype, fmt = where(name)
        m = _EXPERTS.match(name)
        if m:
            layer = int(m.group(1))
            if layer in done_layers:
                continue
            done_layers.add(layer)
            _load_experts(model, ckpt, layer, device, dtype, expert_backend(layer), used, log)
            continue
        want = torch.float32 if _FP32.search(name) else dtype
        shape = tuple(param.shape)
        if name.endswith("attn.wkv_b"):
            w = _kv_b(ckpt, name, shape, used)
        elif fmt == "stored" and len(shape) == 2:
            src = gguf_name(name)
            param = _stored(ckpt, src, shape, name, log)
            used.add(src)
            if param is not None:
                _assign_param(model, name, param)
                continue
            w = torch.from_numpy(ckpt.dequantize(src))
        else:
            src = gguf_name(name)
            w = _dequant(ckpt, src, shape, name)
            used.add(src)
        scale = None
        if fmt == "float8_e4m3" and w.dim() == 2:
            w, scale = fp8.quantize(w)
        else:
            w = w.to(want)
        _assign(model, name, w.to(device), None if scale is None else scale.to(device))
    _check_unused(ckpt, used)


def _stored(ckpt: GGUFCheckpoint, src: str, shape: tuple[int, ...], ours: str, log):
    """The GGUF tensor as a stored-format parameter (kernels.stored), or None (with a notice) when the
    kernels do not read its type."""
    _require(ckpt, src, ours)
    info = ckpt.info(src)
    if info.shape != shape:
        raise CheckpointError(f"{info.file}: tensor '{src}' has shape {list(info.shape)} (numpy order), "
                              f"expected {list(shape)} for {ours} from the GGUF metadata")
    fmt = KERNEL_FORMATS.get(info.type)
    if fmt is None:
        log(f"{src}: {info.type} has no numba kernel: dequantized at load instead of format: stored")
        return None
    return stored_parameter(_bytes(ckpt.raw(src)), fmt)


def _assign_param(model: nn.Module, name: str, param: nn.Parameter) -> None:
    owner_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner_name) if owner_name else model, attr, param)


def _dequant(ckpt: GGUFCheckpoint, src: str, shape: tuple[int, ...], ours: str) -> torch.Tensor:
    _require(ckpt, src, ours)
    info = ckpt.info(src)
    if info.shape != shape:
        raise CheckpointError(f"{info.file}: tensor '{src}' has shape {list(info.shape)} (numpy order), "
                              f"expected {list(shape)} for {ours} from the GGUF metadata")
    return torch.from_numpy(ckpt.dequantize(src))


def _kv_b(ckpt: GGUFCheckpoint, name: str, shape: tuple[int, ...], used: set[str]) -> torch.Tensor:
    """wkv_b (H*(N+V), C) from attn_k_b (H, C, N; transposed per head) and attn_v_b (H, V, C)."""
    prefix = gguf_name(name).rsplit(".", 2)[0]                   # blk.{i}
    k_name, v_name = (f"{prefix}.{s}" for s in GGUF_KV_B_SPLIT)
    whole = gguf_name(name)
    if whole in ckpt and k_name not in ckpt:
        used.add(whole)
        return _dequant(ckpt, whole, shape, name)
    _require(ckpt, k_name, name)
    _require(ckpt, v_name, name)
    k_b, v_b = ckpt.dequantize(k_name), ckpt.dequantize(v_name)
    c = shape[1]
    if k_b.ndim != 3 or v_b.ndim != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != c or v_b.shape[2] != c \
            or k_b.shape[0] * (k_b.shape[2] + v_b.shape[1]) != shape[0]:
        raise CheckpointError(f"{ckpt.info(k_name).file}: '{k_name}' {list(k_b.shape)} and '{v_name}' "
                              f"{list(v_b.shape)} do not make {name} {list(shape)} (expected (H, C, N) and (H, V, C))")
    used.update((k_name, v_name))
    w = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)   # (H, N+V, C)
    return torch.from_numpy(np.ascontiguousarray(w.reshape(shape)))


def _load_experts(model, ckpt: GGUFCheckpoint, layer: int, device, dtype, backend: tuple[str, int | None],
                  used: set[str], log) -> None:
    experts = model.get_submodule(f"layers.{layer}.ffn.experts")
    shapes = {w: tuple(getattr(experts, w).shape) for w in ("w1", "w3", "w2")}  # (E,I,D) (E,I,D) (E,D,I)
    names = {w: gguf_name(f"layers.{layer}.ffn.experts.{w}") for w in shapes}
    for w, src in names.items():
        _require(ckpt, src, f"layers.{layer}.ffn.experts.{w}")
        info = ckpt.info(src)
        if info.shape != shapes[w]:
            raise CheckpointError(f"{info.file}: tensor '{src}' has shape {list(info.shape)} (numpy order), "
                                  f"expected {list(shapes[w])} from the GGUF metadata")
        used.add(src)
    kind, threads = backend
    if kind in ("numba", "hetero"):  # hetero: the scheduler wraps these CPU experts (placement.apply.finish)
        fallback = _FALLBACK_FORMAT[dtype]
        types = {w: ckpt.info(src).type for w, src in names.items()}
        fmt13 = KERNEL_FORMATS.get(types["w1"]) if types["w1"] == types["w3"] else None
        fmt2 = KERNEL_FORMATS.get(types["w2"])
        if fmt13 is None:
            log(f"layer {layer}: routed experts gate/up are {types['w1']}/{types['w3']}, which the numba kernels "
                f"do not read in place: dequantized to {fallback} at load")
        if fmt2 is None:
            log(f"layer {layer}: routed experts down is {types['w2']}, which the numba kernels do not read "
                f"in place: dequantized to {fallback} at load")
        w1, w3 = ((ckpt.raw(names[w]) if fmt13 else _dequant_to(ckpt, names[w], dtype)) for w in ("w1", "w3"))
        w2 = ckpt.raw(names["w2"]) if fmt2 else _dequant_to(ckpt, names["w2"], dtype)
        module = NumbaExperts(_bytes(w1), _bytes(w3), _bytes(w2), fmt=fmt13 or fallback,
                              fmt_down=fmt2 or fallback, threads=threads)
        block = model.get_submodule(f"layers.{layer}.ffn")
        block.experts = module
        return
    for w, src in names.items():
        t = torch.from_numpy(ckpt.dequantize(src)).to(dtype)
        _assign(model, f"layers.{layer}.ffn.experts.{w}", t.to(device))


def _dequant_to(ckpt: GGUFCheckpoint, src: str, dtype: torch.dtype) -> np.ndarray:
    """(E, R, C) -> bytes in dtype, one expert at a time so the fp32 temporary stays one expert large."""
    info = ckpt.info(src)
    raw = ckpt.raw(src)
    out = torch.empty(info.shape, dtype=dtype)
    from gguf.quants import dequantize
    from gguf.constants import GGMLQuantizationType

    qtype = GGMLQuantizationType[info.type]
    for e in range(info.shape[0]):
        out[e] = torch.from_numpy(np.asarray(dequantize(raw[e], qtype), dtype=np.float32).reshape(info.shape[1:]))
    return out.view(torch.uint8).numpy()


def _bytes(a: np.ndarray) -> np.ndarray:
    """Stored expert data as uint8 (E, rows, row_bytes), zero-copy."""
    if a.dtype != np.uint8:
        a = a.view(np.uint8)
    return a


def _require(ckpt: GGUFCheckpoint, src: str, ours: str) -> None:
    if src not in ckpt:
        raise CheckpointError(f"{ckpt.path}: GGUF has no tensor '{src}' (needed for {ours}); the file does not "
                              f"match its own metadata or is incomplete")


def _check_unused(ckpt: GGUFCheckpoint, used: set[str]) -> None:
    extra = [n for n in ckpt.names() if n not in used and not _IGNORED.match(n)]
    if extra:
        shown = ", ".join(extra[:5]) + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
        raise CheckpointError(f"{ckpt.path}: GGUF has tensors the metadata does not account for: {shown}")
