"""--model as a Hugging Face model id (hetero_rt.checkpoint.hub), offline, from a Hugging Face cache
laid out in a temporary directory as huggingface_hub lays it out (models--org--name/refs/main ->
snapshots/<commit>/...): a safetensors repository loads and equals the same checkpoint by path; a GGUF
repository's file is chosen by quant tag or file name (the first part of a split file); misses and
ambiguities say what exists; an existing path always wins."""
import shutil
from pathlib import Path

import numpy as np
import pytest

import hetero_rt
from hetero_rt.checkpoint import hub
from hetero_rt.errors import CheckpointError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", synthetic_config("tiny"),
                                      seed=0, dtype="float32")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)

    def add(repo: str, files: dict) -> Path:
        d = root / f"models--{repo.replace('/', '--')}"
        snap = d / "snapshots" / COMMIT
        (d / "refs").mkdir(parents=True, exist_ok=True)
        (d / "refs" / "main").write_text(COMMIT)
        for name, src in files.items():
            (snap / name).parent.mkdir(parents=True, exist_ok=True)
            if src is None:
                (snap / name).write_bytes(b"GGUF")
            else:
                shutil.copy(src, snap / name)
        return snap
    return add


def test_safetensors_repo_loads_like_its_path(tiny, cache):
    snap = cache("acme/Tiny-MoE", {p.name: p for p in tiny.iterdir() if p.is_file()})
    assert hub.resolve("acme/Tiny-MoE") == snap
    rt = hetero_rt.load("acme/Tiny-MoE", dtype="float32")
    ids = [0, 5, 9, 33]
    np.testing.assert_array_equal(rt.logits(ids), hetero_rt.load(tiny, dtype="float32").logits(ids))
    assert rt.source.name == "Tiny-MoE"          # the served model name


def test_gguf_repo_by_quant_tag_or_file(cache):
    snap = cache("acme/Big-GGUF", {"big-Q2_K.gguf": None, "Q4_K_M/big-Q4_K_M-00001-of-00002.gguf": None,
                                   "Q4_K_M/big-Q4_K_M-00002-of-00002.gguf": None})
    assert hub.resolve("acme/Big-GGUF:Q4_K_M") == snap / "Q4_K_M" / "big-Q4_K_M-00001-of-00002.gguf"
    assert hub.resolve("acme/Big-GGUF:q2_k") == snap / "big-Q2_K.gguf"
    assert hub.resolve("acme/Big-GGUF:big-Q2_K.gguf") == snap / "big-Q2_K.gguf"
    with pytest.raises(CheckpointError, match=r"no GGUF file matching 'IQ1_S'.*big-Q2_K\.gguf"):
        hub.resolve("acme/Big-GGUF:IQ1_S")
    with pytest.raises(CheckpointError, match="no config.json; it holds GGUF files: pick one"):
        hub.resolve("acme/Big-GGUF")
    with pytest.raises(CheckpointError, match="matches several GGUF files"):
        hub.resolve("acme/Big-GGUF:big")


def test_a_miss_offline_says_so_and_an_existing_path_wins(cache, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE is set"):
        hetero_rt.load("nobody/nothing")
    local = tmp_path / "nobody" / "nothing"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("nobody/nothing") == Path("nobody/nothing")     # the directory, not the Hub
    with pytest.raises(hetero_rt.errors.HeteroRTError, match="nobody/nothing/config.json: not found"):
        hetero_rt.load("nobody/nothing")
