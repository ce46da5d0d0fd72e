"""Read a Hugging Face safetensors checkpoint (one file or shards + model.safetensors.index.json).

Contract:
- Everything that can be wrong with the files is found when the checkpoint is opened: header
  length beyond the file, header that is not JSON, unknown dtype, data_offsets that disagree with
  shape x itemsize, tensor data past the end of the file (truncated download), index entries naming
  a missing shard or a tensor its shard does not hold. Each error names the file and the tensor.
- Each shard is mapped once (mmap, copy-on-write, so tensors are writable and torch does not warn)
  and stays mapped while the checkpoint or any tensor taken from it lives. Pages come from the page
  cache: loading never holds a second copy of the checkpoint in RAM.
- raw() is the stored tensor, zero-copy. load() checks shape and dtype, dequantizes DeepSeek-style
  block fp8 (`w` F8_E4M3 + `w_scale_inv` fp32), and copies only when a dtype conversion is asked for.

Dimension legend: O output features, I input features, b block size (128), R = ceil(O/b), C = ceil(I/b).
"""
from __future__ import annotations

import difflib
import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import numpy as np
import torch

from ..errors import CheckpointError
from ..quant import fp8

INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"

# safetensors dtype string -> torch dtype. Read-only: no mutable module state.
DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
})
# Stored dtypes load() accepts as model weights.
WEIGHT_DTYPES = frozenset({"F32", "F16", "BF16", "F8_E4M3"})
SCALE_DTYPES = frozenset({"F32", "F16", "BF16"})


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path              # the shard holding it
    dtype: str              # safetensors dtype string: "F32", "BF16", "F8_E4M3", "I64", ...
    shape: tuple[int, ...]
    offset: int             # absolute byte offset of the data in the file
    nbytes: int


class SafetensorsCheckpoint:
    """All tensors of one checkpoint directory, validated at open and memory-mapped."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._maps: dict[Path, mmap.mmap] = {}
        self._infos: dict[str, TensorInfo] = _read_directory(self.directory)
        try:
            for file in sorted({i.file for i in self._infos.values()}):
                self._maps[file] = _map_file(file)
        except BaseException:
            self.close()
            raise

    # -- lookup ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            near = difflib.get_close_matches(name, self._infos, n=3)
            hint = f"; close names: {', '.join(near)}" if near else ""
            raise CheckpointError(f"{self.directory}: checkpoint has no tensor '{name}'{hint}")
        return self._infos[name]

    def scale_names(self) -> set[str]:
        """The `*_scale_inv` tensors that are fp8 block scales of another tensor in the checkpoint."""
        return {n for n in self._infos if n.endswith(SCALE_SUFFIX) and n[:-len(SCALE_SUFFIX)] in self._infos}

    def total_bytes(self) -> int:
        """Bytes of tensor data (headers excluded)."""
        return sum(i.nbytes for i in self._infos.values())

    # -- data -----------------------------------------------------------------------------------
    def raw(self, name: str) -> torch.Tensor:
        """The tensor as stored (dtype and shape), a zero-copy view of the memory map."""
        info = self.info(name)
        if info.file not in self._maps:
            raise CheckpointError(f"{info.file}: checkpoint is closed; cannot read tensor '{name}'")
        return _view(self._maps[info.file], info)

    def load(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor as the model needs it: shape checked, fp8 dequantized, converted to `dtype`.

        Zero-copy when `dtype` is None or the stored dtype; otherwise one copy of this tensor.
        """
        info = self.info(name)
        _check_shape(info, tuple(shape))
        _check_weight_dtype(info)
        if info.dtype == "F8_E4M3":
            return self._dequantize(info, dtype or torch.bfloat16)
        tensor = self.raw(name)
        return tensor if dtype is None or dtype == tensor.dtype else tensor.to(dtype)

    def _dequantize(self, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
        scale_name = info.name + SCALE_SUFFIX
        if scale_name not in self._infos:
            raise CheckpointError(f"{info.file}: tensor '{info.name}' is stored as F8_E4M3 but its block scale "
                                  f"'{scale_name}' is not in the checkpoint; expected DeepSeek-style fp8 "
                                  f"(weight + weight_scale_inv)")
        scale = self.info(scale_name)
        if scale.dtype not in SCALE_DTYPES:
            raise CheckpointError(f"{scale.file}: fp8 scale '{scale_name}' is stored as {scale.dtype}; "
                                  f"expected one of {sorted(SCALE_DTYPES)}")
        if not dtype.is_floating_point or dtype.itemsize < 2:
            raise CheckpointError(f"{info.file}: tensor '{info.name}': cannot dequantize fp8 to {dtype}; ask for "
                                  f"float32/float16/bfloat16, or use raw() for the fp8 data and its scale")
        try:
            return dequantize_fp8_block(self.raw(info.name), self.raw(scale_name), dtype=dtype)
        except ValueError as e:
            raise CheckpointError(f"{info.file}: tensor '{info.name}' with scale '{scale_name}' "
                                  f"({scale.file.name}): {e}") from e

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the maps. A map still referenced by live tensors is unmapped when the last one is freed."""
        maps, self._maps = self._maps, {}
        for m in maps.values():
            try:
                m.close()
            except BufferError:
                pass  # tensors still export the buffer; the map goes with them

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsCheckpoint({str(self.directory)!r}, {len(self._infos)} tensors, {len(self._maps)} shards)"


# -- fp8 block quantization -------------------------------------------------------------------------

def dequantize_fp8_block(w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """w (O, I) fp8 times scale_inv (R, C), each scale covering a b x b block (edge blocks partial)."""
    return fp8.dequantize(w, scale_inv, dtype, block)


def quantize_fp8_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of dequantize_fp8_block, as DeepSeek stores it: scale_inv = amax/448 per block, fp32 (R, C)."""
    return fp8.quantize(w, block)


# -- opening: directory, index, headers ---------------------------------------------------------------

def _read_directory(directory: Path) -> dict[str, TensorInfo]:
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; expected a checkpoint directory with *.safetensors")
    index = directory / INDEX_FILE
    if index.exists():
        return _read_sharded(index)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files and no {INDEX_FILE}")
    return _merge_shards(files)


def _merge_shards(files: list[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in _read_header(file).items():
            if name in infos:
                raise CheckpointError(f"{file}: tensor '{name}' is also in {infos[name].file.name}; "
                                      f"expected each tensor in exactly one file")
            infos[name] = info
    return infos


def _read_sharded(index: Path) -> dict[str, TensorInfo]:
    weight_map = _read_weight_map(index)
    headers: dict[str, dict[str, TensorInfo]] = {}
    infos: dict[str, TensorInfo] = {}
    for name, shard in weight_map.items():
        file = index.parent / shard
        if shard not in headers:
            if not file.is_file():
                raise CheckpointError(f"{index}: tensor '{name}' is mapped to shard '{shard}', "
                                      f"but {file} does not exist")
            headers[shard] = _read_header(file)
        if name not in headers[shard]:
            raise CheckpointError(f"{index}: tensor '{name}' is mapped to {file}, but that file does not hold it")
        infos[name] = headers[shard][name]
    return infos


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: expected an object with \"weight_map\": {{tensor name: shard file}}")
    return weight_map


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate one shard's header; every tensor's data must lie inside the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: {size} bytes, too short for a safetensors header (8-byte length + JSON)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{file}: header length {n} runs past the end of the file ({size} bytes); "
                                  f"the file is corrupt or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: header is not valid JSON ({e}); the file is corrupt or not safetensors") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: header is JSON {type(header).__name__}, expected an object")
    data_start = 8 + n
    return {name: _parse_entry(file, name, entry, data_start, size)
            for name, entry in header.items() if name != "__metadata__"}


def _parse_entry(file: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{file}: tensor '{name}': header entry {entry!r} lacks dtype/shape/data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise CheckpointError(f"{file}: tensor '{name}': unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
        raise CheckpointError(f"{file}: tensor '{name}': shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{file}: tensor '{name}': data_offsets {offsets!r} are not [begin, end] "
                              f"with 0 <= begin <= end")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(f"{file}: tensor '{name}': data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
                              f"expected {nbytes} for shape {shape} of {dtype}")
    if data_start + offsets[1] > size:
        raise CheckpointError(f"{file}: truncated: tensor '{name}' needs bytes up to {data_start + offsets[1]}, "
                              f"the file has {size}; download it again")
    return TensorInfo(name, file, dtype, tuple(shape), data_start + offsets[0], nbytes)


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


# -- mapping and checks -----------------------------------------------------------------------------

def _map_file(file: Path) -> mmap.mmap:
    """Copy-on-write map: reads share page-cache pages; a write (never done by us) stays private."""
    with open(file, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _view(m: mmap.mmap, info: TensorInfo) -> torch.Tensor:
    """Zero-copy tensor over the map. The numpy array holds a buffer export of the map, so the map
    cannot be unmapped while the tensor lives (close() then leaves it to the garbage collector)."""
    dtype = DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    data = np.frombuffer(m, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    return torch.from_numpy(data).view(dtype).view(info.shape)


def _check_shape(info: TensorInfo, shape: tuple[int, ...]) -> None:
    if info.shape != shape:
        raise CheckpointError(f"{info.file}: tensor '{info.name}' has shape {list(info.shape)}, "
                              f"expected {list(shape)}")


def _check_weight_dtype(info: TensorInfo) -> None:
    if info.dtype not in WEIGHT_DTYPES:
        raise CheckpointError(f"{info.file}: tensor '{info.name}' is stored as {info.dtype}; "
                              f"expected a floating weight type, one of {sorted(WEIGHT_DTYPES)}")
