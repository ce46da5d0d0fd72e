"""The decode loop: prefill the prompt in one forward, then one token per forward against the
latent cache, sampling each next token, streaming text, stopping on eos or max_new_tokens.
Knows nothing of tokenization beyond the StreamDecoder it is handed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling import Sampler


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during generation: a KeyboardInterrupt that carries what was generated so far
    (`result`, stop_reason "interrupted", timings up to the interruption; None during the prefill)."""

    def __init__(self, result: "GenerationResult | None"):
        super().__init__("generation interrupted")
        self.result = result


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "length"   # "eos" | "length" | "interrupted"
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by decode steps (all but the first, which prefill yields) per second."""
        n = len(self.new_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s else 0.0


def generate_ids(step: Callable[[torch.Tensor, int], torch.Tensor], prompt: list[int], max_new_tokens: int,
                 sampler: Sampler, eos_ids: tuple[int, ...], on_token: Callable[[int], None] | None = None,
                 ) -> GenerationResult:
    """step(tokens (T,), start) -> logits (T, Vocab) runs the model and fills the cache."""
    res = GenerationResult(prompt_ids=list(prompt))
    t0 = time.perf_counter()
    try:
        logits = step(torch.tensor(prompt, dtype=torch.long), 0)[-1]
    except KeyboardInterrupt:
        raise GenerationInterrupted(None) from None
    res.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    try:
        _decode(step, logits, res, max_new_tokens, sampler, eos_ids, on_token)
    except KeyboardInterrupt:
        res.stop_reason = "interrupted"
        res.decode_s = time.perf_counter() - t1
        raise GenerationInterrupted(res) from None
    res.decode_s = time.perf_counter() - t1
    return res


def _decode(step, logits, res: GenerationResult, max_new_tokens: int, sampler: Sampler, eos_ids, on_token) -> None:
    pos = len(res.prompt_ids)
    while len(res.new_ids) < max_new_tokens:
        token = sampler(logits)
        res.new_ids.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos_ids:
            res.stop_reason = "eos"
            break
        if len(res.new_ids) == max_new_tokens:
            break
        logits = step(torch.tensor([token], dtype=torch.long), pos)[-1]
        pos += 1
