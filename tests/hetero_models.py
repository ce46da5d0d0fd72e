"""Shared pieces of the hetero-backend tests (test_scheduler, test_prefetch, test_expert_cache,
test_numba_experts): the tiny synthetic checkpoint and its greedy run, the logits tolerance, and
host experts in a stored format with their dequantized torch reference."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
from hetero_rt.experts.numba_backend import NumbaExperts
from hetero_rt.experts.torch_backend import TorchExperts
from hetero_rt.quant import ggml

CFG = dict(num_hidden_layers=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
PROMPT = [5, 17, 99, 3, 250, 1000, 42, 7, 7, 64, 12, 901, 33, 2, 18, 444, 76, 1500, 8, 300]
DECODE = 6


def hetero_checkpoint(directory: Path) -> Path:
    return write_synthetic_checkpoint(directory / "ckpt", synthetic_config("tiny", **CFG), seed=3, dtype="float32",
                                      tokenizer=False)


def run(rt) -> list[np.ndarray]:
    """Prefill logits of PROMPT, then DECODE greedy steps of one token: the logits of every call."""
    out = [rt.step(torch.tensor(PROMPT), 0).numpy()]
    pos, tok = len(PROMPT), int(out[0][-1].argmax())
    for _ in range(DECODE):
        out.append(rt.step(torch.tensor([tok]), pos).numpy())
        pos, tok = pos + 1, int(out[-1][-1].argmax())
    return out


def close(got, want):
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max()


def host_experts(n_experts=8, dim=32, inter=16, fmt="fp32", seed=0) -> NumbaExperts:
    g = torch.Generator().manual_seed(seed)
    te = TorchExperts(n_experts, dim, inter)
    with torch.no_grad():
        for p in (te.w1, te.w3, te.w2):
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return NumbaExperts.from_torch(te, fmt)


def dequantized_reference(ne: NumbaExperts) -> TorchExperts:
    """TorchExperts holding exactly the weights `ne` stores, dequantized to fp32."""
    ref = TorchExperts(ne.n_experts, ne.dim, ne.inter_dim)
    with torch.no_grad():
        for name, f in (("w1", ne.fmt13), ("w3", ne.fmt13), ("w2", ne.fmt2)):
            raw = getattr(ne, name)
            dense = ggml.dequantize(raw.reshape(-1, raw.shape[-1]), f.name)
            getattr(ref, name).copy_(torch.from_numpy(dense).view(getattr(ref, name).shape))
    return ref
