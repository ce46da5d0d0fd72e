"""Fill a Transformer built on the meta device from a GGUF (deepseek2, or a grouped-query family's:
names.gguf_layer_names).

Contract (as loader.py for safetensors): every parameter comes from one GGUF tensor (wkv_b: from
attn_k_b + attn_v_b, or attn_kv_b) with its shape checked; every GGUF tensor is used or deliberately
ignored; anything else is a CheckpointError naming the tensor.
- Routed experts are handed to the experts builder as ExpertWeights: in their stored format, views of
  the memory map, when the layer's backend runs that format in place (experts.registry); otherwise
  dequantized once at load to the experts' placement dtype, and for a backend that runs stored
  formats the loader says so; `plan` shows the same (placement.memory).
- Everything else is dequantized once at load with `gguf.quants.dequantize` to the dtype the
  placement asks for, or kept in its ggml type where the rules say `format: stored` (kernels.stored;
  wkv_b then stays the file's attn_k_b and attn_v_b, kernels.stored.StoredKvB).
"""
from __future__ import annotations

import re
import sys

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize
from torch import nn

from ..config import ModelArgs
from ..errors import CheckpointError
from ..experts.weights import ExpertWeights, stacked_shapes
from ..kernels.stored import Scratch, stored_kv_b_parameter, stored_parameter
from ..quant import fp8
from ..quant.ggml import GGML_TYPES, format_of_dtype
from .gguf import GGUFCheckpoint
from .loader import Where, assign, dense_params, set_param
from .names import GGUF_KV_B_SPLIT, gguf_name

_ROPE_FREQS = "rope_freqs.weight"           # llama.cpp's precomputed rope factors; the metadata says the same
_BLOCK = re.compile(r"^blk\.(\d+)\.")


class GGUFLoader:
    """The weights of one GGUF model (all splits) for the model its metadata describes: first each
    MoE layer's routed experts (expert_weights), then everything else (load)."""

    def __init__(self, ckpt: GGUFCheckpoint, args: ModelArgs, log=None):
        self.ckpt, self.args = ckpt, args
        self.log = log or (lambda msg: print(f"hetero_rt: {msg}", file=sys.stderr))
        self.used: set[str] = set()
        self.scratch = Scratch()         # the decode block every stored weight of this model shares

    def expert_weights(self, layer: int, backend, dtype: torch.dtype) -> ExpertWeights:
        """backend: the layer's experts.registry.Backend; dtype: the experts' placement dtype."""
        ckpt, shapes = self.ckpt, stacked_shapes(self.args)
        names = {w: gguf_name(f"layers.{layer}.ffn.experts.{w}", self.args) for w in shapes}
        for w, src in names.items():
            _require(ckpt, src, f"layers.{layer}.ffn.experts.{w}")
            info = ckpt.info(src)
            if info.shape != shapes[w]:
                raise CheckpointError(f"{info.file}: tensor '{src}' has shape {list(info.shape)} (numpy order), "
                                      f"expected {list(shapes[w])} from the GGUF metadata")
            self.used.add(src)
        if not backend.stored_formats:
            w = {k: torch.from_numpy(ckpt.dequantize(src)).to(dtype) for k, src in names.items()}
            return ExpertWeights.dense(layer, w["w1"], w["w3"], w["w2"])
        fallback = format_of_dtype(dtype)
        types = {w: ckpt.info(src).type for w, src in names.items()}
        fmt13 = GGML_TYPES.get(types["w1"]) if types["w1"] == types["w3"] else None
        fmt2 = GGML_TYPES.get(types["w2"])
        fmt13, fmt2 = (f if backend.runs_stored(f) else None for f in (fmt13, fmt2))
        if fmt13 is None:
            self.log(f"layer {layer}: routed experts gate/up are {types['w1']}/{types['w3']}, which the {backend.name} "
                     f"backend does not read in place: dequantized to {fallback} at load")
        if fmt2 is None:
            self.log(f"layer {layer}: routed experts down is {types['w2']}, which the {backend.name} backend does "
                     f"not read in place: dequantized to {fallback} at load")
        w1, w3 = ((_bytes(ckpt.raw(names[w])) if fmt13 else _dequant_to(ckpt, names[w], dtype)) for w in ("w1", "w3"))
        w2 = _bytes(ckpt.raw(names["w2"])) if fmt2 else _dequant_to(ckpt, names["w2"], dtype)
        return ExpertWeights(layer, w1, w3, w2, fmt13 or fallback, fmt2 or fallback, shapes["w1"])

    def load(self, model: nn.Module, where: Where) -> None:
        """Every parameter but the routed experts; where(our name) -> (device, dtype, format)."""
        ckpt, used = self.ckpt, self.used
        for name, param, device, want, fmt in dense_params(model, where):
            shape = tuple(param.shape)
            if name.endswith("attn.wkv_b"):
                param = _stored_kv_b(ckpt, name, shape, used, self.args, self.scratch) if fmt == "stored" else None
                if param is not None:
                    set_param(model, name, param)
                    continue
                w = _kv_b(ckpt, name, shape, used)
            elif fmt == "stored" and len(shape) == 2:
                src = gguf_name(name, self.args)
                param = _stored(ckpt, src, shape, name, self.log, self.scratch, want)
                used.add(src)
                if param is not None:
                    set_param(model, name, param)
                    continue
                w = torch.from_numpy(ckpt.dequantize(src))
            else:
                src = gguf_name(name, self.args)
                w = _dequant(ckpt, src, shape, name)
                used.add(src)
            scale = None
            if fmt == "float8_e4m3" and w.dim() == 2:
                w, scale = fp8.quantize(w)
            else:
                w = w.to(want)
            assign(model, name, w.to(device), None if scale is None else scale.to(device))
        _check_unused(ckpt, used, self.args.num_hidden_layers, self.args.num_nextn_predict_layers)


def _stored(ckpt: GGUFCheckpoint, src: str, shape: tuple[int, ...], ours: str, log, scratch: Scratch,
            dtype: torch.dtype):
    """The GGUF tensor as a stored-format parameter (kernels.stored) sharing `scratch`, its looked-up
    rows in `dtype`, or None (with a notice) when the kernels do not read its type."""
    _require(ckpt, src, ours)
    info = ckpt.info(src)
    if info.shape != shape:
        raise CheckpointError(f"{info.file}: tensor '{src}' has shape {list(info.shape)} (numpy order), "
                              f"expected {list(shape)} for {ours} from the GGUF metadata")
    fmt = GGML_TYPES.get(info.type)
    if fmt is None:
        log(f"{src}: {info.type} has no numba kernel: dequantized at load instead of format: stored")
        return None
    return stored_parameter(_bytes(ckpt.raw(src)), fmt, scratch=scratch, dtype=dtype)


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


def _stored_kv_b(ckpt: GGUFCheckpoint, name: str, shape: tuple[int, ...], used: set[str], args: ModelArgs,
                 scratch: Scratch):
    """wkv_b as the file's attn_k_b (H, C, N) and attn_v_b (H, V, C) in their ggml types, read in place
    by the absorbed decode path (kernels.stored.StoredKvB); None (the caller dequantizes) for the
    older whole attn_kv_b layout or a type without a kernel."""
    prefix = gguf_name(name).rsplit(".", 2)[0]
    k_name, v_name = (f"{prefix}.{s}" for s in GGUF_KV_B_SPLIT)
    if k_name not in ckpt or v_name not in ckpt:
        return None
    k, v = ckpt.info(k_name), ckpt.info(v_name)
    h, c = args.num_attention_heads, shape[1]
    want_k, want_v = (h, c, args.qk_nope_head_dim), (h, args.v_head_dim, c)
    if k.shape != want_k or v.shape != want_v:
        raise CheckpointError(f"{k.file}: '{k_name}' {list(k.shape)} and '{v_name}' {list(v.shape)} do not make "
                              f"{name} {list(shape)} (expected {list(want_k)} and {list(want_v)})")
    fk, fv = GGML_TYPES.get(k.type), GGML_TYPES.get(v.type)
    if fk is None or fv is None:
        return None
    kb, vb = _bytes(ckpt.raw(k_name)), _bytes(ckpt.raw(v_name))
    used.update((k_name, v_name))
    return stored_kv_b_parameter(kb.reshape(h * c, -1), fk, vb.reshape(h * args.v_head_dim, -1), fv, h, scratch)


def _dequant_to(ckpt: GGUFCheckpoint, src: str, dtype: torch.dtype) -> np.ndarray:
    """(E, R, C) -> bytes in dtype, one expert at a time so the fp32 temporary stays one expert large."""
    info = ckpt.info(src)
    raw = ckpt.raw(src)
    out = torch.empty(info.shape, dtype=dtype)
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


def _ignored(name: str, n_layers: int, n_mtp: int) -> bool:
    """The rope buffer, and every tensor of the n_mtp multi-token-prediction blocks that follow the
    n_layers main blocks (blk.{n_layers}.*: their attention and MoE as well as nextn.*; not loaded)."""
    m = _BLOCK.match(name)
    return name == _ROPE_FREQS or (m is not None and n_layers <= int(m.group(1)) < n_layers + n_mtp)


def _check_unused(ckpt: GGUFCheckpoint, used: set[str], n_layers: int, n_mtp: int) -> None:
    extra = [n for n in ckpt.names() if n not in used and not _ignored(n, n_layers, n_mtp)]
    if extra:
        shown = ", ".join(extra[:5]) + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
        raise CheckpointError(f"{ckpt.path}: GGUF has tensors the metadata does not account for: {shown}")
