"""One generation request: prompt ids in; text pieces streamed out as they become final; a stop
reason, the ids and the timings at the end. The batcher (runtime.batcher) advances it one token at
a time; a request knows nothing of the model, the cache or HTTP, and the batcher nothing of text.

Stop reasons: "eos" (an end-of-sequence token), "length" (max_new_tokens), "stop" (a stop string:
the text ends before it), "cancelled" (cancel(): the client went away), "interrupted" (Ctrl-C),
"error" (the forward raised; `error` holds the exception).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..checkpoint.tokenizer import StreamDecoder
from .sampling import Sampler


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "length"   # see the module docstring
    cached_tokens: int = 0        # prompt tokens whose latents were reused from the prefix cache
    prefill_s: float = 0.0        # admission to the first generated token
    decode_s: float = 0.0         # first generated token to the last

    @property
    def prefilled_tokens(self) -> int:
        return len(self.prompt_ids) - self.cached_tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by decode steps (all but the first, which prefill yields) per second."""
        n = len(self.new_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s else 0.0


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during generation: a KeyboardInterrupt that carries what was generated so far
    (`result`, stop_reason "interrupted", timings up to the interruption; None during the prefill)."""

    def __init__(self, result: GenerationResult | None):
        super().__init__("generation interrupted")
        self.result = result


class StopText:
    """Finds stop strings in streamed text. push(piece) returns (text that is final, whether a stop
    string was reached); text that could still be the start of a stop string is held back until it
    is either completed (cut there) or ruled out, so no client ever sees part of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class Request:
    """What the batcher runs. on_text(piece) and on_done(result) are called on the batcher's thread
    (the caller's own for Runtime.generate, the engine thread in the server): keep them short and
    thread-safe. By the time on_done runs, the request's slot is free and the batcher's counters
    include it; `done` is set after on_done returns."""

    def __init__(self, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler, eos_ids: Sequence[int],
                 decoder: StreamDecoder | None = None, stop: Sequence[str] = (),
                 on_text: Callable[[str], None] | None = None,
                 on_done: Callable[[GenerationResult], None] | None = None):
        self.result = GenerationResult(prompt_ids=list(prompt_ids))
        self.max_new_tokens, self.sampler, self.eos_ids = max_new_tokens, sampler, frozenset(eos_ids)
        self.decoder, self.stop_text = decoder, StopText(stop)
        self.on_text, self.on_done = on_text, on_done
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.cancel_requested = False
        self._settled = False
        self.t_admitted = self.t_first = 0.0
        self._pieces: list[str] = []

    def cancel(self) -> None:
        """Stop this request before its next forward (safe from any thread); its slot is freed."""
        self.cancel_requested = True

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    # ---- called by the batcher ----
    @property
    def was_admitted(self) -> bool:
        return self.t_admitted > 0

    def admitted(self, cached_tokens: int) -> None:
        self.result.cached_tokens = cached_tokens
        self.t_admitted = time.perf_counter()

    def accept(self, token: int) -> str | None:
        """Take the next sampled token; the stop reason when the request is now complete (the batcher
        then frees its slot and calls finish), else None."""
        res = self.result
        if not res.new_ids:
            self.t_first = time.perf_counter()
            res.prefill_s = self.t_first - self.t_admitted
        res.new_ids.append(token)
        if self.decoder is not None and self._emit(self.decoder.push(token)):
            return "stop"
        if token in self.eos_ids:
            return "eos"
        if len(res.new_ids) >= self.max_new_tokens:
            return "length"
        return None

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        self.settle(reason, error)
        self.notify()

    def settle(self, reason: str, error: BaseException | None = None) -> None:
        """Final text, stop reason and timings (once; later calls change nothing)."""
        res = self.result
        if self._settled:
            return
        self._settled = True
        if self.decoder is not None and reason in ("eos", "length"):   # not after a stop string, Ctrl-C or cancel
            self._emit(self.decoder.flush())
            self._emit(self.stop_text.flush(), final=True)
        res.stop_reason, self.error = reason, error
        if res.new_ids:
            res.decode_s = time.perf_counter() - self.t_first
        res.text = "".join(self._pieces)

    def notify(self) -> None:
        """on_done, then `done` (once)."""
        if self.done.is_set():
            return
        try:
            if self.on_done is not None:
                self.on_done(self.result)
        finally:
            self.done.set()

    def _emit(self, piece: str, final: bool = False) -> bool:
        """Pass piece through the stop strings to on_text; True when a stop string was reached."""
        text, hit = (piece, False) if final else self.stop_text.push(piece)
        if text:
            if self.on_text is not None:    # first: a callback raising (Ctrl-C) keeps the text to what was shown
                self.on_text(text)
            self._pieces.append(text)
        return hit
