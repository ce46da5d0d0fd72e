"""The GGUF header checked before the `gguf` package parses it (checkpoint/gguf.py opens files
through read_header first).

GGUFReader trusts the header: an array length past the end of the file makes it loop over empty
reads without end (~70 MB/s of views), a bad type or length surfaces as a ValueError or IndexError deep
inside it, and tensor offsets and sizes are never checked (an offset into another tensor loads as
wrong weights). So the header is walked here first with bounded struct reads, each count and length
checked against the bytes left, and the tensor table checked as llama.cpp's gguf.cpp checks it: known
ggml types, whole blocks per row, data back to back in table order at general.alignment, inside the
file. Tensor data are not read. Each error is a CheckpointError naming the file and the key or tensor.
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from ..errors import CheckpointError

# GGUFReader trusts the header: an array length past the end of the file makes it loop over empty
# reads without end (~70 MB/s of views), a bad type or length surfaces as a ValueError or IndexError deep
# inside it, and tensor offsets and sizes are never checked (an offset into another tensor loads as
# wrong weights). So the header is walked here first with bounded struct reads, each count and length
# checked against the bytes left, and the tensor table checked as llama.cpp's gguf.cpp checks it.

_VERSIONS = (2, 3)                  # what the gguf package reads (version 1 had 32-bit counts)
_MAX_KEY_BYTES = 65535              # GGUF spec: a key is at most 2**16 - 1 bytes
_MAX_NAME_BYTES = 63                # ggml's GGML_MAX_NAME (64) less the terminating NUL
_MAX_DIMS = 4                       # GGML_MAX_DIMS
_INT64_MAX = (1 << 63) - 1          # ggml's dimensions and element counts are int64
# GGUFReader makes a numpy view or two per array element (~300 bytes each with the decoded values):
# more elements than this in all the header's arrays is a corrupt length, refused before it costs
# gigabytes. Real headers hold ~4e5 (V3: 129k tokens, their types, 127k merges).
_MAX_ARRAY_ELEMENTS = 1 << 22
_MAX_ALIGNMENT = 1 << 24
# the smallest entries the counts can describe: an empty key + type + 1-byte value; a 1-byte tensor name
# + n_dims + one dimension + type + offset
_MIN_KV_BYTES, _MIN_TENSOR_BYTES = 8 + 4 + 1, 8 + 1 + 4 + 8 + 4 + 8
_SCALARS = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
            GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
            GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
            GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}


@dataclass(frozen=True)
class _TensorEntry:
    """One entry of the header's tensor table, as declared."""
    name: str
    dims: tuple[int, ...]       # ggml order (ne): dims[0] is the row length
    type: int                   # raw ggml type id
    offset: int                 # relative to the data section
    at: int                     # file byte where the entry starts (named in errors)

    def describe(self) -> str:
        kind = GGMLQuantizationType(self.type).name if self.type in GGML_QUANT_SIZES else self.type
        return f"'{self.name}' ({kind} {list(reversed(self.dims))})"


@dataclass(frozen=True)
class Header:
    tensors: tuple[_TensorEntry, ...]
    alignment: int
    data_start: int             # first byte of the data section
    size: int                   # of the file


def read_header(file: Path) -> Header:
    size = file.stat().st_size
    if size < 4:
        raise CheckpointError(f"{file}: {size} bytes, too short to be a GGUF file; download it again")
    try:
        with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            header = HeaderScan(file, buf, size).header()
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e})") from None
    _check_tensor_table(file, header)
    return header


class HeaderScan:
    """A cursor over the header bytes; every read is checked against the end of the file."""

    def __init__(self, file: Path, buf, size: int):
        self.file, self.buf, self.size = file, buf, size
        self.pos, self.order = 0, "<"
        self.elements = 0           # in all arrays so far

    def header(self) -> Header:
        self.preamble()
        n_tensors, n_kv = self.scalar("Q", "tensor count"), self.scalar("Q", "metadata key count")
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > self.size - self.pos:
            raise self.fail(f"it declares {n_kv} metadata keys and {n_tensors} tensors, more than its "
                            f"{self.size} bytes can hold")
        alignment = GGUF_DEFAULT_ALIGNMENT
        keys: set[str] = set()
        for i in range(n_kv):
            key, value = self.kv(i, keys)
            if key == "general.alignment":
                alignment = self.alignment(value)
        names: set[str] = set()
        tensors = tuple(self.tensor(i, names) for i in range(n_tensors))
        return Header(tensors, alignment, _align(self.pos, alignment), self.size)

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.file}: corrupt or truncated GGUF header: {what}; download (or convert) "
                               f"the file again")

    def take(self, n: int, what: str) -> int:
        """Step over n bytes; -> where they start."""
        if n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file ends at byte {self.size}")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, code: str, what: str):
        return struct.unpack_from(self.order + code, self.buf, self.take(struct.calcsize(code), what))[0]

    def text(self, limit: int, what: str) -> str:
        n = self.scalar("Q", f"length of {what}")
        if n > limit:
            raise self.fail(f"{what} at byte {self.pos - 8} is {n} bytes long; at most {limit} expected")
        start = self.take(n, what)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {start} is not valid UTF-8") from None

    def preamble(self) -> None:
        if self.buf[:4] != b"GGUF":
            raise CheckpointError(f"{self.file}: not a GGUF file (bad magic number)")
        self.pos = 4
        version = self.scalar("I", "version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order (as GGUFReader decides)
            self.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in _VERSIONS:
            raise self.fail(f"GGUF version {version}; hetero_rt reads versions {' and '.join(map(str, _VERSIONS))}")

    def kv(self, i: int, seen: set[str]) -> tuple[str, Any]:
        """One metadata entry -> (key, (value type, the value if a scalar, else None))."""
        key = self.text(_MAX_KEY_BYTES, f"metadata key #{i}")
        if key in seen:
            raise self.fail(f"metadata key '{key}' appears twice")
        seen.add(key)
        vtype = self.value_type(self.scalar("I", f"value type of '{key}'"), key)
        return key, (vtype, self.value(vtype, key))

    def value_type(self, raw: int, key: str) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"metadata key '{key}' has value type {raw}; GGUF defines 0-12") from None

    def value(self, vtype: GGUFValueType, key: str):
        if vtype == GGUFValueType.BOOL:
            value = self.scalar("B", f"value of '{key}'")
            if value > 1:  # the reader would take any byte as true
                raise self.fail(f"bool '{key}' at byte {self.pos - 1} holds {value}; expected 0 or 1")
            return bool(value)
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], f"value of '{key}'")
        if vtype == GGUFValueType.STRING:
            self.take(self.scalar("Q", f"length of '{key}'"), f"string value of '{key}'")
            return None
        item = self.value_type(self.scalar("I", f"element type of '{key}'"), key)
        n = self.scalar("Q", f"length of '{key}'")
        if item == GGUFValueType.ARRAY:  # llama.cpp refuses them too; the package would flatten them
            raise self.fail(f"metadata key '{key}' is an array of arrays, which GGUF readers do not support")
        self.elements += n
        if self.elements > _MAX_ARRAY_ELEMENTS:
            raise self.fail(f"metadata key '{key}' declares an array of {n} elements, which makes more than "
                            f"{_MAX_ARRAY_ELEMENTS} in all the header's arrays (a vocabulary has ~10^5)")
        if item in _SCALARS:
            self.take(n * struct.calcsize(_SCALARS[item]), f"array '{key}' of {n} {item.name}")
        else:
            self.skip_strings(n, key)
        return None

    def skip_strings(self, n: int, key: str) -> None:
        if n * 8 > self.size - self.pos:
            raise self.fail(f"array '{key}' at byte {self.pos} declares {n} strings, more than the file holds")
        fmt, buf, size, pos = self.order + "Q", self.buf, self.size, self.pos
        for k in range(n):  # the hot loop of a 10^5-token vocabulary: locals only
            if pos + 8 > size:
                break
            pos += 8 + struct.unpack_from(fmt, buf, pos)[0]
            if pos > size:
                break
        else:
            self.pos = pos
            return
        raise self.fail(f"string {k} of array '{key}' runs past the end of the file ({size} bytes)")

    def alignment(self, value) -> int:
        vtype, a = value
        if vtype != GGUFValueType.UINT32:
            raise self.fail(f"general.alignment is of type {vtype.name}; GGUF requires UINT32")
        if not (1 <= a <= _MAX_ALIGNMENT and a & (a - 1) == 0):
            raise self.fail(f"general.alignment is {a}; expected a power of two up to {_MAX_ALIGNMENT} (usually 32)")
        return a

    def tensor(self, i: int, seen: set[str]) -> _TensorEntry:
        at = self.pos
        name = self.text(_MAX_NAME_BYTES, f"name of tensor #{i}")
        if not name or name in seen:
            raise self.fail(f"tensor #{i} at byte {at} has {'an empty name' if not name else f'the name {name!r} twice'}")
        seen.add(name)
        n_dims = self.scalar("I", f"dimension count of tensor '{name}'")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise self.fail(f"tensor '{name}' has {n_dims} dimensions; ggml tensors have 1 to {_MAX_DIMS}")
        dims = tuple(self.scalar("Q", f"dimension {d} of tensor '{name}'") for d in range(n_dims))
        kind = self.scalar("I", f"type of tensor '{name}'")
        return _TensorEntry(name, dims, kind, self.scalar("Q", f"offset of tensor '{name}'"), at)


def _check_tensor_table(file: Path, h: Header) -> None:
    """llama.cpp's rules for the table: known types, rows of whole blocks, and the data back to back in
    table order, each tensor at the previous one's end rounded up to general.alignment, inside the file.
    What a corrupt type, shape or offset breaks: a smaller type leaves a gap, an offset lands inside
    another tensor, past the end, or off the alignment."""
    sizes = [_tensor_bytes(file, t) for t in h.tensors]
    expected = 0
    for k, (t, n) in enumerate(zip(h.tensors, sizes)):
        if t.offset != expected:
            raise _layout_error(file, h, sizes, k, expected)
        end = h.data_start + t.offset + n
        if end > h.size:
            raise CheckpointError(f"{file}: tensor '{t.name}' ends at byte {end} but the file has {h.size} bytes: "
                                  f"the file is truncated; download it again")
        expected = _align(t.offset + n, h.alignment)
    slack = h.size - h.data_start - expected
    if h.tensors and slack >= h.alignment:
        raise CheckpointError(f"{file}: {slack} bytes follow the data of the last tensor {h.tensors[-1].describe()}, "
                              f"more than padding to general.alignment ({h.alignment}): a tensor's type or shape in "
                              f"the header is corrupt (too small for its data); download the file again")


def _tensor_bytes(file: Path, t: _TensorEntry) -> int:
    """Bytes of t's data by its ggml type and shape (ggml_nbytes)."""
    where = f"{file}: tensor '{t.name}' (table entry at byte {t.at})"
    if t.type not in GGML_QUANT_SIZES:
        raise CheckpointError(f"{where}: unknown ggml type {t.type}; expected one of "
                              f"{', '.join(q.name for q in GGML_QUANT_SIZES)}: the header is corrupt (or needs a "
                              f"newer gguf package)")
    qtype = GGMLQuantizationType(t.type)
    block, type_size = GGML_QUANT_SIZES[qtype]
    shape = list(reversed(t.dims))
    if not all(1 <= d <= _INT64_MAX for d in t.dims) or math.prod(t.dims) > _INT64_MAX:
        raise CheckpointError(f"{where}: shape {shape} (numpy order); expected dimensions of 1 to 2**63 - 1 "
                              f"elements: the header is corrupt; download the file again")
    if t.dims[0] % block:
        raise CheckpointError(f"{where}: {qtype.name} rows of {t.dims[0]} elements (shape {shape}) are not whole "
                              f"{block}-element blocks: the type or shape in the header is corrupt")
    return math.prod(t.dims) // block * type_size


def _layout_error(file: Path, h: Header, sizes: list[int], k: int, expected: int) -> CheckpointError:
    """What is wrong with tensor k's offset, which is not where the table order puts it."""
    t, n = h.tensors[k], sizes[k]
    if t.offset % h.alignment:
        why = f"not a multiple of general.alignment ({h.alignment})"
    elif h.data_start + t.offset >= h.size:
        why = f"which is past the end of the file ({h.size} bytes, data from byte {h.data_start})"
    else:
        other = next((j for j, (u, m) in enumerate(zip(h.tensors, sizes))
                      if j != k and u.offset < t.offset + n and t.offset < u.offset + m), None)
        if other is not None:
            u = h.tensors[other]
            why = f"inside the data of tensor {u.describe()} (offsets {u.offset}-{u.offset + sizes[other]})"
        elif k:
            why = (f"but the tensor before it, {h.tensors[k - 1].describe()} of {sizes[k - 1]} bytes, ends at "
                   f"{expected} (rounded up to general.alignment); the type or shape of one of the two is corrupt")
        else:
            why = "but the first tensor's data start at offset 0"
    return CheckpointError(f"{file}: tensor {t.describe()} ({n} bytes) has data offset {t.offset}, {why}. "
                           f"Tensors are stored back to back in table order: the header is corrupt; download "
                           f"the file again")


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment
