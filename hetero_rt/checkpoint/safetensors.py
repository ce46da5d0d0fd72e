"""Read a Hugging Face safetensors checkpoint (one file or shards + model.safetensors.index.json).

Contract:
- Everything that can be wrong with the files is found when the checkpoint is opened, as the
  safetensors format specifies it: header length beyond the file or over 100 MB, header that is not
  one UTF-8 JSON object from its first byte (space padding after it), duplicate keys, __metadata__
  other than string -> string, entries other than exactly dtype/shape/data_offsets of the right types,
  unknown dtype, data_offsets that disagree with shape x itemsize, tensors that do not tile the data
  section exactly (from 0, no gap, no overlap, to the end of the file: truncated download, wrong
  header length); then the safetensors library's own check, as a backstop. Index: a JSON object
  whose weight_map names plain files beside it, listing exactly the tensors of each shard. Each
  error names the file and the tensor or key.
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
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import MappingProxyType
from typing import Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from ..quant import fp8

INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
MAX_HEADER_BYTES = 100_000_000      # the safetensors library's own limit on the JSON header
ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
# torch sizes and strides are int64, and a stride counts a zero dim as 1: an empty tensor of shape
# [0, 2**62, 2**62] spans 0 bytes (the safetensors library accepts it) but torch cannot create it.
MAX_ELEMENTS = 2 ** 63 - 1

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
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    # Every shard name checked before any shard is read: a wrong index is reported as the index's fault.
    files = {shard: _shard_file(index, shard, names[0]) for shard, names in by_shard.items()}
    infos: dict[str, TensorInfo] = {}
    for shard, names in by_shard.items():
        file = files[shard]
        header = _read_header(file)
        _check_index_agrees(index, file, names, header, weight_map)
        infos.update((name, header[name]) for name in names)
    return infos


def _shard_file(index: Path, shard: str, name: str) -> Path:
    """The shard's path. The index may only name files beside it: a path in it could reach any file
    on the machine, so '../x', '/x' and 'sub/x' are refused rather than resolved."""
    if not _is_plain_file_name(shard):
        raise CheckpointError(f"{index}: tensor '{name}' is mapped to {shard!r}; expected the file name of a "
                              f"shard in {index.parent} (no directories, no absolute paths)")
    file = index.parent / shard
    if not file.is_file():
        raise CheckpointError(f"{index}: tensor '{name}' is mapped to shard '{shard}', but {file} does not exist")
    return file


def _is_plain_file_name(name: str) -> bool:
    return (name not in ("", ".", "..") and "\0" not in name
            and PurePosixPath(name).name == name and PureWindowsPath(name).name == name)


def _check_index_agrees(index: Path, file: Path, names: list[str], header: Mapping[str, TensorInfo],
                        weight_map: Mapping[str, str]) -> None:
    """The index and its shard list the same tensors: either side alone disagreeing means they come
    from different versions of the checkpoint, and we cannot tell which one is right."""
    missing = [name for name in names if name not in header]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{index}: tensor '{missing[0]}'{more} is mapped to {file}, but that file does not "
                              f"hold it; download the index and its shards again")
    unlisted = sorted(set(header) - set(names))
    if unlisted:
        where = f"maps it to '{weight_map[unlisted[0]]}'" if unlisted[0] in weight_map else "does not list it"
        raise CheckpointError(f"{file}: holds tensor '{unlisted[0]}' ({len(unlisted)} unlisted in all), but "
                              f"{index.name} {where}; expected the index to list every tensor of each shard; "
                              f"download the index and its shards again")


def _read_weight_map(index: Path) -> dict[str, str]:
    # The index is written by json.dump, often with indentation and a final newline: strip all of it.
    data = _unique(index, _parse_json(index, index.read_bytes().strip(), "index"), "index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, _Object):
        raise CheckpointError(f"{index}: \"weight_map\" is {_kind(weight_map)}; expected an object "
                              f"{{tensor name: shard file}}")
    weight_map = _unique(index, weight_map, "\"weight_map\"")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index}: tensor '{name}' is mapped to {_kind(shard)}; expected a shard file name")
    if not weight_map:
        raise CheckpointError(f"{index}: \"weight_map\" lists no tensors; expected {{tensor name: shard file}}")
    return weight_map


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate one shard's header: every check of the format, then the reference reader's."""
    size = file.stat().st_size
    blob = _header_bytes(file, size)
    header = _unique(file, _parse_json(file, blob, "header"), "header")
    _check_metadata(file, header.pop("__metadata__", _Object()))
    data_start = 8 + len(blob)
    infos = {name: _parse_entry(file, name, entry, data_start) for name, entry in header.items()}
    _check_layout(file, infos, data_start, size)
    _check_with_safetensors(file)
    return infos


def _header_bytes(file: Path, size: int) -> bytes:
    """The header: 8 bytes of little-endian length n, then n bytes of JSON."""
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: {size} bytes, too short for a safetensors header (8-byte length + JSON)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{file}: header length {n} runs past the end of the file ({size} bytes); "
                                  f"the file is corrupt or not safetensors")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{file}: header length {n} is over the {MAX_HEADER_BYTES}-byte limit of the "
                                  f"safetensors library; the file is corrupt or not safetensors")
        return f.read(n)


class _Object(tuple):
    """A JSON object as its (key, value) pairs in file order. A dict would silently keep the last of
    two equal keys: a tensor named twice is a corrupt (or crafted) header, and parsers disagree on
    which of the two they read."""


def _parse_json(file: Path, blob: bytes, what: str) -> _Object:
    """`blob` as one JSON object that starts at its first byte and is followed only by space padding."""
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: {what} is not UTF-8 ({e}); the file is corrupt or not safetensors") from None
    if not text.startswith("{"):
        raise CheckpointError(f"{file}: {what} is not valid JSON for safetensors: it starts with {text[:16]!r}, "
                              f"expected an object starting with '{{'; the file is corrupt or not safetensors")
    try:
        obj, end = json.JSONDecoder(object_pairs_hook=_Object).raw_decode(text)
    except (ValueError, RecursionError) as e:   # RecursionError: nested deeper than Python's stack
        raise CheckpointError(f"{file}: {what} is not valid JSON ({e}); the file is corrupt or not "
                              f"safetensors") from None
    if text[end:].strip(" "):
        cause = "the header length is wrong or the file is corrupt" if what == "header" else "the file is corrupt"
        raise CheckpointError(f"{file}: {what} has {text[end:end + 16]!r} after its JSON object, expected only "
                              f"space padding; {cause}")
    return obj


def _unique(file: Path, pairs: _Object, where: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise CheckpointError(f"{file}: {where} has the key '{key}' twice; expected each key once; "
                                  f"the file is corrupt")
        out[key] = value
    return out


def _kind(value: object) -> str:
    """What a parsed JSON value is, for messages."""
    kinds = {_Object: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _check_metadata(file: Path, metadata: object) -> None:
    if not isinstance(metadata, _Object):
        raise CheckpointError(f"{file}: header '__metadata__' is {_kind(metadata)}; expected an object of "
                              f"strings (the format allows only string -> string)")
    for key, value in _unique(file, metadata, "'__metadata__'").items():
        if not isinstance(value, str):
            raise CheckpointError(f"{file}: header '__metadata__' key '{key}' is {_kind(value)}; expected a "
                                  f"string (the format allows only string -> string)")


def _parse_entry(file: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, _Object):
        raise CheckpointError(f"{file}: tensor '{name}': header entry is {_kind(entry)}; expected an object "
                              f"with dtype, shape, data_offsets")
    fields = _unique(file, entry, f"tensor '{name}'")
    if fields.keys() != ENTRY_FIELDS:
        raise CheckpointError(f"{file}: tensor '{name}': header entry has the fields {sorted(fields)}; expected "
                              f"exactly {sorted(ENTRY_FIELDS)}")
    dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{file}: tensor '{name}': unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
        raise CheckpointError(f"{file}: tensor '{name}': shape {shape!r} is not a list of non-negative integers")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise CheckpointError(f"{file}: tensor '{name}': shape {shape} is too large; expected the product of its "
                              f"dimensions (zeros counted as 1) to be at most 2**63 - 1")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{file}: tensor '{name}': data_offsets {offsets!r} are not [begin, end] "
                              f"with 0 <= begin <= end")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(f"{file}: tensor '{name}': data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
                              f"expected {nbytes} for shape {shape} of {dtype}")
    return TensorInfo(name, file, dtype, tuple(shape), data_start + offsets[0], nbytes)


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_layout(file: Path, infos: Mapping[str, TensorInfo], data_start: int, size: int) -> None:
    """The tensors, in offset order, tile the data section exactly: from its byte 0, without gap or
    overlap, to the end of the file. The format forbids holes (no hidden payload), and a wrong header
    length shows up here as data left over or missing at the end."""
    end, last = data_start, None
    for info in sorted(infos.values(), key=lambda i: (i.offset, i.nbytes)):   # empty tensors first
        if info.offset != end:
            raise CheckpointError(_misplaced(file, info, last, end - data_start, data_start))
        end, last = info.offset + info.nbytes, info
    if end > size:
        raise CheckpointError(f"{file}: truncated: tensor '{last.name}' needs bytes up to {end}, the file has "
                              f"{size}; download it again (or the header length is wrong)")
    if end < size:
        after = f"after the end of the last tensor '{last.name}'" if last else "after a header that lists no tensor"
        raise CheckpointError(f"{file}: {size - end} bytes {after}; expected the tensors to cover the data "
                              f"exactly; the header length or data_offsets are wrong, the file is corrupt")


def _misplaced(file: Path, info: TensorInfo, last: TensorInfo | None, expected: int, data_start: int) -> str:
    begin = info.offset - data_start                  # as in data_offsets: relative to the data section
    if last is None:
        return (f"{file}: tensor '{info.name}' is the first in the data section but begins at byte {begin}; "
                f"expected 0 (data_offsets count from the end of the header)")
    how = (f"overlaps '{last.name}'" if begin < expected
           else f"leaves a gap of {begin - expected} bytes after '{last.name}'")
    return (f"{file}: tensor '{info.name}' begins at byte {begin} of the data and {how}, which ends at "
            f"{expected}; expected each tensor to begin where the previous one ends; the file is corrupt")


def _check_with_safetensors(file: Path) -> None:
    """The reference reader's own validation (it parses only the header). Ours above is stricter and
    names the tensor; this one is the backstop, so a file the safetensors library refuses never loads
    (e.g. a lone UTF-16 surrogate in a name, which Python's json accepts)."""
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except SafetensorError as e:
        raise CheckpointError(f"{file}: the safetensors library rejects this file ({e}); the file is corrupt, "
                              f"download it again") from None


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
