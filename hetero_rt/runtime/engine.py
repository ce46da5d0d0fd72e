"""Runtime: a loaded model with its KV cache (latent for MLA, K/V for GQA), tokenizer and batcher,
and the public calls on it.

Contract: `logits(ids)` is one full forward of the ids from position 0 (independent of earlier
calls); `generate(...)` is the single-request case of the batcher (runtime.batcher), on the
caller's thread: prefill (reusing a cached prefix), then decode. `request(...)` builds the same
request for callers that submit it themselves (the server). Input is validated here, before any
compute, so bad requests fail fast with a message saying what to change.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

from ..checkpoint.tokenizer import Tokenizer
from ..config import PREFILL_CHUNK, ModelArgs
from ..errors import InputError
from ..experts import NumbaExperts
from ..kernels.stored import GEMV_MAX_TOKENS
from ..kernels.threads import torch_threads
from ..kv_cache import make_cache
from ..model.mla import Rope
from ..model.batch import Segment
from ..model.transformer import Transformer
from . import arguments
from .batcher import Batcher
from .request import GenerationResult, Request
from .sampling import Sampler, SamplingParams

Prompt = Union[str, Sequence[int], Sequence[dict[str, Any]]]   # text, token ids, or chat messages


class Runtime:
    def __init__(self, model: Transformer, args: ModelArgs, tokenizer: Tokenizer | None, context: int,
                 dtype: torch.dtype, device: torch.device | str, source: Path, plan=None, parallel: int = 1):
        self.model, self.args, self.tokenizer, self.plan = model, args, tokenizer, plan
        self.context, self.dtype, self.device, self.source = context, dtype, torch.device(device), source
        self.parallel = arguments.count(parallel, "parallel (sequences decoded at once)", minimum=1)
        self.cache = make_cache(args, context, dtype, self.device, slots=self.parallel)
        self.rope = Rope(args, context, self.device)
        self.batcher = Batcher(self.forward, self.parallel, PREFILL_CHUNK)

    @property
    def prefill_chunk(self) -> int:
        """Most tokens in one forward (bounds attention's working memory and the experts' buffers)."""
        return self.batcher.token_budget

    @prefill_chunk.setter
    def prefill_chunk(self, n: int) -> None:
        self.batcher.token_budget = n

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
    def step(self, tokens: torch.Tensor, start: int, absorbed: bool | None = None, last_only: bool = False,
             slot: int = 0) -> torch.Tensor:
        """Forward one sequence's tokens at positions start.. in cache slot `slot`, in chunks of at most
        prefill_chunk tokens (bounding attention's working memory); (T, vocab) fp32 logits on the CPU, or
        (1, vocab) for the last token with last_only. The slot's cached prefix is forgotten (the batcher
        no longer knows what it holds)."""
        n, out = tokens.shape[0], []
        self.cache.reserve(start, n)
        with self.batcher.lock:
            self.batcher.forget(slot)
            for off in range(0, n, self.prefill_chunk):
                chunk = tokens[off:off + self.prefill_chunk]
                logits = self.forward(chunk, [Segment(slot, start + off, chunk.shape[0])], absorbed, last_only)
                if not last_only or off + self.prefill_chunk >= n:
                    out.append(logits)
        return out[0] if len(out) == 1 else torch.cat(out)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, segments: list[Segment], absorbed: bool | None = None,
                last_only: bool = True) -> torch.Tensor:
        """One forward of a packed batch (model.batch.Segment) against the cache: fp32 logits on
        the CPU of each segment's last token (len(segments), vocab), or of every token without last_only.
        Torch runs on one thread for a few tokens (its ops are tiny there; kernels.threads.torch_threads)."""
        for s in segments:
            self.cache.reserve(s.start, s.length)
        with torch_threads(1 if tokens.shape[0] <= GEMV_MAX_TOKENS else torch.get_num_threads()):
            logits = self.model(tokens.to(self.device), segments, self.rope, self.cache.data, absorbed,
                                last_only=last_only)
        return logits.cpu()

    def generate(self, prompt: Prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, chat: bool = False,
                 stream: Callable[[str], None] | None = None, stop: Sequence[str] = ()) -> GenerationResult:
        """Generate up to max_new_tokens after the prompt: text (wrapped in the chat template with
        chat=True), token ids, or a list of chat messages ({"role", "content"}; always templated).
        `stream` receives text pieces as they become final; generation ends at a stop string (the text
        ends before it). Returns ids, text, stop reason and timings; a prompt sharing a prefix with an
        earlier one reuses its cached latents. Ctrl-C raises GenerationInterrupted (a
        KeyboardInterrupt) carrying the result so far."""
        req = self.request(prompt, max_new_tokens, temperature, top_k, top_p, seed, chat, stop, on_text=stream)
        with torch.inference_mode():
            self.batcher.run(req)
        if req.error is not None:
            raise req.error
        return req.result

    def request(self, prompt: Prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, seed: int | None = None, chat: bool = False, stop: Sequence[str] = (),
                on_text: Callable[[str], None] | None = None,
                on_done: Callable[[GenerationResult], None] | None = None) -> Request:
        """A checked Request for the batcher (see generate for the arguments); nothing runs yet."""
        max_new_tokens = arguments.count(max_new_tokens, "max_new_tokens", minimum=1)
        chat = arguments.flag(chat, "chat")
        stop = arguments.strings(stop, "stop")
        sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
        ids = self.check_ids(self.encode(prompt, chat), new_tokens=max_new_tokens)
        decoder = self.tokenizer.stream_decoder() if self.tokenizer is not None else None
        if stop and decoder is None:
            raise InputError(f"{self.source} has no tokenizer, so stop strings cannot be matched")
        return Request(ids, max_new_tokens, sampler, self.eos_ids(), decoder, stop, on_text, on_done)

    # ---- helpers ----
    def eos_ids(self) -> tuple[int, ...]:
        ids = set(self.args.eos_token_ids)
        if self.tokenizer is not None:
            ids.update(self.tokenizer.eos_ids)
        return tuple(sorted(ids))

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Token ids of a text prompt (chat-templated with chat), of chat messages, or ids as given."""
        messages = arguments.messages(prompt) if arguments.is_messages(prompt) else None
        if not isinstance(prompt, str) and messages is None:
            if chat:
                raise InputError("chat=True needs a text prompt or messages, not token ids")
            return arguments.token_ids(prompt, "prompt (token ids)")
        if self.tokenizer is None:
            raise InputError(f"{self.source} has no tokenizer (no tokenizer.json or tiktoken.model in a checkpoint "
                             f"directory, no tokenizer.ggml.* metadata in a GGUF), so text prompts cannot be "
                             f"encoded; pass token ids instead")
        if messages is not None or chat:
            text = self.tokenizer.apply_chat_template(messages or [{"role": "user", "content": prompt}])
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
