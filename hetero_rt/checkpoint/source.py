"""Where a checkpoint comes from: a Hugging Face directory (config.json + *.safetensors, or only the
metadata for planning) or a GGUF file (one file or any part of a split set). `open_source(path)` is
the one place that tells the two apart; the rest of hetero_rt asks the source for its ModelArgs,
its tensor metadata (planning, no weights read), its weights (a loader) and its tokenizer.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from ..config import ModelArgs
from ..errors import CheckpointError
from . import hub
from .gguf import GGUFCheckpoint, is_gguf
from .gguf_loader import GGUFLoader
from .loader import SafetensorsLoader
from .names import gguf_expert_hf_names, gguf_to_hf, hf_tensor_shapes
from .safetensors import SafetensorsCheckpoint
from .tokenizer import TIKTOKEN_FILE, Tokenizer

SHAPES_FILE = "tensor_shapes.json.gz"
EMBEDDING = "model.embed_tokens.weight"
TensorMeta = dict[str, tuple[str, tuple[int, ...]]]   # HF name -> (stored dtype or ggml type, shape)


def default_dtype(tensors: TensorMeta) -> str:
    """The dtype a model runs in when neither the rules nor the caller set one: float32 for a
    checkpoint that stores its embedding in F32, else bfloat16."""
    return "float32" if tensors.get(EMBEDDING, ("BF16",))[0] == "F32" else "bfloat16"


def open_source(path: str | Path) -> "DirectorySource | GGUFSource":
    """A checkpoint directory, a GGUF file (any part of a split one), or a Hugging Face model id
    (checkpoint.hub: org/name, org/name:QUANT, org/name:FILE.gguf) resolved through the HF cache."""
    path = hub.resolve(path)
    return GGUFSource(path) if is_gguf(path) else DirectorySource(path)


class DirectorySource:

    def __init__(self, path: Path):
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory; pass a checkpoint directory "
                                  f"(config.json + *.safetensors)")
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a Hugging Face checkpoint directory (config.json + "
                                  f"*.safetensors)")
        self.path = path
        self._ckpt: SafetensorsCheckpoint | None = None
        self._meta: TensorMeta | None = None

    @property
    def in_place(self) -> bool:
        """Whether the routed experts are stored in a format the CPU kernels read as stored without
        expanding it: block FP8 (the official DeepSeek-V3/R1 and Kimi-K2 releases). bf16/fp16
        checkpoints are not: their default placement stays in their dtype on the device asked for."""
        meta = self._meta if self._meta is not None else self.tensor_meta(self.args())
        return any(dtype == "F8_E4M3" and n.replace(".weight", ".weight_scale_inv") in meta
                   for n, (dtype, _) in meta.items() if ".mlp.experts." in n)

    @property
    def ckpt(self) -> SafetensorsCheckpoint:
        if self._ckpt is None:
            self._ckpt = SafetensorsCheckpoint(self.path)
        return self._ckpt

    def args(self) -> ModelArgs:
        return ModelArgs.from_config_file(self.path / "config.json")

    def embedding_dtype(self) -> str:
        return default_dtype({EMBEDDING: (self.ckpt.info(EMBEDDING).dtype, ())} if EMBEDDING in self.ckpt else {})

    def tensor_meta(self, args: ModelArgs | None = None) -> TensorMeta:
        """From the safetensors headers; for a metadata-only description, from tensor_shapes.json.gz
        ({"tensors": {name: [dtype, shape]}}); for a directory holding only config.json (planning
        before a download), derived from `args`."""
        if self._meta is None:
            self._meta = self._read_meta(args)
        return self._meta

    def _read_meta(self, args: ModelArgs | None) -> TensorMeta:
        shapes = self.path / SHAPES_FILE
        if args is not None and not shapes.is_file() and not any(self.path.glob("*.safetensors")):
            return hf_tensor_shapes(args)
        if shapes.is_file():
            try:
                data = json.loads(gzip.decompress(shapes.read_bytes()))
                return {n: (d, tuple(s)) for n, (d, s) in data["tensors"].items()}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{shapes}: not a tensor shape description ({e})") from None
        return {n: (self.ckpt.info(n).dtype, self.ckpt.info(n).shape) for n in self.ckpt.names()}

    def loader(self, args: ModelArgs) -> SafetensorsLoader:
        return SafetensorsLoader(self.ckpt, args)

    def tokenizer(self) -> Tokenizer | None:
        has = (self.path / "tokenizer.json").exists() or (self.path / TIKTOKEN_FILE).exists()
        return Tokenizer.from_dir(self.path) if has else None

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()


class GGUFSource:
    in_place = True      # ggml types the CPU kernels read in place (experts.registry, kernels.stored)

    def __init__(self, path: Path):
        self.path = path
        self.ckpt = GGUFCheckpoint(path)

    def args(self) -> ModelArgs:
        return self.ckpt.args()

    def embedding_dtype(self) -> str:
        return default_dtype({EMBEDDING: (self.ckpt.info("token_embd.weight").type, ())})

    def tensor_meta(self, args: ModelArgs | None = None) -> TensorMeta:
        """The GGUF's tensors under the HF names the placement rules match: fused experts become one
        entry per expert, attn_k_b + attn_v_b the kv_b projection; dtype is the GGML type name."""
        out: TensorMeta = {}
        args = args or self.args()
        for name in self.ckpt.names():
            info = self.ckpt.info(name)
            hf = gguf_to_hf(name, args)
            if not hf:
                continue
            per_expert = gguf_expert_hf_names(name, info.shape[0], args)
            if per_expert is not None:
                out.update({n: (info.type, info.shape[1:]) for n in per_expert})
            elif name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
                h, a, b = info.shape
                rows = h * (b if name.endswith("attn_k_b.weight") else a)     # k_b (H, C, N), v_b (H, V, C)
                prev = out.get(hf[0], (info.type, (0, a if name.endswith("attn_k_b.weight") else b)))
                out[hf[0]] = (info.type, (prev[1][0] + rows, prev[1][1]))
            else:
                out[hf[0]] = (info.type, info.shape)
        return out

    def loader(self, args: ModelArgs) -> GGUFLoader:
        return GGUFLoader(self.ckpt, args)

    def tokenizer(self) -> Tokenizer | None:
        return Tokenizer.from_gguf(self.ckpt.meta, str(self.path)) if "tokenizer.ggml.tokens" in self.ckpt.meta \
            else None

    def close(self) -> None:
        self.ckpt.close()


def read_tensor_meta(path: str | Path, args: ModelArgs | None = None) -> TensorMeta:
    """Tensor metadata of the checkpoint at `path` (see the sources' tensor_meta)."""
    source = open_source(path)
    try:
        return source.tensor_meta(args)
    finally:
        source.close()
