"""Block and Transformer: embedding, n_layers x (attention + dense FFN or MoE), final norm, lm_head.
Attention is MLA (DeepSeek, Kimi) or grouped-query attention (Qwen, Mixtral, GLM), as args.attention says.

Legend: T tokens, D hidden size, L layers, B cache slots (sequences), Vocab vocabulary size.
The model knows nothing of devices, files or threads: weights are assigned by the loader, the
routed experts are handed in by `make_experts(layer, gate)` (hetero_rt.experts.build), the KV
cache is passed to forward.

A forward runs a packed batch: the tokens of several sequences one after another, each run of them
a Segment naming its cache slot and first position. Only the attention core is per segment (each
sequence sees only its own cache); every projection, norm, the gate, experts, shared experts and
lm_head run on all T tokens at once, so the weights read for one decode step serve every sequence.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..config import ModelArgs
from ..experts import TorchExperts
from .batch import Packed, Segment
from .gqa import GQA
from .layers import MLP, RMSNorm, embedding, linear
from .mla import MLA, Rope
from .moe import MoE

ATTENTION = {"mla": MLA, "gqa": GQA}

ExpertsFactory = Callable[[int, nn.Module], nn.Module]   # (layer, its gate) -> routed experts


def torch_experts(args: ModelArgs) -> ExpertsFactory:
    """Empty torch experts to be filled (a model built without a checkpoint)."""
    return lambda layer, gate: TorchExperts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, make_experts: ExpertsFactory):
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attn = ATTENTION[args.attention](args)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.ffn = MoE(args, layer, make_experts) if args.is_moe_layer(layer) \
            else MLP(args.hidden_size, args.intermediate_size)

    def forward(self, h: torch.Tensor, packed: Packed, rope: Rope, cache: torch.Tensor):
        """h (T, D); cache: this layer's part of the KV cache, (B, S_max, C+R) for MLA, (2, B, S_max, Hkv, Dh)
        for GQA (hetero_rt.kv_cache)."""
        h = h + self.attn(self.attn_norm(h), packed, rope, cache)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, make_experts: ExpertsFactory | None = None):
        super().__init__()
        self.args = args
        make_experts = make_experts or torch_experts(args)
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i, make_experts) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.head = None if args.tie_word_embeddings else nn.Parameter(torch.empty(args.vocab_size, args.hidden_size))

    def forward(self, tokens: torch.Tensor, segments: Sequence[Segment], rope: Rope, cache: torch.Tensor,
                absorbed: bool | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens (T,), the segments' tokens one after another (lengths summing to T); cache (L, ...),
        a LatentCache's or KVCache's data, is read and written in place. absorbed=None picks naive MLA
        for prefill segments, absorbed for one-token (decode) segments (GQA has one path). Returns fp32
        logits (T, Vocab), or (len(segments), Vocab) for each segment's last token with last_only."""
        packed = Packed(segments, absorbed, tokens.device)
        if packed.tokens != tokens.shape[0]:
            raise ValueError(f"segments cover {packed.tokens} tokens, got {tokens.shape[0]}")
        h = embedding(tokens, self.embed.weight)                         # (T, D)
        for i, block in enumerate(self.layers):
            h = block(h, packed, rope, cache[i])
        if last_only:
            h = h[packed.last_rows]                                      # (len(segments), D)
        h = self.norm(h)
        head = self.embed.weight if self.head is None else self.head
        return linear(h, head).float()                                   # (T, Vocab)
