"""The MoE layer: a Gate choosing top-k routed experts per token, the routed experts (behind the
seam in hetero_rt.experts, whichever backend runs them), and always-on shared experts.

Legend: T tokens, D hidden size, E routed experts, K experts per token, G expert groups.

Gate variants (config scoring_func x topk_method):
  softmax | sigmoid scores;
  greedy              : top-k over all experts;
  group_limited_greedy: keep the topk_group groups with the highest max score, then top-k (V2);
  noaux_tc            : choose with scores + e_score_correction_bias, groups ranked by the sum of
                        their top-2 biased scores (V3, Kimi-K2); the weights use the unbiased scores.
Then optionally renormalise the k weights to sum to 1 (norm_topk_prob), and multiply by
routed_scaling_factor.

The families map onto these: Mixtral softmax | greedy, renormalised; Qwen2/3-MoE softmax | greedy,
renormalised when norm_topk_prob; GLM-4.5 sigmoid | noaux_tc as DeepSeek-V3. Shared experts: DeepSeek
and GLM add them; Qwen2-MoE adds one scaled per token by sigmoid(x w_g) (SigmoidGatedMLP).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelArgs
from .layers import MLP, linear


class Gate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.topk, self.n_group, self.topk_group = args.num_experts_per_tok, args.n_group, args.topk_group
        self.scoring_func, self.topk_method = args.scoring_func, args.topk_method
        self.norm_topk_prob, self.route_scale = args.norm_topk_prob, args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))  # (E, D)
        self.bias = nn.Parameter(torch.zeros(args.n_routed_experts)) if args.has_correction_bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, D) -> weights (T, K) fp32, ids (T, K) int64. Routing is computed in fp32."""
        logits = F.linear(x.float(), self.weight.float())                # (T, E)
        scores = logits.softmax(-1) if self.scoring_func == "softmax" else logits.sigmoid()
        choice = scores if self.bias is None else scores + self.bias.float()
        if self.topk_method != "greedy" and self.n_group > 1:
            choice = self.limit_groups(choice)
        ids = choice.topk(self.topk, dim=-1).indices                     # (T, K)
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, ids

    def limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask experts outside the topk_group best groups with -inf. choice (T, E)."""
        grouped = choice.view(choice.shape[0], self.n_group, -1)          # (T, G, E/G)
        if self.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)        # (T, G)
        else:
            group_scores = grouped.amax(-1)
        keep = group_scores.topk(self.topk_group, dim=-1).indices        # (T, topk_group)
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        return grouped.masked_fill(~mask[..., None], float("-inf")).flatten(1)


class SigmoidGatedMLP(MLP):
    """Qwen2-MoE's shared expert: sigmoid(x w_g) * MLP(x), one gate value per token."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__(dim, inter_dim)
        self.gate = nn.Parameter(torch.empty(1, dim))  # shared_expert_gate (1, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, D) -> (T, D)
        return torch.sigmoid(linear(x, self.gate)) * super().forward(x)


def shared_experts(args: ModelArgs) -> nn.Module | None:
    """The always-on experts fused into one SwiGLU of shared_inter_dim (None without them)."""
    if not args.n_shared_experts:
        return None
    cls = SigmoidGatedMLP if args.shared_expert_gate else MLP
    return cls(args.hidden_size, args.shared_inter_dim)


class MoE(nn.Module):
    """routed(x) + shared(x). The routed experts come from `make_experts(layer, gate)`, any backend
    behind the seam of hetero_rt.experts; they are handed the shared experts and return the sum
    (a backend may run the two at once on different devices)."""

    def __init__(self, args: ModelArgs, layer: int, make_experts: Callable[[int, nn.Module], nn.Module]):
        super().__init__()
        self.gate = Gate(args)
        self.experts = make_experts(layer, self.gate)
        self.shared_experts = shared_experts(args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, D) -> (T, D)
        weights, ids = self.gate(x)
        return self.experts(x, ids, weights, self.shared_experts)
