"""Next-token choice from logits: greedy, or temperature + top-k + top-p (nucleus) sampling with an
explicit, seeded torch.Generator, so that the same seed gives the same text. No global RNG is used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from . import arguments

_MASS_SLACK = 1e-5  # fp32 cumsum of a softmax is off by a few ulps of 1.0


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 -> greedy (argmax)
    top_k: int = 0             # 0 -> no top-k filter
    top_p: float = 1.0         # 1 -> no nucleus filter
    seed: int | None = None    # None -> a fresh random seed

    def __post_init__(self):
        """Checked (runtime.arguments) and normalised: floats, ints, the seed taken modulo 2**64."""
        set_ = object.__setattr__
        set_(self, "temperature", arguments.real(self.temperature, "temperature (0 = greedy)", 0.0))
        set_(self, "top_k", arguments.count(self.top_k, "top_k (0 = off)"))
        set_(self, "top_p", arguments.real(self.top_p, "top_p (1 = off)", 0.0, 1.0, low_open=True))
        set_(self, "seed", arguments.seed(self.seed))


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits (Vocab,) -> token id."""
        if logits.dim() != 1:  # argmax of a (T, Vocab) tensor would silently return a flat index
            raise InputError(f"Sampler takes logits of shape (vocab,), got {tuple(logits.shape)}")
        p = self.params
        if p.temperature == 0:
            return int(logits.argmax())
        logits = logits.double()
        # shifted so the max is 0: a tiny temperature cannot overflow to inf (and softmax to NaN); in
        # float64 because a temperature below float32's range (1e-193) would turn into 0, and 0 / 0 NaN
        probs = filtered_probs((logits - logits.max()) / p.temperature, p.top_k, p.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def filtered_probs(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Softmax of the scaled logits restricted to the top-k tokens, then to the smallest set of the
    most probable remaining tokens whose (renormalised) mass reaches top_p; at least one token."""
    probs = scaled.softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    if top_p < 1:  # on the distribution renormalised after top-k, as transformers does
        renorm = sorted_p * keep / (sorted_p * keep).sum()
        mass_before = renorm.cumsum(0) - renorm         # mass of strictly more probable tokens
        # A token is needed only while the mass before it is short of top_p; the slack keeps a set
        # that reaches top_p exactly (0.5 + 0.3 for 0.8) from gaining a token on fp32 rounding.
        keep &= mass_before < top_p - _MASS_SLACK
    keep[0] = True
    out = torch.zeros_like(probs)
    out[order[keep]] = sorted_p[keep]
    return out / out.sum()
