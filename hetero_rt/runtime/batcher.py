"""The batcher: runs requests on the model, several at once. Each active request holds one slot of
the latent cache; every step is one forward of a packed batch (model.batch.Segment): one
token for every decoding request plus prompt chunks of requests being prefilled, within the
prefill chunk's token budget. So the routed experts' weights read for a decode step serve every
sequence in the batch, and a long prompt arriving never stalls the others for more than a chunk.

Prefix cache: a slot keeps the ids whose latents it holds after its request finishes. A new
request takes the free slot whose cached ids its prompt mostly continues (_choose_slot) and
prefills only the rest, so turn N of a chat re-reads nothing of turns 1..N-1. At least the
prompt's last token is always forwarded: its logits give the first token.

Threads: step() may be called from any one thread at a time (the lock makes it so). The server
runs it in a loop thread (start()); Runtime.generate() drives it on the caller's thread (run()),
so Ctrl-C interrupts the forward there.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model.batch import Segment
from .request import GenerationInterrupted, Request

Forward = Callable[[torch.Tensor, list[Segment]], torch.Tensor]   # tokens (T,), segments -> (len, Vocab)


@dataclass
class Slot:
    ids: list[int] = field(default_factory=list)    # tokens whose latents this slot's cache holds
    request: Request | None = None
    last_used: int = 0                               # step count at its last use (LRU among free slots)


@dataclass
class Active:
    request: Request
    slot: int
    pos: int                  # next position to write
    pending: list[int]        # prompt tokens still to prefill; then [the last sampled token]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Batcher:
    def __init__(self, forward: Forward, slots: int, token_budget: int):
        self.forward, self.token_budget = forward, token_budget
        self.slots = [Slot() for _ in range(slots)]
        self.waiting: deque[Request] = deque()
        self.active: list[Active] = []
        self.lock = threading.RLock()           # one forward at a time
        self.wake = threading.Condition()       # the loop thread sleeps on it when idle
        self.steps = 0
        self.counters = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                         "prefill_s": 0.0, "decode_s": 0.0}
        self._thread: threading.Thread | None = None
        self._stop = False

    # ---- submitting ----
    def submit(self, request: Request) -> None:
        with self.wake:
            self.waiting.append(request)
            self.counters["requests"] += 1
            self.wake.notify()

    def run(self, request: Request) -> None:
        """Submit and drive steps on this thread until the request is done (the single-request path:
        Runtime.generate). Ctrl-C finishes it as "interrupted" and raises GenerationInterrupted."""
        self.submit(request)
        if self._thread is not None:
            try:
                while not request.done.wait(0.1):
                    pass
            except KeyboardInterrupt:
                request.cancel()
                raise GenerationInterrupted(request.result if request.result.new_ids else None) from None
            return
        try:
            while not request.finished:
                self.step()
        except KeyboardInterrupt:
            with self.lock:
                started = bool(request.result.new_ids)
                self._drop(request, "interrupted")
            raise GenerationInterrupted(request.result if started else None) from None

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def busy_slots(self) -> int:
        return len(self.active)

    # ---- the loop thread (server) ----
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="hetero-rt-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Finish the loop thread; requests still waiting or active are cancelled."""
        if self._thread is None:
            return
        with self.wake:
            self._stop = True
            self.wake.notify()
        self._thread.join(timeout_s)
        self._thread = None
        with self.lock:
            for req in list(self.waiting) + [a.request for a in self.active]:
                self._drop(req, "cancelled")

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self._stop and not self.waiting and not self.active:
                    self.wake.wait()
                if self._stop:
                    return
            self.step()

    # ---- one step ----
    def step(self) -> None:
        """Drop cancelled requests, admit waiting ones into free slots, run one forward, hand each
        request whose prompt is complete its next token."""
        with self.lock:
            self._drop_cancelled()
            self._admit()
            if not self.active:
                return
            batch = self._schedule()
            tokens = torch.tensor([t for a, n in batch for t in a.pending[:n]], dtype=torch.long)
            segments = [Segment(a.slot, a.pos, n) for a, n in batch]
            try:
                logits = self.forward(tokens, segments)                      # (len(batch), Vocab)
            except Exception as e:     # a failed forward fails its requests, never the server
                for a, _ in batch:
                    self._drop(a.request, "error", e)
                return
            self.steps += 1
            for (a, n), row in zip(batch, logits):
                self._advance(a, n, row)

    def _schedule(self) -> list[tuple[Active, int]]:
        """(request, tokens to forward): every decoding request one token, then prompt chunks in
        admission order while the token budget lasts (at least one chunk per step)."""
        decoding = [(a, 1) for a in self.active if a.request.result.new_ids]
        budget = max(self.token_budget - len(decoding), 1)
        batch = list(decoding)
        for a in self.active:
            if a.request.result.new_ids or budget <= 0:
                continue
            n = min(len(a.pending), budget)
            batch.append((a, n))
            budget -= n
        return batch

    def _advance(self, a: Active, n: int, logits: torch.Tensor) -> None:
        slot = self.slots[a.slot]
        slot.ids.extend(a.pending[:n])
        slot.last_used = self.steps
        a.pos += n
        del a.pending[:n]
        if a.pending:          # prompt not yet complete: no token from this chunk
            return
        req = a.request
        token = req.sampler(logits)
        reason = req.accept(token)
        if reason is None:
            a.pending = [token]
        else:
            self._end(req, reason)

    def _admit(self) -> None:
        while self.waiting:
            free = [i for i, s in enumerate(self.slots) if s.request is None]
            if not free:
                return
            req = self.waiting.popleft()
            if req.cancel_requested:
                self._end(req, "cancelled")
                continue
            prompt = req.result.prompt_ids
            best = self._choose_slot(free, prompt)
            slot = self.slots[best]
            reuse = min(common_prefix(slot.ids, prompt), len(prompt) - 1)
            del slot.ids[reuse:]
            slot.request = req
            req.admitted(reuse)
            self.active.append(Active(req, best, reuse, list(prompt[reuse:])))

    def _choose_slot(self, free: list[int], prompt: list[int]) -> int:
        """The free slot whose cached ids the prompt mostly continues (a shared prefix of at least half
        of them: an empty slot qualifies), longest shared prefix first, then least recently used; when
        none qualifies, the least recently used slot. So a new conversation that shares only a BOS or
        a system prompt with a cached one does not overwrite it while another slot is free."""
        lcp = {i: common_prefix(self.slots[i].ids, prompt) for i in free}
        fits = [i for i in free if 2 * lcp[i] >= len(self.slots[i].ids)]
        if fits:
            return max(fits, key=lambda i: (lcp[i], -self.slots[i].last_used))
        return min(free, key=lambda i: self.slots[i].last_used)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancel_requested]:
            self._drop(req, "cancelled")
        for a in [a for a in self.active if a.request.cancel_requested]:
            self._drop(a.request, "cancelled")

    def _drop(self, req: Request, reason: str, error: BaseException | None = None) -> None:
        if req in self.waiting:
            self.waiting.remove(req)
        self._end(req, reason, error)

    def _end(self, req: Request, reason: str, error: BaseException | None = None) -> None:
        """Settle the request, free its slot, count it, then tell its owner (on_done, done): whoever
        wakes on it sees the slot free and the counters up to date."""
        if req.finished:
            return
        req.settle(reason, error)
        for a in [a for a in self.active if a.request is req]:
            self.active.remove(a)
            self.slots[a.slot].request = None
        res, c = req.result, self.counters
        if req.was_admitted:
            c["prompt_tokens"] += len(res.prompt_ids)
            c["cached_tokens"] += res.cached_tokens
            c["generated_tokens"] += len(res.new_ids)
            c["prefill_s"] += res.prefill_s
            c["decode_s"] += res.decode_s
        req.notify()

    def forget(self, slot: int) -> None:
        """The slot's cache was overwritten outside the batcher (Runtime.logits): it holds no prefix."""
        self.slots[slot].ids.clear()
