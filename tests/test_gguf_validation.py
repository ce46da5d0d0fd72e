"""Corrupt GGUF headers: each class of corruption (tensor offsets, types, shapes, counts, lengths,
alignment, metadata types and values, tokenizer keys) raises a HeteroRTError naming the tensor or key,
never loads as wrong weights and never escapes as the gguf package's ValueError/IndexError; and a
bounded mutation fuzz over the header bytes (tensor data are not validated, by design): every mutant
either raises a HeteroRTError or opens with exactly the original header. A few mutants change a value
that no check can tell from a real one (a token's text, an epsilon's last bits, a key renamed away to
its default, a tensor shrunk within its alignment padding): those must load cleanly, or be refused
cleanly, and give finite logits; they are counted and printed as "changed".

Positions in the file come from the gguf package's own reader of the intact file: each parsed field
part is a numpy view into the memory map, so its byte offset is its address minus the map's.
"""
from __future__ import annotations

import random
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from fuzz_guard import CaseTimeout, time_limit
import hetero_rt
from gguf_models import make_gguf
from hetero_rt.checkpoint.gguf import GGUFCheckpoint, metadata_config
from hetero_rt.checkpoint.tokenizer import Tokenizer
from hetero_rt.errors import CheckpointError, ConfigError, HeteroRTError

TORCH_RULES = Path(__file__).parent / "fixtures" / "torch-cpu.yaml"
IDS = [3, 17, 42, 5, 88]
CASE_SECONDS = 20  # the hang guard of one fuzz case (a case takes ~0.05 s)


# ---- the intact file and where its header fields are ------------------------------------------------

class Layout:
    """Byte positions of every header field of a GGUF, from gguf.GGUFReader's views."""

    def __init__(self, path: Path):
        reader = gguf.GGUFReader(path)
        base = reader.data.ctypes.data

        def at(part) -> int:
            return int(part.ctypes.data - base)

        # field name -> [(offset, numpy dtype, element count)] in file order
        self.fields = {name: [(at(p), p.dtype, p.size) for p in f.parts] for name, f in reader.fields.items()}
        self.tensors = {t.name: [(at(p), p.dtype, p.size) for p in t.field.parts] for t in reader.tensors}
        self.order = [t.name for t in reader.tensors]
        self.offsets = {t.name: int(t.data_offset) - int(reader.data_offset) for t in reader.tensors}
        self.types = {t.name: t.tensor_type.name for t in reader.tensors}
        self.data_start = int(reader.data_offset)

    # tensor info parts: name length, name, n_dims, dims, type, offset
    def tensor_part(self, name: str, part: str) -> int:
        return self.tensors[name][("name_len", "name", "n_dims", "dims", "type", "offset").index(part)][0]

    # metadata parts: key length, key, value type, then the value's parts
    def value_at(self, key: str) -> int:
        return self.fields[key][3][0]

    def type_at(self, key: str) -> int:
        return self.fields[key][2][0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny deepseek2 GGUF (F32 norms, Q8_0 and F16 weights, a tokenizer) -> (path, Layout, its bytes)."""
    directory = tmp_path_factory.mktemp("gguf")
    _, path, _ = make_gguf("v3", directory, "Q8_0", tokenizer=True, vocab_size=512)
    return path, Layout(path), path.read_bytes()


def patched(tmp_path: Path, data: bytes, *edits) -> Path:
    """A copy of data with (position, struct format, value) edits."""
    buf = bytearray(data)
    for pos, fmt, value in edits:
        struct.pack_into("<" + fmt, buf, pos, value)
    out = tmp_path / "bad.gguf"
    out.write_bytes(bytes(buf))
    return out


def open_args(path: Path):
    with GGUFCheckpoint(path) as ck:
        return ck.args()


def middle_tensor(lay: Layout, qtype: str) -> str:
    return next(n for n in lay.order[1:-1] if lay.types[n] == qtype)


# ---- tensor table ---------------------------------------------------------------------------------

def test_intact_file_opens_and_runs(base, tmp_path):
    _, _, data = base
    ok = patched(tmp_path, data)
    assert open_args(ok).n_routed_experts == 8
    assert np.isfinite(hetero_rt.load(ok, TORCH_RULES, dtype="float32").logits(IDS)).all()


def test_offset_that_wraps_is_refused(base, tmp_path):
    _, lay, data = base
    name = middle_tensor(lay, "Q8_0")
    wrapped = (1 << 64) - lay.data_start + 64  # data start + offset wraps to byte 64 in uint64 arithmetic
    with pytest.raises(CheckpointError, match=f"'{name}'.*past the end of the file"):
        GGUFCheckpoint(patched(tmp_path, data, (lay.tensor_part(name, "offset"), "Q", wrapped)))


def test_offset_into_another_tensor_is_named(base, tmp_path):
    _, lay, data = base
    name = middle_tensor(lay, "Q8_0")
    first = lay.order[0]
    bad = patched(tmp_path, data, (lay.tensor_part(name, "offset"), "Q", lay.offsets[first] + 32))
    with pytest.raises(CheckpointError, match=f"'{name}'.*inside the data of tensor '{first}'"):
        GGUFCheckpoint(bad)


def test_unaligned_offset_is_refused(base, tmp_path):
    _, lay, data = base
    name = middle_tensor(lay, "F32")
    bad = patched(tmp_path, data, (lay.tensor_part(name, "offset"), "Q", lay.offsets[name] + 4))
    with pytest.raises(CheckpointError, match=f"'{name}'.*not a multiple of general.alignment \\(32\\)"):
        GGUFCheckpoint(bad)


def test_offset_past_the_end_is_refused(base, tmp_path):
    _, lay, data = base
    name = lay.order[-1]
    bad = patched(tmp_path, data, (lay.tensor_part(name, "offset"), "Q", len(data)))
    with pytest.raises(CheckpointError, match=f"'{name}'.*past the end of the file"):
        GGUFCheckpoint(bad)


def test_smaller_type_leaves_a_gap_that_is_named(base, tmp_path):
    """Q8_0 -> Q4_0 (18 bytes a block instead of 34): the next tensor no longer starts where it ends."""
    _, lay, data = base
    name = middle_tensor(lay, "Q8_0")
    after = lay.order[lay.order.index(name) + 1]
    bad = patched(tmp_path, data, (lay.tensor_part(name, "type"), "I", gguf.GGMLQuantizationType.Q4_0))
    with pytest.raises(CheckpointError, match=f"'{after}'.*the tensor before it, '{name}' \\(Q4_0"):
        GGUFCheckpoint(bad)


def test_smaller_type_of_the_last_tensor_leaves_unexplained_bytes(base, tmp_path):
    _, lay, data = base
    last = lay.order[-1]
    assert lay.types[last] == "Q8_0"
    bad = patched(tmp_path, data, (lay.tensor_part(last, "type"), "I", gguf.GGMLQuantizationType.Q4_0))
    with pytest.raises(CheckpointError, match=f"bytes follow the data of the last tensor '{last}' \\(Q4_0"):
        GGUFCheckpoint(bad)


def test_larger_type_overlaps_the_next_tensor(base, tmp_path):
    _, lay, data = base
    name = middle_tensor(lay, "Q8_0")
    after = lay.order[lay.order.index(name) + 1]
    bad = patched(tmp_path, data, (lay.tensor_part(name, "type"), "I", gguf.GGMLQuantizationType.F32))
    with pytest.raises(CheckpointError, match=f"'{after}'.*inside the data of tensor '{name}' \\(F32"):
        GGUFCheckpoint(bad)


@pytest.mark.parametrize("raw", [4, 31, 1000, 0xFFFFFFFF], ids=["removed-Q4_2", "31", "1000", "u32-max"])
def test_unknown_tensor_type_is_named(base, tmp_path, raw):
    _, lay, data = base
    name = middle_tensor(lay, "Q8_0")
    with pytest.raises(CheckpointError, match=f"'{name}'.*unknown ggml type {raw}"):
        GGUFCheckpoint(patched(tmp_path, data, (lay.tensor_part(name, "type"), "I", raw)))


@pytest.mark.parametrize("dim", [0, (1 << 64) - 1, 1 << 62], ids=["zero", "negative", "overflow"])
def test_bad_dimension_is_named(base, tmp_path, dim):
    _, lay, data = base
    name = middle_tensor(lay, "Q8_0")
    second_dim = lay.tensor_part(name, "dims") + 8   # ne[1]: leaves the row length whole blocks
    with pytest.raises(CheckpointError, match=f"'{name}'.*expected dimensions of 1 to 2\\*\\*63 - 1"):
        GGUFCheckpoint(patched(tmp_path, data, (second_dim, "Q", dim)))


def test_row_that_is_not_whole_blocks_is_named(base, tmp_path):
    _, lay, data = base
    name = middle_tensor(lay, "Q8_0")
    with pytest.raises(CheckpointError, match=f"'{name}'.*Q8_0 rows of 48 elements .*not whole 32-element blocks"):
        GGUFCheckpoint(patched(tmp_path, data, (lay.tensor_part(name, "dims"), "Q", 48)))


def test_larger_shape_overlaps_the_next_tensor(base, tmp_path):
    _, lay, data = base
    name = middle_tensor(lay, "F32")
    after = lay.order[lay.order.index(name) + 1]
    dims = lay.tensor_part(name, "dims")
    with pytest.raises(CheckpointError, match=f"'{after}'.*inside the data of tensor '{name}'"):
        GGUFCheckpoint(patched(tmp_path, data, (dims, "Q", struct.unpack_from("<Q", data, dims)[0] * 2)))


@pytest.mark.parametrize("n_dims", [0, 5, 1 << 31])
def test_dimension_count_out_of_range_is_named(base, tmp_path, n_dims):
    _, lay, data = base
    name = middle_tensor(lay, "Q8_0")
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has {n_dims} dimensions; ggml tensors have 1 to 4"):
        GGUFCheckpoint(patched(tmp_path, data, (lay.tensor_part(name, "n_dims"), "I", n_dims)))


def test_duplicate_and_overlong_tensor_names_are_refused(base, tmp_path):
    _, lay, data = base
    a, b = next((a, b) for i, a in enumerate(lay.order) for b in lay.order[i + 1:] if len(a) == len(b))
    dup = bytearray(data)
    pos = lay.tensor_part(b, "name")
    dup[pos:pos + len(b)] = a.encode()
    (tmp_path / "dup.gguf").write_bytes(bytes(dup))
    with pytest.raises(CheckpointError, match=f"the name '{a}' twice"):
        GGUFCheckpoint(tmp_path / "dup.gguf")
    with pytest.raises(CheckpointError, match=f"name of tensor #{lay.order.index(a)} at byte .* is 64 bytes long; "
                                              f"at most 63"):
        GGUFCheckpoint(patched(tmp_path, data, (lay.tensor_part(a, "name_len"), "Q", 64)))


# ---- counts, lengths, types of the metadata entries -------------------------------------------------

@pytest.mark.parametrize("field,value", [("GGUF.tensor_count", 1 << 63), ("GGUF.kv_count", 1 << 40),
                                         ("GGUF.tensor_count", 1 << 20)])
def test_huge_counts_are_refused_before_parsing(base, tmp_path, field, value):
    _, lay, data = base
    with pytest.raises(CheckpointError, match="more than its .* bytes can hold"):
        GGUFCheckpoint(patched(tmp_path, data, (lay.fields[field][0][0], "Q", value)))


def test_array_length_past_the_file_is_named(base, tmp_path):
    _, lay, data = base
    length = lay.value_at("tokenizer.ggml.token_type") + 4          # after the element type
    with pytest.raises(CheckpointError, match="'tokenizer.ggml.token_type' declares an array of 1099511627776"):
        GGUFCheckpoint(patched(tmp_path, data, (length, "Q", 1 << 40)))
    with pytest.raises(CheckpointError, match="array 'tokenizer.ggml.token_type' of 100000 INT32 .*file ends"):
        GGUFCheckpoint(patched(tmp_path, data, (length, "Q", 100_000)))
    tokens = lay.value_at("tokenizer.ggml.tokens") + 4
    with pytest.raises(CheckpointError, match="'tokenizer.ggml.tokens' .* declares 3000000 strings"):
        GGUFCheckpoint(patched(tmp_path, data, (tokens, "Q", 3_000_000)))
    with pytest.raises(CheckpointError, match="'tokenizer.ggml.tokens' declares an array of 4194305 elements, "
                                              "which makes more than 4194304 in all"):
        GGUFCheckpoint(patched(tmp_path, data, (tokens, "Q", (1 << 22) + 1)))


def test_bool_that_is_not_0_or_1_is_refused(base, tmp_path):
    _, lay, data = base
    with pytest.raises(CheckpointError, match="bool 'deepseek2.expert_weights_norm' at byte .* holds 2"):
        GGUFCheckpoint(patched(tmp_path, data, (lay.value_at("deepseek2.expert_weights_norm"), "B", 2)))


def test_byte_array_longer_than_the_file_does_not_hang(tmp_path):
    """gguf.GGUFReader loops without end over a uint8 array whose length runs past the file (each
    read past the end is empty and advances nothing): refused before the reader sees it."""
    path = tmp_path / "arr.gguf"
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_key_value("x.bytes", [1, 2, 3], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    w.add_tensor("t.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    lay = Layout(path)
    bad = patched(tmp_path, path.read_bytes(), (lay.value_at("x.bytes") + 4, "Q", 1 << 20))
    with time_limit(CASE_SECONDS), pytest.raises(CheckpointError, match="array 'x.bytes' of 1048576 UINT8"):
        GGUFCheckpoint(bad)


def test_string_length_past_the_file_is_named(base, tmp_path):
    _, lay, data = base
    with pytest.raises(CheckpointError, match="string value of 'general.name' .* needs 18446744073709551615 bytes"):
        GGUFCheckpoint(patched(tmp_path, data, (lay.value_at("general.name"), "Q", (1 << 64) - 1)))
    with pytest.raises(CheckpointError, match="metadata key #2 at byte .* at most 65535"):
        GGUFCheckpoint(patched(tmp_path, data, (lay.fields["deepseek2.block_count"][0][0], "Q", 1 << 20)))


@pytest.mark.parametrize("vtype,needle", [(13, "value type 13; GGUF defines 0-12"),
                                          (0xFFFFFFFF, "value type 4294967295")])
def test_unknown_value_type_is_named(base, tmp_path, vtype, needle):
    _, lay, data = base
    with pytest.raises(CheckpointError, match=f"'deepseek2.block_count' has {needle}"):
        GGUFCheckpoint(patched(tmp_path, data, (lay.type_at("deepseek2.block_count"), "I", vtype)))


def test_array_of_arrays_and_duplicate_key_are_refused(base, tmp_path):
    _, lay, data = base
    with pytest.raises(CheckpointError, match="'tokenizer.ggml.token_type' is an array of arrays"):
        GGUFCheckpoint(patched(tmp_path, data, (lay.value_at("tokenizer.ggml.token_type"), "I", 9)))
    dup = bytearray(data)
    keys = [k for k in lay.fields if not k.startswith("GGUF.")]
    a, b = next((a, b) for i, a in enumerate(keys) for b in keys[i + 1:] if len(a) == len(b))  # rename b to a
    pos = lay.fields[b][1][0]
    dup[pos:pos + len(b)] = a.encode()
    (tmp_path / "dup.gguf").write_bytes(bytes(dup))
    with pytest.raises(CheckpointError, match=f"metadata key '{a}' appears twice"):
        GGUFCheckpoint(tmp_path / "dup.gguf")


def test_key_that_is_not_utf8_is_refused(base, tmp_path):
    _, lay, data = base
    bad = patched(tmp_path, data, (lay.fields["deepseek2.block_count"][1][0], "B", 0xFF))
    with pytest.raises(CheckpointError, match="metadata key #2 at byte .* is not valid UTF-8"):
        GGUFCheckpoint(bad)


def test_bad_magic_version_and_tiny_files(base, tmp_path):
    _, _, data = base
    with pytest.raises(CheckpointError, match="GGUF version 7; hetero_rt reads versions 2 and 3"):
        GGUFCheckpoint(patched(tmp_path, data, (4, "I", 7)))
    for n in (0, 3, 10, 30):
        (tmp_path / "short.gguf").write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="too short|truncated|bad magic"):
            GGUFCheckpoint(tmp_path / "short.gguf")


@pytest.mark.parametrize("cut", ["key", "tokens", "tensor table", "data start"])
def test_header_truncated_anywhere_is_named(base, tmp_path, cut):
    _, lay, data = base
    at = {"key": lay.fields["deepseek2.block_count"][1][0] + 3, "tokens": lay.value_at("tokenizer.ggml.tokens") + 999,
          "tensor table": lay.tensor_part(lay.order[5], "dims") + 2, "data start": lay.data_start + 7}[cut]
    (tmp_path / "cut.gguf").write_bytes(data[:at])
    with pytest.raises(CheckpointError, match="truncated"):
        GGUFCheckpoint(tmp_path / "cut.gguf")


def alignment_file(tmp_path: Path, alignment: int) -> Path:
    path = tmp_path / f"align{alignment}.gguf"
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_custom_alignment(alignment)
    w.add_tensor("a.weight", np.ones((3, 32), np.float32))
    w.add_tensor("b.weight", np.ones((5, 32), np.float16))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.mark.parametrize("value,needle", [(0, "is 0; expected a power of two"), (48, "is 48; expected a power"),
                                          (1 << 30, "is 1073741824; expected a power of two up to")])
def test_bad_alignment_is_named(tmp_path, value, needle):
    path = alignment_file(tmp_path, 64)
    with GGUFCheckpoint(path) as ck:    # a non-default alignment is honoured
        assert ck.info("b.weight").offset % 64 == 0 and ck.info("b.weight").offset > 0
    lay = Layout(path)
    with pytest.raises(CheckpointError, match=f"general.alignment {needle}"):
        GGUFCheckpoint(patched(tmp_path, path.read_bytes(), (lay.value_at("general.alignment"), "I", value)))
    bad_type = patched(tmp_path, path.read_bytes(), (lay.type_at("general.alignment"), "I", 5))  # INT32
    with pytest.raises(CheckpointError, match="general.alignment is of type INT32; GGUF requires UINT32"):
        GGUFCheckpoint(bad_type)


def test_alignment_change_moves_the_data_and_is_refused(tmp_path):
    """general.alignment 64 -> 32: the data section starts elsewhere; the offsets no longer fit."""
    path = alignment_file(tmp_path, 64)
    lay = Layout(path)
    with pytest.raises(CheckpointError, match="tensor|bytes follow"):
        GGUFCheckpoint(patched(tmp_path, path.read_bytes(), (lay.value_at("general.alignment"), "I", 4096)))


def test_reader_exceptions_become_checkpoint_errors(base, tmp_path, monkeypatch):
    """Whatever the gguf package raises on a header the checks above let through is wrapped."""
    import hetero_rt.checkpoint.gguf as reader_module
    _, _, data = base
    for exc in (IndexError("index 0 is out of bounds"), MemoryError(), OverflowError("x"), KeyError("dup")):
        def boom(*_, exc=exc):
            raise exc
        monkeypatch.setattr(reader_module, "GGUFReader", boom)
        with pytest.raises(CheckpointError, match=f"corrupt GGUF header \\({type(exc).__name__}"):
            GGUFCheckpoint(patched(tmp_path, data))


# ---- metadata types and values -----------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_VALUES = [
    ("block_count", 2.5, "an integer", "a float \\(2.5\\)"),
    ("expert_count", "7", "an integer", "a string \\('7'\\)"),
    ("expert_used_count", True, "an integer", "a bool"),
    ("embedding_length", [64, 64], "an integer", "an array of 2 values"),
    ("attention.layer_norm_rms_epsilon", NAN, "a finite number > 0", "nan"),
    ("attention.layer_norm_rms_epsilon", 0.0, "a finite number > 0", "0.0"),
    ("attention.layer_norm_rms_epsilon", "1e-6", "a number", "a string"),
    ("rope.freq_base", INF, "a finite number > 0", "inf"),
    ("rope.freq_base", -10000.0, "a finite number > 0", "-10000.0"),
    ("expert_weights_scale", NAN, "a finite number > 0", "nan"),
    ("expert_weights_scale", 0, "a finite number > 0", "an integer \\(0\\)"),
    ("expert_weights_norm", 1, "a bool", "an integer \\(1\\)"),
    ("expert_used_count", 0, "an integer from 1 to 8", "\\(0\\)"),
    ("expert_used_count", 9, "an integer from 1 to 8 \\(expert_count\\)", "\\(9\\)"),
    ("block_count", 0, "an integer >= 1", "\\(0\\)"),
    ("expert_count", -3, "an integer >= 1", "\\(-3\\)"),
    ("nextn_predict_layers", 3, "an integer >= 4 \\(nextn_predict_layers is 3\\)", "\\(3\\)"),
    ("leading_dense_block_count", 4, "an integer from 0 to 3", "\\(4\\)"),
    ("expert_group_used_count", 5, "an integer from 0 to 4 \\(expert_group_count\\)", "\\(5\\)"),
    ("attention.key_length_mla", 8, "an integer >= 9 \\(a key head is nope \\+ rope dims", "\\(8\\)"),
    ("context_length", 0, "an integer >= 1", "\\(0\\)"),
    ("vocab_size", 51.0, "an integer", "a float"),
    ("rope.scaling.type", 5, "a string", "an integer"),
    ("attention.q_lora_rank", -1, "an integer >= 0", "\\(-1\\)"),
]


@pytest.mark.parametrize("key,value,expected,found", BAD_VALUES,
                         ids=[f"{k}={v!r}" for k, v, _, _ in BAD_VALUES])
def test_metadata_of_the_wrong_type_or_range_is_named(base, key, value, expected, found):
    path, _, _ = base
    with GGUFCheckpoint(path) as ck:
        meta, names = {**ck.meta, f"deepseek2.{key}": value}, ck.names()
    # the key "nextn_predict_layers" is absent in the file: block_count (3) is the one refused
    named = "block_count" if key == "nextn_predict_layers" else key
    with pytest.raises(ConfigError, match=f"'deepseek2.{named}' holds .*{found}.*; expected {expected}"):
        metadata_config(meta, names, str(path))


@pytest.mark.parametrize("key,value,expected", [
    ("rope.scaling.factor", NAN, "a finite number > 0"),
    ("rope.scaling.original_context_length", 0, "an integer >= 1"),
    ("rope.scaling.yarn_beta_fast", -32.0, "a finite number > 0"),
    ("rope.scaling.yarn_log_multiplier", INF, "a finite number >= 0"),
])
def test_yarn_values_are_checked(base, key, value, expected):
    path, _, _ = base
    yarn = {"deepseek2.rope.scaling.type": "yarn", "deepseek2.rope.scaling.factor": 8.0,
            "deepseek2.rope.scaling.original_context_length": 32}
    with GGUFCheckpoint(path) as ck:
        meta, names = {**ck.meta, **yarn, f"deepseek2.{key}": value}, ck.names()
    with pytest.raises(ConfigError, match=f"'deepseek2.{key}' holds .*; expected {expected}"):
        metadata_config(meta, names, str(path))


def test_metadata_type_changed_in_the_file_is_named(base, tmp_path):
    """UINT32 -> FLOAT32 in the bytes (same width: the header stays whole): refused at args()."""
    _, lay, data = base
    bad = patched(tmp_path, data, (lay.type_at("deepseek2.expert_used_count"), "I", gguf.GGUFValueType.FLOAT32))
    with pytest.raises(ConfigError, match="'deepseek2.expert_used_count' holds a float .*; expected an integer"):
        open_args(bad)
    with pytest.raises(ConfigError, match="expert_used_count"):
        hetero_rt.load(bad, TORCH_RULES)


@pytest.mark.parametrize("key,value", [("tokenizer.ggml.bos_token_id", "0"), ("tokenizer.ggml.eos_token_id", -1),
                                       ("tokenizer.ggml.bos_token_id", 1.0)])
def test_token_ids_of_the_wrong_type_are_named(base, key, value):
    path, _, _ = base
    with GGUFCheckpoint(path) as ck:
        meta, names = {**ck.meta, key: value}, ck.names()
    with pytest.raises(ConfigError, match=f"'{key}' holds .*; expected a token id"):
        metadata_config(meta, names, str(path))


def test_undecodable_metadata_value_is_named(base, tmp_path):
    path, lay, data = base
    bad = patched(tmp_path, data, (lay.value_at("general.name") + 8, "B", 0xFF))   # its first byte
    with GGUFCheckpoint(bad) as ck:     # nothing reads general.name: the file still opens
        assert isinstance(ck.meta["general.name"], CheckpointError)
        meta, names = {**ck.meta, "deepseek2.expert_count": ck.meta["general.name"]}, ck.names()
        assert ck.args().n_routed_experts == 8
    with pytest.raises(ConfigError, match="metadata key 'general.name' cannot be decoded"):
        metadata_config(meta, names, str(path))


@pytest.mark.parametrize("key,value,needle", [
    ("tokenizer.ggml.tokens", [1, 2, 3], "'tokenizer.ggml.tokens' holds an array of 3 values; expected an array of strings"),
    ("tokenizer.ggml.merges", "a b", "'tokenizer.ggml.merges' holds a string"),
    ("tokenizer.ggml.token_type", [1, 2], "token_type has 2 entries for 512 tokens"),
    ("tokenizer.ggml.token_type", ["1"] * 512, "'tokenizer.ggml.token_type' holds an array of 512"),
    ("tokenizer.ggml.bos_token_id", 1.5, "'tokenizer.ggml.bos_token_id' holds a float"),
    ("tokenizer.ggml.eos_token_id", [1], "'tokenizer.ggml.eos_token_id' holds an array"),
    ("tokenizer.ggml.add_bos_token", 1, "'tokenizer.ggml.add_bos_token' holds an integer \\(1\\); expected a bool"),
    ("tokenizer.chat_template", 5, "'tokenizer.chat_template' holds an integer"),
    ("tokenizer.ggml.pre", ["x"], "'tokenizer.ggml.pre' holds an array"),
    ("tokenizer.ggml.model", 2, "tokenizer.ggml.model' holds an integer"),
])
def test_tokenizer_keys_of_the_wrong_type_are_named(base, key, value, needle):
    path, _, _ = base
    with GGUFCheckpoint(path) as ck:
        meta = {**ck.meta, key: value}
    with pytest.raises(CheckpointError, match=needle):
        Tokenizer.from_gguf(meta, str(path))


def test_tokenizer_merges_that_do_not_fit_the_vocabulary_are_named(base):
    path, _, _ = base
    with GGUFCheckpoint(path) as ck:
        meta = dict(ck.meta)
    merges = list(meta["tokenizer.ggml.merges"])
    with pytest.raises(CheckpointError, match="tokenizer.ggml.merges\\[0\\] is 'nospace'"):
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.merges": ["nospace"] + merges}, str(path))
    with pytest.raises(CheckpointError, match="do not make a BPE vocabulary"):
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.merges": ["zzq qqz"] + merges}, str(path))


def test_split_counts_of_the_wrong_type_are_named(tmp_path):
    for no in (0, 1):
        w = gguf.GGUFWriter(tmp_path / f"m-{no + 1:05d}-of-00002.gguf", "deepseek2")
        w.add_float32("split.no", float(no))  # llama.cpp's gguf-split writes a UINT16
        w.add_uint16("split.count", 2)
        w.add_tensor(f"t{no}.weight", np.zeros((2, 32), np.float32))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="'split.no' holds a float \\(0.0\\); expected an integer"):
        GGUFCheckpoint(tmp_path / "m-00001-of-00002.gguf")


# ---- mutation fuzz of the header ---------------------------------------------------------------------

_CODES = {"u1": "B", "i1": "b", "u2": "H", "i2": "h", "u4": "I", "i4": "i", "u8": "Q", "i8": "q",
          "f4": "f", "f8": "d", "b1": "?"}


def _special_values(code: str, old, rng: random.Random, file_size: int):
    """Values that break parsers: the type's limits, off-by-one and off-by-alignment of the old value,
    sizes near the file's, NaN and infinities."""
    if code == "f" or code == "d":
        return [NAN, INF, -INF, 0.0, -1.0, 1e30, old * 2, -old, old + 1e-3]
    if code == "?":
        return [0, 1]
    bits = struct.calcsize(code) * 8
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if code.islower() else (0, (1 << bits) - 1)
    values = [0, 1, hi, lo, hi // 2 + 1, old + 1, old - 1, old + 32, old - 32, old * 2, old // 2,
              rng.randrange(lo, hi + 1), rng.randrange(0, file_size), file_size - old]
    if bits >= 32:
        values += [rng.randrange(0, 41), 1 << 31, 1 << 32, 1 << 63]
    return [v for v in values if lo <= v <= hi]


class Mutator:
    """Seeded mutants of the header region [0, data start): byte flips anywhere, a parsed field (a count,
    length, type, dimension, offset or metadata value) replaced by a special value, a metadata value type
    swapped, truncation, bytes inserted or deleted."""

    def __init__(self, data: bytes, lay: Layout, seed: int):
        self.data, self.lay, self.rng = data, lay, random.Random(seed)
        self.parts = [(name, p) for table in (lay.fields, lay.tensors) for name, parts in table.items()
                      for p in parts]
        self.entries = list(lay.fields.items()) + list(lay.tensors.items())

    def __call__(self) -> tuple[str, bytes]:
        kind = self.rng.choices(["flip", "field", "vtype", "truncate", "splice"], [30, 45, 10, 5, 10])[0]
        return getattr(self, kind)()

    def flip(self):
        buf = bytearray(self.data)
        spots = [self.rng.randrange(self.lay.data_start) for _ in range(self.rng.randint(1, 3))]
        for pos in spots:
            buf[pos] ^= self.rng.randrange(1, 256)
        return f"flip bytes {spots}", bytes(buf)

    def field(self):
        name, parts = self.rng.choice(self.entries)   # an entry first: the 512 tokens do not drown the rest
        pos, dtype, count = self.rng.choice(parts)
        code = _CODES[f"{dtype.kind}{dtype.itemsize}"]
        pos += struct.calcsize(code) * self.rng.randrange(count)    # one element of a multi-element part
        old = struct.unpack_from("<" + code, self.data, pos)[0]
        new = self.rng.choice(_special_values(code, old, self.rng, len(self.data)))
        buf = bytearray(self.data)
        struct.pack_into("<" + code, buf, pos, new)
        return f"{name} @{pos}: {old!r} -> {new!r}", bytes(buf)

    def vtype(self):
        key = self.rng.choice([k for k in self.lay.fields if not k.startswith("GGUF.")])
        pos = self.lay.type_at(key)
        new = self.rng.randrange(0, 14)
        buf = bytearray(self.data)
        struct.pack_into("<I", buf, pos, new)
        return f"value type of {key} -> {new}", bytes(buf)

    def truncate(self):
        at = self.rng.randrange(self.lay.data_start)
        return f"truncate at {at}", self.data[:at]

    def splice(self):
        pos, n = self.rng.randrange(self.lay.data_start), self.rng.randint(1, 8)
        if self.rng.random() < 0.5:
            return f"delete {n} bytes at {pos}", self.data[:pos] + self.data[pos + n:]
        return f"insert {n} bytes at {pos}", self.data[:pos] + self.rng.randbytes(n) + self.data[pos:]


def parsed_header(ck: GGUFCheckpoint):
    """What opening a GGUF yields: the metadata, and every tensor's name, type, shape and offset."""
    return ck.meta, [(n, ck.info(n).type, ck.info(n).shape, ck.info(n).offset) for n in ck.names()]


@dataclass
class Reference:
    """The intact file's header, ModelArgs and logits; full_loads: intact mutants still to run end to end."""
    header: tuple
    args: object
    logits: np.ndarray
    full_loads: int


def outcome(path: Path, ref: Reference) -> str:
    """-> 'error:open' | 'error:metadata' | 'error:load' | 'intact' | 'changed:metadata' | 'changed:tensors';
    anything but a HeteroRTError escapes (and fails the test)."""
    try:
        ck = GGUFCheckpoint(path)
    except HeteroRTError:
        return "error:open"
    with ck:
        header = parsed_header(ck)
        try:
            args = ck.args()
            Tokenizer.from_gguf(ck.meta, str(path)).encode("a test")
        except HeteroRTError:
            return "error:metadata"
    if header == ref.header:
        assert args == ref.args
        if ref.full_loads > 0:   # the whole path, file to logits, on the first few intact mutants
            ref.full_loads -= 1
            logits = hetero_rt.load(path, TORCH_RULES, dtype="float32").logits(IDS)
            np.testing.assert_array_equal(logits, ref.logits)
        return "intact"
    # a header that differs yet is valid (a token's text, a float's last bits, F16 <-> BF16): it must
    # still load cleanly or be refused cleanly, and give finite logits
    try:
        logits = hetero_rt.load(path, TORCH_RULES, dtype="float32").logits(IDS)
    except HeteroRTError:
        return "error:load"
    assert np.isfinite(logits).all(), "a changed header loaded and gave non-finite logits"
    return "changed:tensors" if header[1] != ref.header[1] else "changed:metadata"


def run_fuzz(base, tmp_path: Path, seed: int, cases: int, full_loads: int) -> Counter:
    path, lay, data = base
    with GGUFCheckpoint(path) as ck:
        ref = Reference(parsed_header(ck), ck.args(), None, full_loads)
    ref.logits = hetero_rt.load(path, TORCH_RULES, dtype="float32").logits(IDS)
    mutate, counts, failures, changed = Mutator(data, lay, seed), Counter(), [], Counter()
    target = tmp_path / "mutant.gguf"
    for case in range(cases):
        what, mutant = mutate()
        target.write_bytes(mutant)
        try:
            with time_limit(CASE_SECONDS):
                result = outcome(target, ref)
        except (Exception, CaseTimeout) as e:  # noqa: BLE001 - the point: nothing else may escape
            failures.append(f"case {case} ({what}): {type(e).__name__}: {e}"[:400])
            result = "FAILED"
        counts[result] += 1
        if result.startswith("changed"):
            changed[what.split(" @")[0]] += 1
    print(f"\nGGUF header fuzz, seed {seed}: {cases} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print("  changed yet valid, by mutation: " + (", ".join(f"{k} {v}" for k, v in changed.most_common(15)) or "none"))
    assert not failures, f"{len(failures)} of {cases} mutants escaped:\n" + "\n".join(failures[:20])
    return counts


def test_header_mutation_fuzz(base, tmp_path):
    counts = run_fuzz(base, tmp_path, seed=1, cases=1200, full_loads=3)
    assert counts["intact"] > 0 and counts["error:open"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_header_mutation_fuzz_long(base, tmp_path, seed):
    run_fuzz(base, tmp_path, seed=seed, cases=6000, full_loads=10)
