"""SafetensorsCheckpoint: values, zero-copy views, fp8 block dequantization, errors found at open
that name the file and the tensor, and (slow) peak RSS of loading a 1 GiB checkpoint."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hetero_rt.bench.rss import measure_load_peak_rss, measure_model_load_peak_rss, write_sized_checkpoint
from hetero_rt.checkpoint.safetensors import (INDEX_FILE, SafetensorsCheckpoint, TensorInfo,
                                              dequantize_fp8_block, quantize_fp8_block)
from hetero_rt.errors import CheckpointError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(11, 6, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(5, 6, generator=g).to(torch.float16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(6, 5, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(6, generator=g).to(torch.bfloat16),
        "model.layers.0.positions": torch.arange(7),
    }


def _write_sharded(directory: Path, tensors: dict[str, torch.Tensor], n_shards: int = 2) -> dict[str, str]:
    names = sorted(tensors)
    weight_map = {}
    for s in range(n_shards):
        file = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::n_shards]}
        save_file(part, directory / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return weight_map


def _write_raw(path: Path, header: dict, data: bytes) -> None:
    """A safetensors file written by hand, to build headers save_file would refuse."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _check_contents(ckpt: SafetensorsCheckpoint, tensors: dict[str, torch.Tensor]) -> None:
    assert ckpt.names() == sorted(tensors)
    for name, t in tensors.items():
        assert name in ckpt
        info = ckpt.info(name)
        assert info.shape == tuple(t.shape) and info.nbytes == t.numel() * t.element_size()
        raw = ckpt.raw(name)
        assert raw.dtype == t.dtype and raw.shape == t.shape
        assert torch.equal(raw, t)
    assert ckpt.total_bytes() == sum(t.numel() * t.element_size() for t in tensors.values())


# -- reading ------------------------------------------------------------------------------------------

def test_single_file(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        _check_contents(ckpt, tensors)
        info = ckpt.info("model.layers.0.mlp.down_proj.weight")
        assert isinstance(info, TensorInfo)
        assert (info.file, info.dtype, info.shape) == (tmp_path / "model.safetensors", "BF16", (6, 5))
        assert ckpt.info("model.embed_tokens.weight").dtype == "F32"
        assert ckpt.info("model.layers.0.mlp.up_proj.weight").dtype == "F16"


def test_sharded_index(tmp_path):
    tensors = _tensors()
    weight_map = _write_sharded(tmp_path, tensors, n_shards=3)
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        _check_contents(ckpt, tensors)
        for name, file in weight_map.items():
            assert ckpt.info(name).file == tmp_path / file


def test_offsets_are_absolute(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        info = ckpt.info("model.embed_tokens.weight")
        stored = torch.frombuffer(bytearray(data[info.offset:info.offset + info.nbytes]), dtype=torch.float32)
        assert torch.equal(stored.view(11, 6), tensors["model.embed_tokens.weight"])


def test_load_converts_only_when_asked(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        name = "model.layers.0.mlp.down_proj.weight"
        as_f32 = ckpt.load(name, (6, 5), torch.float32)
        assert as_f32.dtype == torch.float32 and torch.equal(as_f32, tensors[name].float())
        assert as_f32.data_ptr() != ckpt.raw(name).data_ptr()
        assert ckpt.load(name, (6, 5)).dtype == torch.bfloat16


def test_raw_and_load_are_zero_copy(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        ptrs = {}
        for name in tensors:
            raw = ckpt.raw(name)
            assert ckpt.raw(name).data_ptr() == raw.data_ptr()                    # same bytes, not a copy
            if raw.is_floating_point():
                assert ckpt.load(name, tuple(raw.shape), raw.dtype).data_ptr() == raw.data_ptr()
            ptrs[name] = raw.data_ptr() - ckpt.info(name).offset
        # every tensor sits at its file offset from one common base: the single mapping of the file
        assert len(set(ptrs.values())) == 1
        # writable copy-on-write view: a write shows through the same memory and never reaches the file
        name = "model.embed_tokens.weight"
        ckpt.raw(name)[0, 0] = 1234.0
        assert ckpt.raw(name)[0, 0] == 1234.0
    with SafetensorsCheckpoint(tmp_path) as fresh:
        assert torch.equal(fresh.raw(name), tensors[name])


def test_tensors_outlive_close(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = SafetensorsCheckpoint(tmp_path)
    kept = ckpt.raw("model.embed_tokens.weight")
    ckpt.close()
    assert torch.equal(kept, tensors["model.embed_tokens.weight"])
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.raw("model.embed_tokens.weight")


# -- fp8 ----------------------------------------------------------------------------------------------

def _reference_dequant(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = w8.shape
    full = scale.repeat_interleave(128, dim=0)[:rows].repeat_interleave(128, dim=1)[:, :cols]
    return (w8.float() * full).to(torch.bfloat16)


def test_fp8_block_dequantization(tmp_path):
    w = torch.randn(300, 260, generator=torch.Generator().manual_seed(1)) * 0.02
    w[:128, 128:256] *= 50                                  # blocks with very different scales
    w8, scale = quantize_fp8_block(w)
    assert w8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (3, 3)
    save_file({"layer.weight": w8, "layer.weight_scale_inv": scale}, tmp_path / "model.safetensors")
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert ckpt.scale_names() == {"layer.weight_scale_inv"}
        assert ckpt.raw("layer.weight").dtype == torch.float8_e4m3fn
        got = ckpt.load("layer.weight", (300, 260))
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, _reference_dequant(w8, scale), rtol=0, atol=0)
        as_f32 = ckpt.load("layer.weight", (300, 260), torch.float32)
    # e4m3 rounding: relative 2^-4 for normals, absolute half a subnormal step (2^-10) x block scale
    err = (as_f32 - w).abs()
    block_scale = _reference_dequant(torch.ones(300, 260), scale).float()
    assert (err <= w.abs() * 2 ** -4 + block_scale * 2 ** -10).all()
    assert err.max() < 0.07 * w.abs().max()


def test_dequantize_rejects_wrong_scale_shape():
    w8, scale = quantize_fp8_block(torch.randn(300, 260))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(300, 260\).*\(3, 3\)"):
        dequantize_fp8_block(w8, scale[:2])


def test_fp8_scale_of_wrong_shape_names_tensor(tmp_path):
    w8, scale = quantize_fp8_block(torch.randn(300, 260))
    save_file({"layer.weight": w8, "layer.weight_scale_inv": scale[:, :2].contiguous()}, tmp_path / "m.safetensors")
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=r"m\.safetensors.*layer\.weight.*\(3, 2\).*\(3, 3\)"):
            ckpt.load("layer.weight", (300, 260))


def test_fp8_without_scale(tmp_path):
    w8, _ = quantize_fp8_block(torch.randn(130, 140))
    save_file({"layer.weight": w8}, tmp_path / "model.safetensors")
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert ckpt.scale_names() == set()
        with pytest.raises(CheckpointError, match=r"model\.safetensors.*layer\.weight.*layer\.weight_scale_inv"):
            ckpt.load("layer.weight", (130, 140))


# -- errors -------------------------------------------------------------------------------------------

def test_truncated_file_fails_at_open(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-3])
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors.*truncated.*'{re.escape(last)}'"):
        SafetensorsCheckpoint(tmp_path)


def test_header_length_past_end(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*header length.*past the end"):
        SafetensorsCheckpoint(tmp_path)


def test_garbage_header(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 16) + b"\x00garbage{{not js" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not valid JSON"):
        SafetensorsCheckpoint(tmp_path)


def test_file_too_short(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*too short"):
        SafetensorsCheckpoint(tmp_path)


def test_unknown_dtype(tmp_path):
    _write_raw(tmp_path / "model.safetensors", {"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'w'.*unknown dtype 'F7'"):
        SafetensorsCheckpoint(tmp_path)


def test_offsets_inconsistent_with_shape(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    _write_raw(tmp_path / "model.safetensors", header, b"\0" * 24)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'w'.*span 20 bytes, expected 24"):
        SafetensorsCheckpoint(tmp_path)


def test_index_names_missing_shard(tmp_path):
    _write_sharded(tmp_path, _tensors())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"index\.json.*tensor '.+'.*model-00002-of-00002\.safetensors"):
        SafetensorsCheckpoint(tmp_path)


def test_index_names_tensor_absent_from_shard(tmp_path):
    weight_map = _write_sharded(tmp_path, _tensors())
    weight_map["model.layers.9.ghost.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.9\.ghost\.weight.*model-00001-of-00002\.safetensors"):
        SafetensorsCheckpoint(tmp_path)


def test_index_not_json(tmp_path):
    _write_sharded(tmp_path, _tensors())
    (tmp_path / INDEX_FILE).write_text("{weight_map: ")
    with pytest.raises(CheckpointError, match=r"index\.json.*not valid JSON"):
        SafetensorsCheckpoint(tmp_path)


def test_duplicate_tensor_across_files(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"b\.safetensors.*'w'.*a\.safetensors"):
        SafetensorsCheckpoint(tmp_path)


def test_load_wrong_shape(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    with SafetensorsCheckpoint(tmp_path) as ckpt, pytest.raises(CheckpointError) as e:
        ckpt.load("model.layers.0.mlp.up_proj.weight", (6, 5))
    msg = str(e.value)
    assert "model.safetensors" in msg and "model.layers.0.mlp.up_proj.weight" in msg
    assert "[5, 6]" in msg and "expected [6, 5]" in msg


def test_load_integer_tensor_as_weight(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert torch.equal(ckpt.raw("model.layers.0.positions"), torch.arange(7))   # raw() still reads it
        with pytest.raises(CheckpointError, match=r"model\.safetensors.*model\.layers\.0\.positions.*I64"):
            ckpt.load("model.layers.0.positions", (7,))


def test_missing_tensor_name(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert "model.norm.weights" not in ckpt
        with pytest.raises(CheckpointError, match=rf"{tmp_path.name}.*'model\.norm\.weights'.*model\.norm\.weight"):
            ckpt.load("model.norm.weights", (6,))


def test_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=rf"{tmp_path.name}.*no \*\.safetensors"):
        SafetensorsCheckpoint(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        SafetensorsCheckpoint(tmp_path / "absent")


# -- memory -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_gib(tmp_path_factory):
    return write_sized_checkpoint(tmp_path_factory.mktemp("rss") / "ckpt", 1 << 30)


@pytest.mark.slow
def test_peak_rss_of_loading_1gib(one_gib):
    rss = measure_load_peak_rss(one_gib)
    assert rss.checkpoint_bytes >= 1 << 30
    assert rss.peak_rss_bytes < rss.checkpoint_bytes * 1.25 + (300 << 20), rss.report()


@pytest.mark.slow
@pytest.mark.parametrize("rules", [None, "cpu-only.yaml", "deepseek-v2-lite-8gb.yaml"])
def test_peak_rss_of_loading_the_model_1gib(one_gib, rules):
    """hetero_rt.load() of a whole bf16 model (routed experts stacked from the file, the rest mapped),
    plus one forward: no second copy of the checkpoint in RAM, whatever the placement."""
    path = Path(__file__).parent.parent / "placement_rules" / rules if rules else None
    rss = measure_model_load_peak_rss(one_gib, path)
    assert rss.peak_rss_bytes < rss.checkpoint_bytes * 1.25 + (400 << 20), rss.report()
