"""Multi-head Latent Attention (DeepSeek-V2 paper, section 2.1) with decoupled RoPE and YaRN.

Legend: T new tokens, S positions attended (cache length after this step), H heads,
N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, C kv_lora_rank, D hidden size.

Per token the cache keeps only [c_kv (C) | k_pe (R)]: c_kv after kv_norm, k_pe after RoPE.
Two mathematically equal paths read it:
  naive    : expand K = [W_UK c_kv | k_pe] and V = W_UV c_kv for every cached position (prefill).
  absorbed : fold W_UK into the query (q_nope W_UK -> C wide) and apply W_UV after attention,
             scoring directly against c_kv (decode; no per-position expansion).
The module runs a packed batch (several sequences' tokens, each run a Segment): projections over all
tokens at once, then per segment: write its latents into its cache slot, attend over [0, start+length).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelArgs, yarn_mscale
from ..quant.fp8 import materialize
from .batch import Packed
from .layers import RMSNorm, linear

# The latent norms (q_a / kv_a) use a fixed eps: DeepSeek's modeling code and transformers build them
# with RMSNorm's default 1e-6 whatever rms_norm_eps says (it sets only the block and final norms).
# llama.cpp applies rms_norm_eps to them too; the two agree for every released checkpoint (1e-6).
LATENT_NORM_EPS = 1e-6


class Rope:
    """cos/sin tables for the R rotary dims, YaRN-corrected when the config asks for it."""

    def __init__(self, args: ModelArgs, max_len: int, device: torch.device | str = "cpu"):
        inv_freq, attn_factor = rope_inv_freq(args)
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (max_len, R/2)
        self.cos = (freqs.cos() * attn_factor).to(device)
        self.sin = (freqs.sin() * attn_factor).to(device)
        self.interleave = args.rope_interleave

    def apply(self, x: torch.Tensor, positions: int | torch.Tensor) -> torch.Tensor:
        """Rotate x (T, ..., R) for absolute positions: start..start+T-1 (an int), or one per token
        (a (T,) tensor); computed in fp32."""
        T = x.shape[0]
        shape = (T,) + (1,) * (x.dim() - 2) + (-1,)
        if isinstance(positions, int):
            cos, sin = self.cos[positions:positions + T], self.sin[positions:positions + T]
        else:
            cos, sin = self.cos[positions], self.sin[positions]
        cos, sin = cos.view(shape), sin.view(shape)
        xf = x.float()
        if self.interleave:  # pairs (x0, x1), (x2, x3), ... as in the DeepSeek reference
            a, b = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
        else:  # rotate-half layout
            a, b = xf.chunk(2, dim=-1)
            out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
        return out.to(x.dtype)


def rope_inv_freq(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (R/2,) and the cos/sin magnitude factor, as DeepSeek's YaRN defines them."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    y = args.rope_scaling
    if y is None:
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(y.beta_fast)), 0)
    high = min(math.ceil(correction_dim(y.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1 - ramp  # 1 -> keep the original frequency (extrapolate), 0 -> interpolate by factor
    inv_freq = inv_freq / y.factor * (1 - keep) + inv_freq * keep
    factor = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim) if y.mscale_all_dim \
        else yarn_mscale(y.factor)
    return inv_freq, factor


class MLA(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, H = args.hidden_size, args.num_attention_heads
        self.H, self.N, self.R, self.V, self.C = (H, args.qk_nope_head_dim, args.qk_rope_head_dim,
                                                  args.v_head_dim, args.kv_lora_rank)
        self.q_lora_rank = args.q_lora_rank
        if args.q_lora_rank is None:
            self.wq = nn.Parameter(torch.empty(H * (self.N + self.R), D))
        else:
            self.wq_a = nn.Parameter(torch.empty(args.q_lora_rank, D))
            self.q_norm = RMSNorm(args.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Parameter(torch.empty(H * (self.N + self.R), args.q_lora_rank))
        self.wkv_a = nn.Parameter(torch.empty(self.C + self.R, D))
        self.kv_norm = RMSNorm(self.C, LATENT_NORM_EPS)
        self.wkv_b = nn.Parameter(torch.empty(H * (self.N + self.V), self.C))
        self.wo = nn.Parameter(torch.empty(D, H * self.V))
        self.softmax_scale = args.softmax_scale

    def forward(self, x: torch.Tensor, packed: Packed, rope: Rope, cache: torch.Tensor) -> torch.Tensor:
        """x (T, D), the tokens of packed.segments one after another; cache (B, S_max, C+R) for this
        layer. The projections run once over all T tokens; each segment writes its latents into its
        slot and attends over its own positions, on the path packed.absorb names. Returns (T, D)."""
        T, pos, rows = x.shape[0], packed.positions, packed.absorbed_rows   # (T,), (Ta,) or None
        q_nope, q_pe = self.query(x, pos, rope)                          # (T, H, N), (T, H, R)
        kv = linear(x, self.wkv_a)                                       # (T, C+R)
        latent = torch.cat((self.kv_norm(kv[:, :self.C]), rope.apply(kv[:, None, self.C:], pos)[:, 0]), -1)
        q_lat = self.absorb_query(q_nope[rows]) if rows is not None else None   # (Ta, H, C)
        o = None if packed.all_absorbed else x.new_empty(T, self.H, self.V)
        o_lat, ai = [], 0
        for off, s, a in zip(packed.offsets, packed.segments, packed.absorb):
            sl, end = slice(off, off + s.length), s.start + s.length
            cache[s.slot, s.start:end] = latent[sl].to(cache.dtype)
            c_kv, k_pe = cache[s.slot, :end, :self.C], cache[s.slot, :end, self.C:]   # (S, C), (S, R)
            mask = causal_mask(s.length, s.start, x.device) if s.length > 1 else None  # one token sees all S
            if a:
                o_lat.append(self.attend_latent(q_lat[ai:ai + s.length], q_pe[sl], c_kv, k_pe, mask))
                ai += s.length
            else:
                o[sl] = self.attend_naive(q_nope[sl], q_pe[sl], c_kv, k_pe, mask)
        if rows is not None:
            expanded = self.expand_output(torch.cat(o_lat))              # (Ta, H, V)
            o = expanded if o is None else o.index_copy_(0, rows, expanded.to(o.dtype))
        return linear(o.reshape(T, -1), self.wo)

    def query(self, x: torch.Tensor, pos: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_lora_rank is None:
            q = linear(x, self.wq)
        else:
            q = linear(self.q_norm(linear(x, self.wq_a)), self.wq_b)
        q = q.view(x.shape[0], self.H, self.N + self.R)
        return q[..., :self.N], rope.apply(q[..., self.N:], pos)

    def attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        kv = linear(c_kv, self.wkv_b).view(-1, self.H, self.N + self.V)  # (S, H, N+V)
        k_nope, v = kv[..., :self.N], kv[..., self.N:]
        scores = (torch.einsum("thn,shn->hts", q_nope, k_nope)
                  + torch.einsum("thr,sr->hts", q_pe, k_pe))             # (H, T, S)
        p = softmax(scores, mask, self.softmax_scale)
        return torch.einsum("hts,shv->thv", p, v)

    def attend_latent(self, q_lat, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """q_lat (T, H, C) against the cached latents -> o_lat (T, H, C)."""
        scores = (torch.einsum("thc,sc->hts", q_lat, c_kv)
                  + torch.einsum("thr,sr->hts", q_pe, k_pe))             # (H, T, S)
        p = softmax(scores, mask, self.softmax_scale)
        return torch.einsum("hts,sc->thc", p, c_kv)                      # (T, H, C)

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope (T, H, N) -> q_nope W_UK (T, H, C)."""
        per_head = self._per_head()
        if per_head is not None:
            return per_head.absorb(q_nope).to(q_nope.dtype)
        return torch.einsum("thn,hnc->thc", q_nope, self._w_ukv(q_nope.dtype)[:, :self.N])

    def expand_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """o_lat (T, H, C) -> o_lat W_UV^T (T, H, V)."""
        per_head = self._per_head()
        if per_head is not None:
            return per_head.expand(o_lat).to(o_lat.dtype)
        return torch.einsum("thc,hvc->thv", o_lat, self._w_ukv(o_lat.dtype)[:, self.N:])

    def _per_head(self):
        """A GGUF's k_b / v_b read in place (kernels.stored.StoredKvB), else None."""
        per_head = getattr(self.wkv_b, "stored", None)
        return per_head if hasattr(per_head, "absorb") else None

    def _w_ukv(self, dtype: torch.dtype) -> torch.Tensor:
        return materialize(self.wkv_b, dtype).view(self.H, self.N + self.V, self.C)   # (H, N+V, C)


def causal_mask(T: int, start: int, device) -> torch.Tensor:
    """(T, start+T) bool: query t (absolute start+t) sees keys s <= start+t."""
    q = torch.arange(start, start + T, device=device)[:, None]
    k = torch.arange(start + T, device=device)[None, :]
    return k <= q


def softmax(scores: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax over the last axis of scores * scale where mask (T, S) is true (None: everywhere)."""
    s = scores.float() * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return F.softmax(s, dim=-1).to(scores.dtype)
