"""Serving benchmark: aggregate generated tokens/s of the HTTP server at 1, 2, 4 concurrent clients
(one loopback server, `parallel` slots, the clients' requests decoded together by the batcher; each
request's prefill included), the packed decode step alone at the same batch sizes (what batching
buys once every client is decoding), and a chat's second-turn prefill with the prefix cache against
a full re-prefill of the same prompt. Rounds are interleaved (every batch size once per round) and
medians reported.
"""
from __future__ import annotations

import socket
import statistics
import json
import threading
import time
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch
import uvicorn

from ..model.batch import Segment
from ..runtime.engine import Runtime
from ..serve.app import build_app


@dataclass
class ClientRun:
    clients: int
    tokens: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


class LoopbackServer:
    """The app under uvicorn on 127.0.0.1 in a background thread (a free port); a context manager."""

    def __init__(self, rt: Runtime, name: str = "bench"):
        self.rt, self.name = rt, name

    def __enter__(self) -> "LoopbackServer":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(build_app(self.rt, self.name), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def client_round(url: str, prompts: list[list[int]], max_tokens: int) -> ClientRun:
    """len(prompts) clients at once, each one /v1/completions request; generated tokens / wall time."""
    counts = [0] * len(prompts)

    def one(i: int) -> None:
        body = {"model": "bench", "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0}
        post = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=3600) as r:
            counts[i] = json.loads(r.read())["usage"]["completion_tokens"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ClientRun(len(prompts), sum(counts), time.perf_counter() - t0)


def prompts_for(rt: Runtime, n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, rt.args.vocab_size, size=length).tolist() for _ in range(n)]


def bench_clients(rt: Runtime, clients: tuple[int, ...], prompt_len: int, max_tokens: int,
                  rounds: int) -> dict[int, list[ClientRun]]:
    runs: dict[int, list[ClientRun]] = {c: [] for c in clients}
    with LoopbackServer(rt) as server:
        client_round(server.url, prompts_for(rt, 1, prompt_len, 0), 4)          # warm-up
        for r in range(rounds):
            for c in clients:        # every prompt new: no prefix reuse inflates the figures
                runs[c].append(client_round(server.url, prompts_for(rt, c, prompt_len, 1000 * r + c), max_tokens))
    return runs


def decode_steps(rt: Runtime, batches: tuple[int, ...], rounds: int, context_len: int = 64) -> dict[int, list[float]]:
    """Seconds per packed decode forward of b one-token segments (b slots, each holding context_len
    positions), interleaved over batch sizes; the slots' prefixes are forgotten afterwards."""
    for slot in range(max(batches)):
        rt.step(torch.tensor(prompts_for(rt, 1, context_len, 7 + slot)[0]), 0, slot=slot)
    times: dict[int, list[float]] = {b: [] for b in batches}
    for r in range(rounds):
        for b in batches:
            tokens = torch.tensor(prompts_for(rt, 1, b, 500 + r)[0])
            t0 = time.perf_counter()
            rt.forward(tokens, [Segment(i, context_len + r, 1) for i in range(b)])
            times[b].append(time.perf_counter() - t0)
    for slot in range(max(batches)):
        rt.batcher.forget(slot)
    return times


def second_turn(rt: Runtime, first_len: int, reply: int, added: int, rounds: int) -> tuple[list[float], list[float]]:
    """Time to first token of turn 2 (turn 1's prompt + reply + `added` new tokens) with the prefix
    cache, and of the same prompt after the cache is forgotten (a full re-prefill)."""
    cached, full = [], []
    for r in range(rounds):
        turn1 = prompts_for(rt, 1, first_len, 50 + r)[0]
        res1 = rt.generate(turn1, max_new_tokens=reply)
        turn2 = turn1 + res1.new_ids + prompts_for(rt, 1, added, 90 + r)[0]
        res2 = rt.generate(turn2, max_new_tokens=1)
        cached.append(res2.prefill_s)
        assert res2.cached_tokens >= first_len, res2.cached_tokens
        for i in range(len(rt.batcher.slots)):
            rt.batcher.forget(i)
        res3 = rt.generate(turn2, max_new_tokens=1)
        assert res3.cached_tokens == 0 and res3.new_ids == res2.new_ids
        full.append(res3.prefill_s)
    return cached, full


def report(rt: Runtime, runs: dict[int, list[ClientRun]], steps: dict[int, list[float]], cached: list[float],
           full: list[float], prompt_len: int, max_tokens: int, first_len: int, added: int) -> str:
    base = statistics.median(r.tokens_per_s for r in runs[min(runs)])
    lines = [f"model {rt.source}, parallel {rt.parallel}, prompts of {prompt_len} tokens, max_tokens {max_tokens}",
             "", "| clients | aggregate tok/s (median) | vs 1 client | rounds |", "|---|---|---|---|"]
    for c, rs in runs.items():
        med = statistics.median(r.tokens_per_s for r in rs)
        lines.append(f"| {c} | {med:.2f} | {med / base:.2f}x | {len(rs)} |")
    one = statistics.median(steps[min(steps)])
    lines += ["", "| decoding together | step ms (median) | aggregate tok/s | vs 1 | rounds |", "|---|---|---|---|---|"]
    for b, ts in steps.items():
        m = statistics.median(ts)
        lines.append(f"| {b} | {m * 1e3:.0f} | {b / m:.2f} | {b * one / m:.2f}x | {len(ts)} |")
    mc, mf = statistics.median(cached), statistics.median(full)
    lines += ["", f"second turn ({first_len}-token first turn + reply, {added} new tokens): time to first token "
                  f"{mc * 1e3:.0f} ms with the prefix cache vs {mf * 1e3:.0f} ms re-prefilled: {mf / mc:.1f}x "
                  f"(medians of {len(cached)})"]
    return "\n".join(lines)
