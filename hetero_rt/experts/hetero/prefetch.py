"""Copies of experts from host memory into GPU cache slots, off the critical path, and the tickets
that say when a copy is complete.

On CUDA a copy thread dequantizes the expert into pinned staging buffers and issues the host->GPU
copy on a side stream, after making that stream wait for the main stream's work queued so far (which
may still read the slot being overwritten); a CUDA event recorded after the copy is the ticket's
completion. Without a GPU the same thread writes the slot directly and a threading.Event stands in
for the CUDA event, so the logic "use an expert only once its ticket is done" is the same and tested.

`on_copy`, when set (profilers: hetero_rt.bench.profile), is called on the thread that made a copy
as on_copy(cache, expert, slot, start, seconds) (time.perf_counter clock; on CUDA the host side:
dequantizing and issuing), before the ticket is marked done, so a drained copy has been reported.

`threaded=False` copies inline (deterministic counters in tests); `delay_s` slows every copy down
and `gate` (a threading.Event) holds copies until set: both exist to test that an expert is never
used before its copy completes.
"""
from __future__ import annotations

import queue
import threading
import time

import torch

from ...errors import HeteroRTError


class Ticket:
    """Completion of one copy: done() never blocks; wait() blocks (tests, streaming)."""
    __slots__ = ("event", "cuda_event", "error", "what")

    def __init__(self, what: str):
        self.event, self.cuda_event, self.error, self.what = threading.Event(), None, None, what

    def done(self) -> bool:
        if not self.event.is_set():
            return False
        self._raise()
        return self.cuda_event is None or self.cuda_event.query()

    def wait(self) -> None:
        self.event.wait()
        self._raise()
        if self.cuda_event is not None:
            self.cuda_event.synchronize()

    def wait_on_stream(self) -> None:
        """Make the current stream wait for the copy (no host wait for the GPU part)."""
        self.event.wait()
        self._raise()
        if self.cuda_event is not None:
            torch.cuda.current_stream().wait_event(self.cuda_event)

    def _raise(self) -> None:
        if self.error is not None:
            raise HeteroRTError(f"expert copy {self.what} failed: {self.error!r}") from self.error


class Copier:
    def __init__(self, device: torch.device | str, threaded: bool = True, delay_s: float = 0.0,
                 gate: threading.Event | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.threaded, self.delay_s, self.gate = threaded, delay_s, gate
        self.on_copy = None
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.staging: dict[tuple, list] = {}          # shapes -> [tensors (pinned), last cuda event]
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = None
        if threaded:
            self.thread = threading.Thread(target=self._loop, name="hetero-rt-copier", daemon=True)
            self.thread.start()

    def submit(self, cache, expert: int, slot: int) -> Ticket:
        ticket = Ticket(f"of expert {expert} of layer {cache.layer} into slot {slot}")
        after = None
        if self.cuda:  # the side stream must not overwrite the slot before queued reads of it are done
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(self.device))
        job = (cache, expert, slot, ticket, after)
        if self.threaded:
            if not self.thread.is_alive():
                raise HeteroRTError("the expert copy thread has stopped; no more copies can be issued")
            self.queue.put(job)
        else:
            self._copy(*job)
        return ticket

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the copy thread after the copies queued before this call and join it (at most timeout_s)."""
        if self.thread is not None and self.thread.is_alive():
            self.queue.put(None)
            self.thread.join(timeout=timeout_s)

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            self._copy(*job)

    def _copy(self, cache, expert: int, slot: int, ticket: Ticket, after) -> None:
        try:
            if self.gate is not None:
                self.gate.wait()
            if self.delay_s:
                time.sleep(self.delay_s)
            t0 = time.perf_counter()
            with torch.no_grad():
                if self.cuda:
                    self._copy_cuda(cache, expert, slot, ticket, after)
                else:
                    cache.write_slot(expert, slot)
            hook = self.on_copy
            if hook is not None:
                hook(cache, expert, slot, t0, time.perf_counter() - t0)
        except BaseException as e:  # surfaces on the main thread through the ticket
            ticket.error = e
        ticket.event.set()

    def _copy_cuda(self, cache, expert: int, slot: int, ticket: Ticket, after) -> None:
        shapes = (tuple(cache.w1.shape[1:]), tuple(cache.w2.shape[1:]), cache.dtype)
        entry = self.staging.get(shapes)
        if entry is None:
            i_d, d_i, dtype = shapes
            bufs = [torch.empty(s, dtype=dtype, pin_memory=True) for s in (i_d, i_d, d_i)]
            entry = self.staging[shapes] = [bufs, None]
        if entry[1] is not None:      # the previous copy out of this staging buffer must be finished
            entry[1].synchronize()
        with torch.cuda.stream(self.side):
            self.side.wait_event(after)
            cache.write_slot(expert, slot, staging=entry[0])
            done = torch.cuda.Event()
            done.record(self.side)
        entry[1] = ticket.cuda_event = done
