"""--model as a Hugging Face model id, as llama.cpp's `-hf` and Ollama's names work: `org/name` (a
safetensors repository: config, weights, tokenizer files) or `org/name:file.gguf` / `org/name:QUANT`
(one GGUF file, or every part of a split one, chosen by its quant tag, e.g. `:Q4_K_M`), resolved
through the Hugging Face cache with huggingface_hub. Downloads where the network allows; with
HF_HUB_OFFLINE=1, or when the Hub cannot be reached, only the cache is used, and a miss says which.

A path that exists always wins: `resolve("org/name")` is the directory org/name when there is one.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from ..errors import CheckpointError

MODEL_ID = re.compile(r"([A-Za-z0-9][\w.-]*)/([A-Za-z0-9][\w.-]*)(?::(.+))?")
SAFETENSORS_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.py", "*.jinja"]
SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def is_model_id(spec: str | Path) -> bool:
    return not Path(spec).exists() and MODEL_ID.fullmatch(str(spec)) is not None


def resolve(spec: str | Path) -> Path:
    """The local path of spec: itself when it exists, else the Hugging Face files it names (see the
    module docstring); a string that is neither is returned as a Path (its reader then says so)."""
    if not is_model_id(spec):
        return Path(spec)
    m = MODEL_ID.fullmatch(str(spec))
    repo, selector = f"{m[1]}/{m[2]}", m[3]
    patterns = SAFETENSORS_FILES if selector is None else gguf_patterns(selector)
    snapshot = _download(repo, patterns, str(spec))
    if selector is None:
        if not (snapshot / "config.json").is_file():
            ggufs = sorted(p.name for p in snapshot.rglob("*.gguf"))
            hint = f"; it holds GGUF files: pick one with {repo}:FILE.gguf or {repo}:QUANT" if ggufs else ""
            raise CheckpointError(f"{spec}: the Hugging Face repository has no config.json{hint}")
        return snapshot
    return pick_gguf(snapshot, selector, str(spec))


def gguf_patterns(selector: str) -> list[str]:
    if selector.endswith(".gguf"):
        part = SPLIT.search(selector)
        stem = selector[:part.start()] if part else selector[:-len(".gguf")]
        return [selector, f"{stem}-*-of-*.gguf"]
    return [f"*{selector}*.gguf", f"*{selector}*/*.gguf", f"*{selector.lower()}*.gguf", f"*{selector.upper()}*.gguf"]


def pick_gguf(snapshot: Path, selector: str, spec: str) -> Path:
    """The GGUF file (the first part of a split one) in the snapshot that the selector names."""
    files = sorted(p for p in snapshot.rglob("*.gguf"))
    if selector.endswith(".gguf"):
        hits = [p for p in files if p.relative_to(snapshot).as_posix() == selector or p.name == selector]
    else:
        tag = selector.lower()
        hits = [p for p in files if tag in p.relative_to(snapshot).as_posix().lower()]
    firsts = [p for p in hits if not SPLIT.search(p.name) or SPLIT.search(p.name)[1] == "00001"]
    if not firsts:
        have = ", ".join(p.relative_to(snapshot).as_posix() for p in files) or "none"
        raise CheckpointError(f"{spec}: no GGUF file matching {selector!r} in the repository (GGUF files there: {have})")
    if len({p.parent / SPLIT.sub('', p.name) for p in firsts}) > 1:
        raise CheckpointError(f"{spec}: {selector!r} matches several GGUF files "
                              f"({', '.join(p.name for p in firsts)}); name the file: {spec.split(':')[0]}:FILE.gguf")
    return firsts[0]


def _download(repo: str, patterns: list[str], spec: str) -> Path:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=offline))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{spec}: no such file or directory, and no Hugging Face repository {repo} (or it is "
                              f"private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub could not be reached"
        raise CheckpointError(f"{spec}: not a local path, and {repo} is not in the Hugging Face cache "
                              f"({os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'}) while {where}; "
                              f"download it where there is network (hf download {repo}) or pass a path") from None
