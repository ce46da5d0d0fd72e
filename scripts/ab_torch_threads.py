"""Decode with torch on one thread against torch on the kernels' threads, interleaved in one process
(the A/B behind kernels.threads.torch_threads; docs/benchmarks.md, 2026-12-02).

    python scripts/ab_torch_threads.py MODEL.gguf [--rounds 5] [--tokens 6] [--threads 2]

Prints each arm's ms per decode token per round and the median ratio (torch on N threads / on 1)."""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import hetero_rt
import hetero_rt.runtime.engine as engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ns = ap.parse_args()
    rt = hetero_rt.load(ns.model)
    rt.set_threads(ns.threads)
    rt.step(torch.tensor(list(range(1, 12))), 0)
    arms = {f"torch on {ns.threads}": 0, "torch on 1": engine.GEMV_MAX_TOKENS}
    ms = {a: [] for a in arms}
    pos = 11
    for _ in range(ns.rounds):
        for arm, limit in arms.items():
            engine.GEMV_MAX_TOKENS = limit          # 0: no forward counts as few tokens
            rt.step(torch.tensor([5]), pos)
            pos += 1
            t0 = time.perf_counter()
            for _ in range(ns.tokens):
                rt.step(torch.tensor([5]), pos)
                pos += 1
            ms[arm].append((time.perf_counter() - t0) / ns.tokens * 1e3)
    for arm, v in ms.items():
        print(f"{arm}: " + " ".join(f"{x:.0f}" for x in v) + " ms per token")
    a, b = (np.array(v) for v in ms.values())
    print(f"median per-round ratio ({list(arms)[0]} / torch on 1): {np.median(a / b):.3f}")


if __name__ == "__main__":
    main()
