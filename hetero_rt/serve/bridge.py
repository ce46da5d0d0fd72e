"""From the batcher's thread to the event loop. A Generation is one runtime Request seen from asyncio:
the batcher calls on_text / on_done on its own thread; each call only posts the piece onto the loop
(loop.call_soon_threadsafe), so no executor thread waits per request and any number of clients
stream at once. Whenever the HTTP side stops listening (the client hangs up, a send fails, the
server stops) the request is cancelled: the batcher drops it before its next forward and frees its
slot, so a client that went away costs at most one more token.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Callable, Sequence

from fastapi import Request as HttpRequest
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..runtime.engine import Runtime
from ..runtime.request import GenerationResult


class Generation:
    """Submit with start(); then either `async for piece in g.pieces()` (streaming) or
    `await g.finished(http_request)`. `result` is final once the stream ends."""

    def __init__(self, rt: Runtime, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float,
                 top_k: int, top_p: float, seed: int | None, stop: Sequence[str], stream: bool,
                 on_finish: Callable[[GenerationResult], None] | None = None):
        self.rt, self.on_finish = rt, on_finish
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.done: asyncio.Future[GenerationResult] = self.loop.create_future()
        self.t_start = time.perf_counter()
        self.total_s = 0.0               # received to finished, as Ollama's total_duration
        self.request = rt.request(list(prompt_ids), max_new_tokens, temperature, top_k, top_p, seed, stop=stop,
                                  on_text=self._on_text if stream else None, on_done=self._on_done)

    @property
    def result(self) -> GenerationResult:
        return self.request.result

    @property
    def error(self) -> BaseException | None:
        return self.request.error

    def start(self) -> "Generation":
        self.rt.batcher.submit(self.request)
        return self

    def cancel(self) -> None:
        """No-op once finished."""
        if not self.request.finished:
            self.request.cancel()

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces as they become final; ends when the request finishes."""
        while (piece := await self.queue.get()) is not None:
            yield piece

    async def finished(self, http: HttpRequest) -> GenerationResult:
        """The result, cancelling the request if the client disconnects (or this task is cancelled) first."""
        watch = asyncio.ensure_future(_cancel_on_disconnect(http, self))
        try:
            return await asyncio.shield(self.done)
        finally:
            watch.cancel()
            self.cancel()

    # ---- on the batcher's thread ----
    def _on_text(self, piece: str) -> None:
        self._post(self.queue.put_nowait, piece)

    def _on_done(self, result: GenerationResult) -> None:
        self._post(self._finish, result)

    def _post(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:      # the loop is closed (server stopped): nobody is waiting any more
            pass

    # ---- on the loop ----
    def _finish(self, result: GenerationResult) -> None:
        self.total_s = time.perf_counter() - self.t_start
        self.queue.put_nowait(None)
        if not self.done.done():
            self.done.set_result(result)
        if self.on_finish is not None:
            self.on_finish(result)


async def _cancel_on_disconnect(http: HttpRequest, generation: Generation) -> None:
    """The body was read already: the next ASGI message is the client's disconnect."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


class GenerationStream(StreamingResponse):
    """A streamed response of one generation: cancels it however the response ends (finished: no-op)."""

    def __init__(self, generation: Generation, body: AsyncIterator[str], media_type: str):
        super().__init__(body, media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()
