"""The KV caches, preallocated once for the requested context, in one slot per sequence decoded at
the same time (runtime.batcher; one slot for a single request):

  LatentCache (MLA): per layer and position exactly kv_lora_rank + qk_rope_head_dim values (c_kv
                     after kv_norm, k_pe after RoPE);
  KVCache (GQA):     per layer and position K (after q/k norm and RoPE) and V of every K/V head.

`make_cache(args, ...)` builds the one the model's attention reads. Both have `.data` (L, ...) whose
[layer] is what that layer's attention takes, `reserve` and `bytes_per_token`.

Legend: L layers, B slots, S_max context length, C kv_lora_rank, R qk_rope_head_dim, Hkv K/V heads,
Dh head_dim.
"""
from __future__ import annotations

import torch

from .config import ModelArgs
from .errors import ContextOverflowError


class SlotCache:
    """What both caches share: max_len positions in each of `slots` slots, and the check that a
    request fits them."""

    def __init__(self, max_len: int, slots: int):
        if max_len <= 0:
            raise ContextOverflowError(f"context length must be positive, got {max_len}")
        if slots <= 0:
            raise ContextOverflowError(f"the KV cache needs at least one slot, got {slots}")
        self.max_len, self.slots = max_len, slots

    def reserve(self, start: int, n_tokens: int) -> None:
        """Raise unless positions [start, start + n_tokens) fit the preallocated context."""
        if start + n_tokens > self.max_len:
            raise ContextOverflowError(
                f"request needs {start + n_tokens} positions but the KV cache holds {self.max_len}; "
                f"pass a larger context (load(..., context=N) or --context N) or shorten the prompt "
                f"/ max_new_tokens")


class LatentCache(SlotCache):
    def __init__(self, args: ModelArgs, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 slots: int = 1):
        super().__init__(max_len, slots)
        self.data = torch.zeros(args.num_hidden_layers, slots, max_len, args.latent_cache_width,
                                dtype=dtype, device=device)             # (L, B, S_max, C+R)

    @property
    def bytes_per_token(self) -> int:
        """Per position of one slot."""
        return self.data.shape[0] * self.data.shape[3] * self.data.element_size()


class KVCache(SlotCache):
    """The standard K/V cache of grouped-query attention."""

    def __init__(self, args: ModelArgs, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 slots: int = 1):
        super().__init__(max_len, slots)
        self.data = torch.zeros(args.num_hidden_layers, 2, slots, max_len, args.num_key_value_heads, args.head_dim,
                                dtype=dtype, device=device)             # (L, 2, B, S_max, Hkv, Dh)

    @property
    def bytes_per_token(self) -> int:
        """Per position of one slot."""
        L, kv, _, _, hkv, dh = self.data.shape
        return L * kv * hkv * dh * self.data.element_size()


def make_cache(args: ModelArgs, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu",
               slots: int = 1) -> SlotCache:
    """The cache args.attention reads: LatentCache for MLA, KVCache for GQA."""
    cls = KVCache if args.attention == "gqa" else LatentCache
    return cls(args, max_len, dtype, device, slots)


def bytes_per_token(args: ModelArgs, dtype_bytes: int = 2) -> dict[str, int]:
    """KV-cache bytes per token: MLA's latent cache vs standard multi-head attention storing full K
    (qk_head_dim) and V (v_head_dim) for every head, over all layers."""
    mla = args.num_hidden_layers * args.latent_cache_width * dtype_bytes
    mha = args.num_hidden_layers * args.num_attention_heads * (args.qk_head_dim + args.v_head_dim) * dtype_bytes
    return {"mla": mla, "mha": mha}
