"""Prefetch and copies (hetero_rt.runtime.prefetch): an expert is used only once its copy is complete
(copies held back or slowed down artificially; cache slots start as NaN so a premature use would
show), copy errors surface, prediction ranks experts as the gate does; the same on a real GPU."""
import threading

import numpy as np
import pytest
import torch

import hetero_rt
from hetero_rt.errors import HeteroRTError
from hetero_rt.placement.schema import HeteroSpec
from hetero_rt.runtime.prefetch import Copier
from hetero_rt.runtime.scheduler import install, rank_experts
from test_scheduler import CFG, PROMPT, close, ckpt, reference, run  # noqa: F401  (fixtures)

MOE_LAYERS = range(1, CFG["num_hidden_layers"])


def numba_model(ckpt, tmp_path):
    rules = tmp_path / "numba.yaml"
    rules.write_text("defaults: {device: cpu, dtype: float32}\nrules:\n  - match: {kind: routed_experts}\n"
                     "    place: {backend: numba}\n")
    return hetero_rt.load(ckpt, rules, context=64)


def poison(session):
    for e in session.layers.values():
        for w in (e.cache.w1, e.cache.w3, e.cache.w2):
            w.fill_(float("nan"))


def test_held_copies_are_never_used(ckpt, reference, tmp_path):
    rt = numba_model(ckpt, tmp_path)
    gate = threading.Event()
    session = install(rt.model, {layer: HeteroSpec(cache_slots=4, prefetch=True) for layer in MOE_LAYERS}, "cpu",
                      copier=Copier("cpu", gate=gate))
    poison(session)
    close(run(rt), reference)                        # every copy is still held: all on the CPU
    total = session.total()
    assert total.hits == 0 and total.prefetches_used == 0
    assert total.prefetches_issued > 0 and total.promotions > 0
    pending = [t for e in session.layers.values() for t in e.cache.tickets if t is not None]
    assert pending and not any(t.done() for t in pending)
    gate.set()
    session.drain()
    session.reset_counters()
    close(run(rt), reference)                        # now the cache serves, with the same logits
    total = session.total()
    assert total.hits > 0 and total.prefetches_used > 0
    assert total.prefetches_used <= total.prefetches_issued + 12   # issued in the previous run or this one
    session.close()


def test_slow_copies_give_identical_logits(ckpt, reference, tmp_path):
    rt = numba_model(ckpt, tmp_path)
    session = install(rt.model, {layer: HeteroSpec(cache_slots=6, prefetch=True, decay=0.5) for layer in MOE_LAYERS},
                      "cpu", copier=Copier("cpu", delay_s=0.01))
    poison(session)
    for _ in range(2):
        close(run(rt), reference)
    assert session.total().hits > 0
    session.close()


def test_a_failed_copy_surfaces(ckpt, tmp_path, monkeypatch):
    rt = numba_model(ckpt, tmp_path)
    session = install(rt.model, {1: HeteroSpec(cache_slots=2, prefetch=False)}, "cpu")
    cache = session.layers[1].cache
    monkeypatch.setattr(cache, "write_slot", lambda *a, **k: (_ for _ in ()).throw(OSError("bus error")))
    rt.logits(PROMPT)                                # promotes: the copies fail on the copy thread
    session.copier.queue.put(None)
    session.copier.thread.join(5)
    with pytest.raises(HeteroRTError, match=r"expert copy of expert \d+ of layer 1 into slot \d failed: "
                                            r"OSError\('bus error'\)"):
        rt.logits(PROMPT)
    session.worker.close()


def test_rank_experts_most_tokens_then_gate_order():
    assert rank_experts(np.array([[5, 2, 9]]), 10) == [5, 2, 9]
    assert rank_experts(np.array([[5, 2], [2, 7], [7, 2]]), 10) == [2, 7, 5]


@pytest.mark.gpu
def test_gpu_cache_and_prefetch_match_the_cpu(ckpt, reference, tmp_path):
    rules = tmp_path / "gpu.yaml"
    rules.write_text("defaults: {device: cuda, dtype: float32}\nrules:\n  - match: {kind: routed_experts}\n"
                     "    place: {device: cpu, backend: hetero, hetero: {cache: 4, stream: true, cpu_gflops: 0.001}}\n")
    rt = hetero_rt.load(ckpt, rules, context=64)
    session = rt.model.hetero
    assert session.cuda and session.layers[1].cache.w1.is_cuda and session.main.bufs.x_t.is_pinned()
    for _ in range(2):
        close(run(rt), reference)
    total = session.total()
    assert total.hits > 0 and total.prefetches_issued > 0 and total.stream_calls > 0
    session.close()
