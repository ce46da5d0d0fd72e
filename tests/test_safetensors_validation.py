"""A corrupt safetensors checkpoint never loads: one test per kind of corruption of the header or of
model.safetensors.index.json (each error names the file, and the tensor where there is one), a
seeded mutation fuzz of header, length, truncation and index, and the whole path through
hetero_rt.load() on a tiny HF model.

Files are written with safetensors.torch.save_file and then patched, so every test starts from
exactly what the reference writer produces.
"""
from __future__ import annotations

import json
import random
import re
import signal
import struct
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hetero_rt.checkpoint.safetensors import INDEX_FILE, MAX_HEADER_BYTES, SafetensorsCheckpoint
from hetero_rt.errors import CheckpointError, HeteroRTError

FILE = "model.safetensors"


# -- building and patching files ------------------------------------------------------------------

def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(4, 3, generator=g),
        "up.weight": torch.randn(2, 3, generator=g).to(torch.float16),
        "norm.weight": torch.randn(3, generator=g).to(torch.bfloat16),
        "positions": torch.arange(5),
    }


def _save(directory: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    path = directory / FILE
    save_file(_tensors() if tensors is None else tensors, path, metadata={"format": "pt"})
    return path


def _split(path: Path) -> tuple[list, bytes]:
    """(header as [key, value] pairs, in file order; data section)."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n], object_pairs_hook=_Obj), blob[8 + n:]


class _Obj(list):
    """A JSON object as a list of [key, value] pairs, so tests can write duplicate keys."""

    def __init__(self, pairs=()):
        super().__init__([list(p) for p in pairs])


def _dumps(value) -> str:
    if isinstance(value, _Obj):
        return "{" + ",".join(f"{json.dumps(k)}:{_dumps(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dumps(v) for v in value) + "]"
    return json.dumps(value)


def _write(path: Path, header: list | bytes, data: bytes, length: int | None = None) -> None:
    """A file with this header (pairs or raw bytes) and data; `length` overrides the 8-byte length."""
    blob = header if isinstance(header, bytes) else _dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def _entry(header: list, name: str) -> _Obj:
    return next(v for k, v in header if k == name)


def _by_offset(header: list) -> list[str]:
    """Tensor names in data order."""
    entries = [(k, v) for k, v in header if k != "__metadata__"]
    return [k for k, v in sorted(entries, key=lambda kv: _field(kv[1], "data_offsets"))]


def _field(entry: _Obj, key: str):
    return next(v for k, v in entry if k == key)


def _set(entry: _Obj, key: str, value) -> None:
    next(p for p in entry if p[0] == key)[1] = value


def _raises(path: Path, *patterns: str) -> str:
    """Opening the checkpoint raises a HeteroRTError naming `path` and matching every pattern."""
    with pytest.raises(HeteroRTError) as e:
        SafetensorsCheckpoint(path.parent)
    msg = str(e.value)
    assert isinstance(e.value, CheckpointError), msg
    assert str(path) in msg, msg
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in: {msg}"
    return msg


# -- header length --------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", [2, 0])
def test_header_length_one_short(tmp_path, padding):
    """With padding, one short still ends on valid JSON: the data then starts one byte early."""
    path = _save(tmp_path)
    header, data = _split(path)
    blob = _dumps(header).encode() + b" " * padding
    _write(path, blob, data, length=len(blob) - 1)
    if padding:
        _raises(path, rf"1 bytes after the end of the last tensor '{_by_offset(header)[-1]}'", "header length")
    else:
        _raises(path, "header is not valid JSON")


def test_header_length_one_long(tmp_path):
    path = _save(tmp_path)
    header, data = _split(path)
    _write(path, _dumps(header).encode(), data, length=len(_dumps(header)) + 1)
    _raises(path, "after its JSON object, expected only space padding")


def test_header_length_one_long_into_a_space(tmp_path):
    """The first data byte is a space, so the longer header is still valid JSON: the data is one short."""
    path = tmp_path / FILE
    header = _Obj([["w", _Obj([["dtype", "U8"], ["shape", [4]], ["data_offsets", [0, 4]]])]])
    _write(path, header, b" abc", length=len(_dumps(header)) + 1)
    _raises(path, "truncated: tensor 'w'", "header length is wrong")


def test_header_length_huge(tmp_path):
    path = _save(tmp_path)
    header, data = _split(path)
    _write(path, header, data, length=2 ** 40)
    _raises(path, "header length 1099511627776 runs past the end")


def test_header_length_over_the_library_limit(tmp_path):
    """A header over 100 MB is refused before it is read (a sparse file: no 100 MB written)."""
    path = tmp_path / FILE
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{")
    with open(path, "r+b") as f:
        f.truncate(MAX_HEADER_BYTES + 100)
    _raises(path, f"over the {MAX_HEADER_BYTES}-byte limit")


def test_file_shorter_than_the_length_field(tmp_path):
    path = tmp_path / FILE
    path.write_bytes(b"\x10\x00\x00")
    _raises(path, "too short")


# -- header text ----------------------------------------------------------------------------------

def test_header_not_json(tmp_path):
    path = _save(tmp_path)
    header, data = _split(path)
    blob = _dumps(header).encode().replace(b'"shape"', b"'shape'", 1)
    _write(path, blob, data)
    _raises(path, "header is not valid JSON")


def test_header_not_utf8(tmp_path):
    path = _save(tmp_path)
    header, data = _split(path)
    blob = _dumps(header).encode().replace(b"embed", b"emb\xffd", 1)
    _write(path, blob, data)
    _raises(path, "header is not UTF-8")


@pytest.mark.parametrize("text", ["[1, 2]", " {}", "\ufeff{}", ""])
def test_header_not_an_object_at_byte_0(tmp_path, text):
    """The format says the header MUST begin with '{'; the library accepts leading whitespace."""
    _write(tmp_path / FILE, text.encode(), b"")
    _raises(tmp_path / FILE, "not valid JSON for safetensors: it starts with")


@pytest.mark.parametrize("pad", [b"\n", b"\t", b"\x00", b" x"])
def test_header_padding_other_than_spaces(tmp_path, pad):
    path = _save(tmp_path)
    header, data = _split(path)
    _write(path, _dumps(header).encode() + pad, data)
    _raises(path, "expected only space padding")


def test_header_padded_with_spaces_loads(tmp_path):
    path = _save(tmp_path)
    header, data = _split(path)
    _write(path, _dumps(header).encode() + b" " * 13, data)
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert torch.equal(ckpt.raw("embed.weight"), _tensors()["embed.weight"])


def test_header_nested_too_deep(tmp_path):
    """Python's json recurses: a deeply nested value must be a CheckpointError, not a RecursionError."""
    _write(tmp_path / FILE, b'{"w":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"")
    _raises(tmp_path / FILE, "not valid JSON")


def test_lone_surrogate_in_a_name(tmp_path):
    """Python's json accepts "\\ud800", the format (UTF-8) does not: the library's check catches it."""
    path = _save(tmp_path)
    header, data = _split(path)
    _write(path, _dumps(header).encode().replace(b'"up.weight"', b'"up\\ud800"'), data)
    _raises(path, "safetensors library rejects")


# -- duplicate keys -------------------------------------------------------------------------------

def test_duplicate_tensor_name(tmp_path):
    """json.loads would keep the second entry and read its bytes as the tensor."""
    path = _save(tmp_path)
    header, data = _split(path)
    first, second = _by_offset(header)[:2]
    for pair in header:
        if pair[0] == second:
            pair[0] = first                   # json.loads would read the bytes of `second` as `first`
    _write(path, header, data)
    _raises(path, f"header has the key '{first}' twice")


def test_duplicate_field_in_an_entry(tmp_path):
    path = _save(tmp_path)
    header, data = _split(path)
    _entry(header, "embed.weight").append(["shape", [3, 4]])
    _write(path, header, data)
    _raises(path, "tensor 'embed.weight' has the key 'shape' twice")


def test_duplicate_metadata(tmp_path):
    path = _save(tmp_path)
    header, data = _split(path)
    _entry(header, "__metadata__").append(["format", "np"])
    _write(path, header, data)
    _raises(path, "'__metadata__' has the key 'format' twice")


# -- __metadata__ ---------------------------------------------------------------------------------

@pytest.mark.parametrize("metadata, expected", [
    (_Obj([["format", 1]]), "key 'format' is a number"),
    (_Obj([["format", None]]), "key 'format' is null"),
    (_Obj([["nested", _Obj([["a", "b"]])]]), "key 'nested' is an object"),
    (None, "'__metadata__' is null"),
    (["format", "pt"], "'__metadata__' is an array"),
])
def test_metadata_not_string_to_string(tmp_path, metadata, expected):
    path = _save(tmp_path)
    header, data = _split(path)
    _set(header, "__metadata__", metadata)
    _write(path, header, data)
    _raises(path, expected)


# -- entry fields and types -----------------------------------------------------------------------

@pytest.mark.parametrize("field, value, expected", [
    ("shape", [4.0, 3], r"shape \[4.0, 3\] is not a list of non-negative integers"),
    ("shape", [True, 3], r"shape \[True, 3\] is not a list"),
    ("shape", [-4, -3], r"shape \[-4, -3\] is not a list"),
    ("shape", "4x3", r"shape '4x3' is not a list"),
    ("data_offsets", [0.0, 48.0], r"data_offsets \[0.0, 48.0\] are not \[begin, end\]"),
    ("data_offsets", [False, 48], r"data_offsets \[False, 48\] are not"),
    ("data_offsets", [0, 24, 48], r"data_offsets \[0, 24, 48\] are not"),
    ("data_offsets", [48, 0], r"data_offsets \[48, 0\] are not \[begin, end\] with 0 <= begin <= end"),
    ("dtype", ["F32"], r"unknown dtype \['F32'\]"),
    ("dtype", "f32", r"unknown dtype 'f32'"),
    ("dtype", "C64", r"unknown dtype 'C64'"),       # a safetensors dtype hetero_rt does not read
])
def test_entry_field_of_the_wrong_type(tmp_path, field, value, expected):
    path = _save(tmp_path)
    header, data = _split(path)
    _set(_entry(header, "embed.weight"), field, value)
    _write(path, header, data)
    _raises(path, "tensor 'embed.weight'", expected)


@pytest.mark.parametrize("change, expected", [
    (lambda e: e.pop(), r"has the fields \['dtype', 'shape'\]; expected exactly"),
    (lambda e: e.append(["sha256", "00"]), r"\['data_offsets', 'dtype', 'sha256', 'shape'\]"),
])
def test_entry_fields_not_exactly_dtype_shape_offsets(tmp_path, change, expected):
    path = _save(tmp_path)
    header, data = _split(path)
    change(_entry(header, "embed.weight"))
    _write(path, header, data)
    _raises(path, "tensor 'embed.weight'", expected)


def test_entry_not_an_object(tmp_path):
    path = _save(tmp_path)
    header, data = _split(path)
    _set(header, "embed.weight", [0, 48])
    _write(path, header, data)
    _raises(path, "tensor 'embed.weight': header entry is an array")


# -- dtype and shape against the byte range --------------------------------------------------------

@pytest.mark.parametrize("field, value, expected", [
    ("dtype", "F16", "span 48 bytes, expected 24 for shape"),
    ("dtype", "F64", "span 48 bytes, expected 96"),
    ("shape", [4, 2], "span 48 bytes, expected 32"),
    ("shape", [4, 3, 2], "span 48 bytes, expected 96"),
    ("shape", [], "span 48 bytes, expected 4"),
])
def test_dtype_or_shape_inconsistent_with_byte_range(tmp_path, field, value, expected):
    path = _save(tmp_path)
    header, data = _split(path)
    _set(_entry(header, "embed.weight"), field, value)
    _write(path, header, data)
    _raises(path, "tensor 'embed.weight'", expected)


# -- offsets: from 0, contiguous, covering the data exactly ---------------------------------------

def _shift(header: list, names: list[str], begin: int, end: int) -> None:
    for name in names:
        offsets = _field(_entry(header, name), "data_offsets")
        _set(_entry(header, name), "data_offsets", [offsets[0] + begin, offsets[1] + end])


def test_offsets_overlapping(tmp_path):
    path = _save(tmp_path)
    header, data = _split(path)
    order = _by_offset(header)
    _shift(header, order[1:], -2, -2)         # every later tensor two bytes early
    _write(path, header, data[:-2])
    _raises(path, f"tensor '{order[1]}' begins at byte .* overlaps '{order[0]}'")


def test_offsets_with_a_gap(tmp_path):
    path = _save(tmp_path)
    header, data = _split(path)
    order = _by_offset(header)
    _shift(header, order[2:], 8, 8)
    _write(path, header, data + b"\0" * 8)    # a hidden payload between two tensors
    _raises(path, f"tensor '{order[2]}' .* gap of 8 bytes after '{order[1]}'")


def test_offsets_not_from_0(tmp_path):
    path = _save(tmp_path)
    header, data = _split(path)
    order = _by_offset(header)
    _shift(header, order, 8, 8)
    _write(path, header, b"\0" * 8 + data)
    _raises(path, f"tensor '{order[0]}' is the first in the data section but begins at byte 8; expected 0")


def test_offsets_absolute_instead_of_relative(tmp_path):
    """A writer that stores file offsets (8 + header length + begin) instead of data offsets."""
    path = _save(tmp_path)
    header, data = _split(path)
    n = len(_dumps(header))
    _shift(header, _by_offset(header), 8 + n, 8 + n)
    _write(path, header, data)
    _raises(path, "is the first in the data section but begins at byte")


def test_data_left_over_after_the_last_tensor(tmp_path):
    path = _save(tmp_path)
    header, data = _split(path)
    _write(path, header, data + b"\0" * 4)
    _raises(path, f"4 bytes after the end of the last tensor '{_by_offset(header)[-1]}'")


def test_tensor_dropped_from_the_header(tmp_path):
    path = _save(tmp_path)
    header, data = _split(path)
    order = _by_offset(header)
    _write(path, _Obj([p for p in header if p[0] != order[1]]), data)
    _raises(path, f"tensor '{order[2]}' .* gap of .* bytes after '{order[0]}'")


@pytest.mark.parametrize("shape", [[0, 10 ** 30], [0, 2 ** 62, 2 ** 62]])
def test_empty_tensor_with_a_dimension_torch_cannot_hold(tmp_path, shape):
    """0 bytes, so the byte range is right; the library refuses the first, only torch the second."""
    path = _save(tmp_path, {**_tensors(), "empty": torch.zeros(0, 3)})
    header, data = _split(path)
    _set(_entry(header, "empty"), "shape", shape)
    _write(path, header, data)
    _raises(path, "tensor 'empty'", "is too large")


def test_empty_tensors_anywhere_in_the_order_load(tmp_path):
    """Zero-size tensors at the start, in the middle and at the end of the data are all legal."""
    tensors = {**_tensors(), "a.empty": torch.zeros(0, 3), "z.empty": torch.zeros(0, dtype=torch.int64)}
    _save(tmp_path, tensors)
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        for name, t in tensors.items():
            assert torch.equal(ckpt.raw(name), t)


# -- model.safetensors.index.json ------------------------------------------------------------------

def _sharded(directory: Path) -> dict[str, str]:
    tensors = _tensors()
    names = sorted(tensors)
    weight_map = {}
    for s, part in enumerate([names[0::2], names[1::2]]):
        shard = f"model-0000{s + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, directory / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    _write_index(directory, {"metadata": {"total_size": 0}, "weight_map": weight_map})
    return weight_map


def _write_index(directory: Path, data) -> Path:
    (directory / INDEX_FILE).write_text(json.dumps(data, indent=2) + "\n")
    return directory / INDEX_FILE


def test_index_written_by_json_dump_loads(tmp_path):
    _sharded(tmp_path)
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert ckpt.names() == sorted(_tensors())


@pytest.mark.parametrize("blob, expected", [
    (b'{"weight_map": {"embed.weight": "model-\xff.safetensors"}}', "index is not UTF-8"),
    (b'{"weight_map": {"embed.weight": ', "index is not valid JSON"),
    (b'["weight_map"]', "index is not valid JSON for safetensors: it starts with"),
    (b'{"weight_map": {}} {}', "after its JSON object"),
    (b'{"metadata": {}}', '"weight_map" is null; expected an object'),
    (b'{"weight_map": ["embed.weight"]}', '"weight_map" is an array'),
    (b'{"weight_map": {}}', '"weight_map" lists no tensors'),
    (b'{"weight_map": {"embed.weight": 1}}', "tensor 'embed.weight' is mapped to a number"),
    (b'{"weight_map": {}, "weight_map": {}}', "index has the key 'weight_map' twice"),
    (b'{"weight_map": {"up.weight": "a", "up.weight": "b"}}', "\"weight_map\" has the key 'up.weight' twice"),
])
def test_index_malformed(tmp_path, blob, expected):
    _sharded(tmp_path)
    (tmp_path / INDEX_FILE).write_bytes(blob)
    _raises(tmp_path / INDEX_FILE, expected)


@pytest.mark.parametrize("shard", ["../model-00001-of-00002.safetensors", "/etc/passwd", "sub/model.safetensors",
                                   "sub\\model.safetensors", "C:model.safetensors", "..", ".", "", "a\0b"])
def test_index_shard_outside_the_directory(tmp_path, shard):
    weight_map = _sharded(tmp_path)
    (tmp_path / "sub").mkdir()
    save_file({"up.weight": _tensors()["up.weight"]}, tmp_path / "sub" / "model.safetensors")
    weight_map["up.weight"] = shard
    _write_index(tmp_path, {"weight_map": weight_map})
    _raises(tmp_path / INDEX_FILE, f"tensor 'up.weight' is mapped to {re.escape(repr(shard))}; expected the file "
                                   f"name of a shard")


def test_index_does_not_list_a_shard_tensor(tmp_path):
    weight_map = _sharded(tmp_path)
    dropped = sorted(weight_map)[0]
    shard = weight_map.pop(dropped)
    _write_index(tmp_path, {"weight_map": weight_map})
    _raises(tmp_path / shard, f"holds tensor '{dropped}'", f"{INDEX_FILE} does not list it")


def test_index_maps_a_tensor_to_the_other_shard(tmp_path):
    """The tensor is in both shards, the index names one of them: which copy is right is unknown."""
    weight_map = _sharded(tmp_path)
    name = sorted(weight_map)[0]
    other = next(s for s in set(weight_map.values()) if s != weight_map[name])
    part = {n: _tensors()[n] for n, s in weight_map.items() if s == other}
    save_file({**part, name: torch.zeros_like(_tensors()[name])}, tmp_path / other)
    _raises(tmp_path / other, f"holds tensor '{name}'", f"maps it to '{weight_map[name]}'")


def test_index_lists_a_tensor_its_shard_lacks(tmp_path):
    weight_map = _sharded(tmp_path)
    weight_map["ghost.weight"] = weight_map["up.weight"]
    _write_index(tmp_path, {"weight_map": weight_map})
    _raises(tmp_path / INDEX_FILE, "tensor 'ghost.weight' is mapped to .*, but that file does not hold it")


def test_corrupt_shard_behind_an_index(tmp_path):
    weight_map = _sharded(tmp_path)
    path = tmp_path / weight_map["up.weight"]
    header, data = _split(path)
    _write(path, header, data + b"\0")
    _raises(path, "1 bytes after the end of the last tensor")


# -- the whole path: hetero_rt.load() ---------------------------------------------------------------

def test_hf_loader_refuses_a_header_one_short(tmp_path):
    """Before these checks this file loaded, every tensor read one byte early: wrong logits."""
    pytest.importorskip("transformers")
    import hetero_rt
    from hf_models import build_hf_model, save_hf_model

    directory = save_hf_model(build_hf_model("v3", seed=3), "v3", tmp_path)
    path = directory / FILE
    header, data = _split(path)
    blob = _dumps(header).encode() + b"  "
    _write(path, blob, data, length=len(blob) - 1)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: 1 bytes after the end of the last tensor"):
        hetero_rt.load(directory, dtype="float32")


# -- mutation fuzz ------------------------------------------------------------------------------------
# Each case mutates a valid file and opens it. The only acceptable outcomes:
#   error      a HeteroRTError;
#   intact     every tensor's name, dtype, shape, data offset, nbytes and bytes equal the original's;
#   different  a file that is still valid and means something else (a renamed tensor, I32 for F32,
#              two equal-size tensors' offsets swapped): no header check can tell, only a checksum
#              could. It must then read exactly as the safetensors library reads it.
# Anything else fails the test: another exception, a load the library refuses, a different reading,
# or a case running past CASE_CPU_SECONDS of CPU or CASE_WALL_SECONDS of wall time (a hang). A case
# takes about 0.5 ms; CPU time is what a spinning hang uses, and unlike wall time it does not run out
# when other jobs load the machine (a 5 s wall limit did, at load 8 on 2 cores).

CASE_CPU_SECONDS = 2.0
CASE_WALL_SECONDS = 60.0
ALL_DTYPES = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32",
              "F32", "C64", "F64", "I64", "U64", "F4", "f32", "", "F32 "]
ODD_VALUES = [None, True, False, -1, 0, 1, 1.0, 2 ** 31, 2 ** 64, 2 ** 70, 10 ** 30, "0", "", [], _Obj(), [0],
              [0, 0, 0]]
STRUCTURAL = b'{}[],:" 0123456789.-eE\\'


class CaseTimeout(BaseException):
    """Raised from a timer signal: a BaseException so no `except Exception` in the code under test hides it."""


# timer -> (its signal, what it measures)
TIMERS = {signal.ITIMER_PROF: (signal.SIGPROF, "CPU"), signal.ITIMER_REAL: (signal.SIGALRM, "wall")}


@contextmanager
def _time_limit(cpu_seconds: float, wall_seconds: float):
    """CaseTimeout once the block has used `cpu_seconds` of CPU (a spinning hang) or `wall_seconds`
    of wall time (a blocked one). Signals are delivered to the main thread only."""
    assert threading.current_thread() is threading.main_thread(), "timer signals need the main thread"
    limits = {signal.ITIMER_PROF: cpu_seconds, signal.ITIMER_REAL: wall_seconds}
    names = {sig: f"{limits[timer]} s of {what} time" for timer, (sig, what) in TIMERS.items()}

    def on_timer(signum, frame):
        raise CaseTimeout(f"case ran past {names[signum]}")

    previous = {sig: signal.signal(sig, on_timer) for sig, _ in TIMERS.values()}
    for timer, seconds in limits.items():
        signal.setitimer(timer, seconds)
    try:
        yield
    finally:
        for timer in limits:
            signal.setitimer(timer, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fuzz_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "embed.weight": torch.randn(4, 3, generator=g),
        "up.weight": torch.randn(2, 3, generator=g).to(torch.float16),
        "down.weight": torch.randn(3, 2, generator=g).to(torch.bfloat16),   # same nbytes as up.weight
        "w8.weight": torch.randn(2, 4, generator=g).to(torch.float8_e4m3fn),
        "w8.weight_scale_inv": torch.rand(1, 1, generator=g),
        "positions": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


def _bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _data_start(file: Path) -> int:
    with open(file, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _reading(ckpt: SafetensorsCheckpoint) -> dict[str, tuple]:
    """name -> (shard, dtype, shape, offset in the data section, nbytes, bytes) as the checkpoint reads it."""
    starts = {file: _data_start(file) for file in {ckpt.info(n).file for n in ckpt.names()}}
    return {name: (info.file.name, info.dtype, info.shape, info.offset - starts[info.file], info.nbytes,
                   _bytes(ckpt.raw(name)))
            for name, info in ((n, ckpt.info(n)) for n in ckpt.names())}


def _library_reading(file: Path) -> dict[str, tuple]:
    """name -> (dtype, shape, bytes) as the safetensors library reads the file."""
    with safe_open(str(file), framework="pt") as f:
        return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape()),
                       _bytes(f.get_tensor(name))) for name in f.keys()}


def _judge(directory: Path, file: Path, original: dict[str, tuple], allow_different: bool) -> str:
    try:
        with SafetensorsCheckpoint(directory) as ckpt:
            got = _reading(ckpt)
    except HeteroRTError as e:
        return "library error" if "safetensors library rejects" in str(e) else "error"
    if got == original:
        return "intact"
    assert allow_different, "loaded, but reads differently from the original"
    expected = _library_reading(file)
    as_library = {n: (dtype, shape, data) for n, (_, dtype, shape, _, _, data) in got.items()}
    assert as_library == expected, "loaded, but not as the safetensors library reads it"
    return "different"


# Mutations: each takes (rng, header pairs, data) and changes the pairs in place; the file is then
# written again with the header re-serialized (compact JSON) and its length fixed, padded, or left wrong.

def _pick(rng, header) -> list | None:
    """A [name, entry] pair whose entry still has its three fields (an earlier mutation may have broken it)."""
    pairs = [p for p in header if p[0] != "__metadata__" and isinstance(p[1], _Obj)
             and {"dtype", "shape", "data_offsets"} <= {k for k, _ in p[1]}]
    return rng.choice(pairs) if pairs else None


def _int_pair(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)


def _m_offsets(rng, header, data):
    pair, other = _pick(rng, header), _pick(rng, header)
    if pair is None or not _int_pair(offsets := _field(pair[1], "data_offsets")):
        return
    begin, end = offsets
    d = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, len(data), -len(data)])
    new = rng.choice([[begin + d, end + d], [begin + d, end], [begin, end + d], [end, begin], [0, end - begin],
                      _field(other[1], "data_offsets"), [begin, rng.choice(ODD_VALUES)], rng.choice(ODD_VALUES)])
    _set(pair[1], "data_offsets", new)


def _m_swap_offsets(rng, header, data):
    a, b = _pick(rng, header), _pick(rng, header)
    if a is not None:
        oa, ob = _field(a[1], "data_offsets"), _field(b[1], "data_offsets")
        _set(a[1], "data_offsets", ob)
        _set(b[1], "data_offsets", oa)


def _m_dtype(rng, header, data):
    if (pair := _pick(rng, header)) is not None:
        _set(pair[1], "dtype", rng.choice(ALL_DTYPES + ODD_VALUES))


def _m_shape(rng, header, data):
    if (pair := _pick(rng, header)) is None or not isinstance(shape := _field(pair[1], "shape"), list):
        return
    shape, choice = list(shape), rng.randrange(6)
    if choice == 0:
        rng.shuffle(shape)                    # same size, other meaning: a valid, different file
    elif choice == 1 and shape and type(shape[0]) is int:
        shape[0] += rng.choice([-1, 1])
    elif choice == 2:
        shape.insert(rng.randrange(len(shape) + 1), rng.choice([0, 1, 2]))
    elif choice == 3 and shape:
        shape.pop(rng.randrange(len(shape)))
    elif choice == 4 and shape:
        shape[rng.randrange(len(shape))] = rng.choice(ODD_VALUES)
    else:
        shape = rng.choice(ODD_VALUES)
    _set(pair[1], "shape", shape)


def _m_fields(rng, header, data):
    if (pair := _pick(rng, header)) is None:
        return
    entry, choice = pair[1], rng.randrange(4)
    if choice == 0:
        entry.pop(rng.randrange(len(entry)))
    elif choice == 1:
        entry.append([rng.choice(["extra", "dtype", "shape", "data_offsets"]), rng.choice(ODD_VALUES + ["F32"])])
    elif choice == 2:
        entry[rng.randrange(len(entry))][0] = rng.choice(["Dtype", "shape ", "offsets", ""])
    else:
        rng.shuffle(entry)                    # field order is free: should stay intact


def _m_names(rng, header, data):
    pair, other = _pick(rng, header), _pick(rng, header)
    if pair is None:
        return
    choice = rng.randrange(5)
    if choice == 0:
        pair[0] = other[0]                    # a duplicate (or the same) name
    elif choice == 1:
        pair[0] += rng.choice(["x", ".", " ", "\u00e9"])    # a valid, different name
    elif choice == 2:
        header.remove(pair)
    elif choice == 3:
        header.append([pair[0], _Obj(pair[1])])             # the same entry twice
    else:
        size = rng.randrange(3)
        header.append([f"new.{rng.randrange(9)}", _Obj([["dtype", "U8"], ["shape", [size]],
                                                         ["data_offsets", [len(data), len(data) + size]]])])


def _m_metadata(rng, header, data):
    meta = next((p for p in header if p[0] == "__metadata__"), None)
    choice = rng.randrange(5)
    if meta is None or choice == 0:
        header.append(["__metadata__", rng.choice([_Obj([["format", "pt"]]), None, [], "pt"])])
    elif choice == 1:
        header.remove(meta)                   # metadata is optional: should stay intact
    elif choice == 2:
        meta[1] = rng.choice(ODD_VALUES)
    elif choice == 3 and isinstance(meta[1], _Obj):
        meta[1].append([rng.choice(["format", "x"]), rng.choice(ODD_VALUES + ["np"])])
    else:
        rng.shuffle(header)                   # key order is free: should stay intact


JSON_MUTATIONS = [_m_offsets, _m_swap_offsets, _m_dtype, _m_shape, _m_fields, _m_names, _m_metadata]


def _mutate_json(rng, blob: bytes) -> tuple[str, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    header, data = json.loads(blob[8:8 + n], object_pairs_hook=_Obj), blob[8 + n:]
    mutations = rng.sample(JSON_MUTATIONS, rng.choice([1, 1, 1, 2]))
    for m in mutations:
        m(rng, header, data)
    text = _dumps(header).encode() + b" " * rng.randrange(8)
    length = rng.choice([len(text)] * 6 + [len(text) - 1, len(text) + 1, n])
    return "+".join(m.__name__ for m in mutations), struct.pack("<Q", length) + text + data


def _mutate_bytes(rng, blob: bytes, end: int) -> tuple[str, bytes]:
    """1-3 bytes of blob[:end] bit-flipped, randomized, or set to a JSON structural character."""
    out = bytearray(blob)
    for _ in range(rng.choice([1, 1, 2, 3])):
        i = rng.randrange(end)
        out[i] = rng.choice([out[i] ^ (1 << rng.randrange(8)), rng.randrange(256), rng.choice(STRUCTURAL)])
    return "bytes", bytes(out)


def _mutate_file(rng, blob: bytes) -> tuple[str, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    kind = rng.choices(["json", "bytes", "length", "truncate", "extend"], weights=[45, 35, 8, 8, 4])[0]
    if kind == "json":
        return _mutate_json(rng, blob)
    if kind == "bytes":
        return _mutate_bytes(rng, blob, 8 + n)
    if kind == "length":
        new = rng.choice([n + rng.choice([-9, -8, -2, -1, 1, 2, 8]), rng.randrange(2 ** 64), n & 0xFF, n << 8])
        return "length", struct.pack("<Q", new) + blob[8:]
    if kind == "truncate":
        return "truncate", blob[:rng.randrange(len(blob))]
    return "extend", blob + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))


def _run_cases(directory: Path, file: Path, cases: int, seed: int, mutate, allow_different: bool) -> Counter:
    """`cases` mutations of `file` (the checkpoint in `directory` as first written), each judged."""
    pristine = file.read_bytes()
    with SafetensorsCheckpoint(directory) as ckpt:
        original = _reading(ckpt)
    rng = random.Random(seed)
    counts: Counter = Counter()
    for case in range(cases):
        kind, blob = mutate(rng, pristine)
        file.write_bytes(blob)
        try:
            with _time_limit(CASE_CPU_SECONDS, CASE_WALL_SECONDS):
                outcome = _judge(directory, file, original, allow_different)
        except (Exception, CaseTimeout) as e:
            (directory.parent / f"failing-{seed}-{case}").write_bytes(blob)
            pytest.fail(f"seed {seed} case {case} ({kind}): {type(e).__name__}: {e}\n"
                        f"file kept as {directory.parent / f'failing-{seed}-{case}'}; header: {blob[:400]!r}")
        counts[outcome] += 1
        counts[kind, outcome] += 1
    return counts


def _report(title: str, counts: Counter, seconds: float) -> None:
    total = sum(v for k, v in counts.items() if isinstance(k, str))
    errors = counts["error"] + counts["library error"]
    print(f"\n{title}: {total} cases in {seconds:.1f} s: {errors} clean errors "
          f"({counts['library error']} of them only from the safetensors library's check), "
          f"{counts['intact']} intact loads, {counts['different']} valid-but-different files (each read as the "
          f"library reads it)")
    for key in sorted(k for k in counts if not isinstance(k, str)):
        print(f"  {key[0]:>40s} {key[1]:>14s} {counts[key]}")


def _fuzz_header(tmp_path: Path, cases: int, seed: int) -> Counter:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    file = _save(directory, _fuzz_tensors())
    start = time.perf_counter()
    counts = _run_cases(directory, file, cases, seed, _mutate_file, allow_different=True)
    _report(f"safetensors header fuzz (seed {seed})", counts, time.perf_counter() - start)
    return counts


# Index mutations: the index only maps names to shards, so nothing but an error or an intact load is right.

def _mutate_index(rng, blob: bytes) -> tuple[str, bytes]:
    kind = rng.choices(["json", "bytes", "truncate"], weights=[55, 35, 10])[0]
    if kind == "bytes":
        return _mutate_bytes(rng, blob, len(blob))
    if kind == "truncate":
        return "truncate", blob[:rng.randrange(len(blob))]
    data = json.loads(blob, object_pairs_hook=_Obj)
    weight_map = next(p for p in data if p[0] == "weight_map")[1]
    pair = rng.choice(weight_map)
    choice = rng.randrange(8)
    if choice == 0:
        pair[1] = rng.choice(["../" + pair[1], "/" + pair[1], "./" + pair[1], "", ".", "..", "x/" + pair[1],
                              pair[1].upper(), pair[1] + " ", "config.json"])
    elif choice == 1:
        pair[1] = rng.choice([p[1] for p in weight_map])      # maybe the other shard
    elif choice == 2:
        pair[0] = rng.choice([p[0] for p in weight_map] + [pair[0] + "x"])
    elif choice == 3:
        weight_map.remove(pair)
    elif choice == 4:
        weight_map.append([rng.choice([pair[0], "ghost.weight"]), pair[1]])
    elif choice == 5:
        pair[1] = rng.choice(ODD_VALUES)
    elif choice == 6:
        next(p for p in data if p[0] == "weight_map")[1] = rng.choice(ODD_VALUES)
    else:
        rng.shuffle(weight_map)               # order is free: should stay intact
    return "index json", _dumps(data).encode()


def _fuzz_index(tmp_path: Path, cases: int, seed: int) -> Counter:
    directory = tmp_path / "sharded"
    directory.mkdir()
    _sharded(directory)
    start = time.perf_counter()
    counts = _run_cases(directory, directory / INDEX_FILE, cases, seed, _mutate_index, allow_different=False)
    _report(f"index fuzz (seed {seed})", counts, time.perf_counter() - start)
    return counts


def _check_mix(counts: Counter) -> None:
    """The fuzz is only worth something if it reaches all three outcomes, not just one error path."""
    assert counts["error"] > counts["intact"] > 0, counts


def _spin():
    while True:
        pass


@pytest.mark.parametrize("hang, cpu, wall, expected", [
    (_spin, 0.05, 30, "0.05 s of CPU time"),
    (lambda: time.sleep(30), 30, 0.05, "0.05 s of wall time"),
])
def test_time_limit_stops_a_hang(hang, cpu, wall, expected):
    start = time.perf_counter()
    with pytest.raises(CaseTimeout, match=expected):
        with _time_limit(cpu, wall):
            hang()
    assert time.perf_counter() - start < 5


def test_fuzz_header(tmp_path):
    counts = _fuzz_header(tmp_path, cases=50_000, seed=1)
    _check_mix(counts)
    assert counts["different"] > 0


def test_fuzz_index(tmp_path):
    _check_mix(_fuzz_index(tmp_path, cases=10_000, seed=2))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_fuzz_header_long(tmp_path, seed):
    _check_mix(_fuzz_header(tmp_path, cases=300_000, seed=seed))


@pytest.mark.slow
def test_fuzz_index_long(tmp_path):
    _check_mix(_fuzz_index(tmp_path, cases=150_000, seed=21))
