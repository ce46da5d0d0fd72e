"""Runtime: a loaded model with its latent cache and tokenizer, and the public calls on it.

Contract: `logits(ids)` is one full forward of the ids from position 0 (independent of earlier
calls); `generate(...)` prefills then decodes with the cache. Input is validated here, before
any compute, so bad requests fail fast with a message saying what to change.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..checkpoint.tokenizer import Tokenizer
from ..config import PREFILL_CHUNK, ModelArgs
from ..errors import InputError
from ..experts import NumbaExperts
from ..kv_cache import LatentCache
from ..model.mla import Rope
from ..model.transformer import Transformer
from . import arguments
from .generate import GenerationInterrupted, GenerationResult, generate_ids
from .sampling import Sampler, SamplingParams


class Runtime:
    def __init__(self, model: Transformer, args: ModelArgs, tokenizer: Tokenizer | None, context: int,
                 dtype: torch.dtype, device: torch.device | str, source: Path, plan=None):
        self.model, self.args, self.tokenizer, self.plan = model, args, tokenizer, plan
        self.context, self.dtype, self.device, self.source = context, dtype, torch.device(device), source
        self.cache = LatentCache(args, context, dtype, self.device)
        self.rope = Rope(args, context, self.device)
        self.prefill_chunk = PREFILL_CHUNK

    # ---- public API ----
    def set_threads(self, n: int) -> None:
        """Run the CPU kernels (routed experts, stored-format weights) and torch's CPU ops on n threads."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"threads must be a positive integer, got {n!r}")
        torch.set_num_threads(n)
        kernels = [m for m in self.model.modules() if isinstance(m, NumbaExperts)]
        kernels += [p.stored for p in self.model.parameters() if getattr(p, "stored", None) is not None]
        for k in kernels:
            k.threads = n

    @torch.inference_mode()
    def warmup(self) -> float:
        """Compile (or load from numba's cache) every kernel generation can reach, so that none is
        compiled inside a timed prompt: each CPU expert backend's decode and prefill kernels, then a
        16-token forward (the dense stored-format weights' one-pass and blocked paths, allocator and
        BLAS set-up). Returns seconds taken."""
        t0 = time.perf_counter()
        for m in self.model.modules():
            warm = getattr(m, "warmup", None)
            if callable(warm):
                warm()
        self.logits(list(range(min(16, self.args.vocab_size))))
        return time.perf_counter() - t0

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int], absorbed: bool | None = None) -> np.ndarray:
        """fp32 logits (T, vocab) of one forward over token_ids from position 0."""
        ids = self.check_ids(token_ids, new_tokens=0)
        return self.step(torch.tensor(ids, dtype=torch.long), 0, absorbed).numpy()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, start: int, absorbed: bool | None = None,
             last_only: bool = False) -> torch.Tensor:
        """Forward tokens at positions start.. against the cache, in chunks of at most prefill_chunk
        tokens (bounding attention's working memory); (T, vocab) fp32 logits on the CPU, or (1, vocab)
        for the last token only with last_only (what generation needs: no lm_head over the prompt)."""
        self.cache.reserve(start, tokens.shape[0])
        out = []
        n = tokens.shape[0]
        for off in range(0, n, self.prefill_chunk):
            chunk = tokens[off:off + self.prefill_chunk].to(self.device)
            skip = last_only and off + self.prefill_chunk < n
            logits = self.model(chunk, start + off, self.rope, self.cache.data, absorbed, last_only=last_only)
            if not skip:
                out.append(logits.cpu())
        return out[0] if len(out) == 1 else torch.cat(out)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, chat: bool = False,
                 stream: Callable[[str], None] | None = None) -> GenerationResult:
        """Generate up to max_new_tokens after the prompt (text, or token ids). `stream` receives text
        pieces as they become final. Returns ids, text, stop reason and timings. Ctrl-C raises
        GenerationInterrupted (a KeyboardInterrupt) carrying the result so far."""
        max_new_tokens = arguments.count(max_new_tokens, "max_new_tokens", minimum=1)
        chat = arguments.flag(chat, "chat")
        sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
        ids = self.check_ids(self.encode(prompt, chat), new_tokens=max_new_tokens)
        decoder = self.tokenizer.stream_decoder() if self.tokenizer is not None else None
        pieces: list[str] = []

        def on_token(token: int) -> None:
            if decoder is not None:
                piece = decoder.push(token)
                pieces.append(piece)
                if stream is not None and piece:
                    stream(piece)

        try:
            res = generate_ids(lambda t, pos: self.step(t, pos, last_only=True), ids, max_new_tokens, sampler,
                               self.eos_ids(), on_token)
        except GenerationInterrupted as stop:
            if stop.result is not None:
                stop.result.text = "".join(pieces)
            raise
        if decoder is not None:
            tail = decoder.flush()
            pieces.append(tail)
            if stream is not None and tail:
                stream(tail)
        res.text = "".join(pieces)
        return res

    # ---- helpers ----
    def eos_ids(self) -> tuple[int, ...]:
        ids = set(self.args.eos_token_ids)
        if self.tokenizer is not None:
            ids.update(self.tokenizer.eos_ids)
        return tuple(sorted(ids))

    def encode(self, prompt: str | Sequence[int], chat: bool) -> list[int]:
        if not isinstance(prompt, str):
            if chat:
                raise InputError("chat=True needs a text prompt, not token ids")
            return arguments.token_ids(prompt, "prompt (token ids)")
        if self.tokenizer is None:
            raise InputError(f"{self.source} has no tokenizer (no tokenizer.json in a checkpoint directory, no "
                             f"tokenizer.ggml.* metadata in a GGUF), so text prompts cannot be encoded; pass token "
                             f"ids instead")
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(text)
        return self.tokenizer.encode(prompt)

    def check_ids(self, token_ids: Sequence[int], new_tokens: int) -> list[int]:
        ids = arguments.token_ids(token_ids)
        if not ids:
            raise InputError("empty prompt: at least one token is needed")
        bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {self.args.vocab_size})")
        self.cache.reserve(0, len(ids) + new_tokens)
        return ids


def print_stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
