"""Grouped-query attention (Ainslie et al. 2023, "GQA") as Qwen2/3-MoE, Mixtral and GLM-4.5 use it:
Hkv key/value heads, each shared by a group of H / Hkv query heads, RoPE on the first R dims of
every query and key head (R = head_dim, or partial_rotary_factor of it: GLM), optionally per-head
RMSNorm of q and k before RoPE (Qwen3; GLM with use_qk_norm) and biases on q, k, v (Qwen2; GLM) and o
(Qwen3's attention_bias).

Legend: T new tokens, S positions attended (cache length after this step), H query heads,
Hkv key/value heads, G = H / Hkv query heads per K/V head, Dh head_dim, R rotary dims, D hidden size.

Per token the cache keeps K (after q/k norm and RoPE) and V of every K/V head: (2, Hkv, Dh). The
module runs a packed batch as MLA does (model.batch): projections over all T tokens at once, then
per segment: write its K, V into its cache slot, attend over [0, start+length).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelArgs
from .batch import Packed
from .layers import RMSNorm, linear
from .mla import Rope, causal_mask, softmax


class GQA(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, H, Hkv, Dh = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.H, self.Hkv, self.Dh, self.R = H, Hkv, Dh, args.qk_rope_head_dim
        self.wq = nn.Parameter(torch.empty(H * Dh, D))
        self.wk = nn.Parameter(torch.empty(Hkv * Dh, D))
        self.wv = nn.Parameter(torch.empty(Hkv * Dh, D))
        self.wo = nn.Parameter(torch.empty(D, H * Dh))
        self.bq = nn.Parameter(torch.zeros(H * Dh)) if args.qkv_bias else None
        self.bk = nn.Parameter(torch.zeros(Hkv * Dh)) if args.qkv_bias else None
        self.bv = nn.Parameter(torch.zeros(Hkv * Dh)) if args.qkv_bias else None
        self.bo = nn.Parameter(torch.zeros(D)) if args.o_bias else None
        self.q_norm = RMSNorm(Dh, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(Dh, args.rms_norm_eps) if args.qk_norm else None
        self.softmax_scale = args.softmax_scale

    def forward(self, x: torch.Tensor, packed: Packed, rope: Rope, cache: torch.Tensor) -> torch.Tensor:
        """x (T, D), the tokens of packed.segments one after another; cache (2, B, S_max, Hkv, Dh) for
        this layer (K, V). Each segment writes its K, V into its slot and attends over its own
        positions. Returns (T, D)."""
        T, pos = x.shape[0], packed.positions                            # (T,)
        q = self.heads(x, self.wq, self.bq, self.H, self.q_norm, rope, pos)      # (T, H, Dh)
        k = self.heads(x, self.wk, self.bk, self.Hkv, self.k_norm, rope, pos)    # (T, Hkv, Dh)
        v = project(x, self.wv, self.bv).view(T, self.Hkv, self.Dh)              # (T, Hkv, Dh)
        o = x.new_empty(T, self.H, self.Dh)
        for off, s in zip(packed.offsets, packed.segments):
            sl, end = slice(off, off + s.length), s.start + s.length
            cache[0, s.slot, s.start:end] = k[sl].to(cache.dtype)
            cache[1, s.slot, s.start:end] = v[sl].to(cache.dtype)
            keys, values = cache[0, s.slot, :end], cache[1, s.slot, :end]        # (S, Hkv, Dh) each
            mask = causal_mask(s.length, s.start, x.device) if s.length > 1 else None  # one token sees all S
            o[sl] = self.attend(q[sl], keys.to(x.dtype), values.to(x.dtype), mask)
        return project(o.reshape(T, -1), self.wo, self.bo)

    def heads(self, x, w, b, n_heads: int, norm: RMSNorm | None, rope: Rope, pos: torch.Tensor) -> torch.Tensor:
        """Project x (T, D) to n_heads heads (T, n, Dh), RMSNorm each head (q/k norm), rotate the first R dims."""
        h = project(x, w, b).view(x.shape[0], n_heads, self.Dh)
        if norm is not None:
            h = norm(h)
        return torch.cat((rope.apply(h[..., :self.R], pos), h[..., self.R:]), dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (T, H, Dh) against k, v (S, Hkv, Dh): query head h reads K/V head h // G. Returns (T, H, Dh)."""
        T = q.shape[0]
        qg = q.view(T, self.Hkv, self.H // self.Hkv, self.Dh)                    # (T, Hkv, G, Dh)
        scores = torch.einsum("tkgd,skd->kgts", qg, k)                            # (Hkv, G, T, S)
        p = softmax(scores, mask, self.softmax_scale)
        return torch.einsum("kgts,skd->tkgd", p, v).reshape(T, self.H, self.Dh)


def project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x w^T (+ b): a linear layer whose weight may be in any of linear()'s formats."""
    y = linear(x, w)
    return y if b is None else y + b.to(y.dtype)
