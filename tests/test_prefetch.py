"""Prefetch and copies (hetero_rt.experts.hetero.prefetch): an expert is used only once its copy is complete
(copies held back or slowed down artificially; cache slots start as NaN so a premature use would
show), copy errors surface, prediction ranks experts as the gate does; the same on a real GPU."""
import threading

import numpy as np
import pytest
import torch

import hetero_rt
from hetero_rt.errors import HeteroRTError
from hetero_rt.placement.schema import HeteroSpec
from hetero_rt.experts.hetero.prefetch import Copier
from hetero_rt.experts.hetero import hetero_session, install, rank_experts
from hetero_models import CFG, PROMPT, close, dequantized_reference, hetero_checkpoint, host_experts, run

MOE_LAYERS = range(1, CFG["num_hidden_layers"])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return hetero_checkpoint(tmp_path_factory.mktemp("prefetch"))


@pytest.fixture(scope="module")
def reference(ckpt):
    return run(hetero_rt.load(ckpt, dtype="float32", context=64))


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
    issued_before = total.prefetches_issued
    gate.set()
    session.drain()
    session.reset_counters()
    close(run(rt), reference)                        # now the cache serves, with the same logits
    total = session.total()
    assert total.hits > 0 and total.prefetches_used > 0
    assert total.prefetches_used <= issued_before + total.prefetches_issued   # each used one was issued
    session.close()


def test_slow_copies_give_identical_logits(ckpt, reference, tmp_path):
    rt = numba_model(ckpt, tmp_path)
    session = install(rt.model, {layer: HeteroSpec(cache_slots=6, prefetch=True, decay=0.5) for layer in MOE_LAYERS},
                      "cpu", copier=Copier("cpu", delay_s=0.01))
    poison(session)
    close(run(rt), reference)                        # copies land at any point of this run
    session.drain()
    close(run(rt), reference)
    assert session.total().hits > 0
    session.close()


def test_a_failed_copy_surfaces(ckpt, tmp_path, monkeypatch):
    rt = numba_model(ckpt, tmp_path)
    session = install(rt.model, {1: HeteroSpec(cache_slots=2, prefetch=False)}, "cpu")
    cache = session.layers[1].cache
    monkeypatch.setattr(cache, "write_slot", lambda *a, **k: (_ for _ in ()).throw(OSError("bus error")))
    rt.logits(PROMPT)                                # promotes: the copies fail on the copy thread
    session.copier.close(timeout_s=600)              # every queued copy has run (and failed)
    assert not session.copier.thread.is_alive()
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
    session = hetero_session(rt.model)
    assert session.cuda and session.layers[1].cache.w1.is_cuda and session.main.bufs.x_t.is_pinned()
    for _ in range(2):
        close(run(rt), reference)
    total = session.total()
    assert total.hits > 0 and total.prefetches_issued > 0 and total.stream_calls > 0
    session.close()


# ---- one or two HeteroExperts layers driven directly, with scripted routing ----

from hetero_rt.experts.hetero.expert_cache import DynamicPolicy, ExpertCache  # noqa: E402
from hetero_rt.experts.hetero import HeteroExperts, HeteroSession  # noqa: E402


class ScriptedGate:
    """Stands in for the next layer's gate: returns the scripted ids, one (1, K) row per call."""

    def __init__(self, rows):
        self.rows, self.calls = rows, 0

    def forward(self, x):
        ids = torch.tensor([self.rows[self.calls]])
        self.calls += 1
        return None, ids


def layer(src, index, session, slots, **kw):
    cache = None
    if slots:
        cache = ExpertCache(src, slots, "cpu", torch.float32, DynamicPolicy(src.n_experts, decay=0.5,
                                                                                max_promotions=1),
                            session.copier, index)
    return HeteroExperts(src, index, session, cache, **kw)


def test_prefetch_counters_exact_through_the_scheduler():
    """Layer A predicts B's experts with a scripted gate; worked out by hand (docstring of
    test_expert_cache.test_counters_exact_on_a_scripted_trace for the policy's arithmetic):
    1: prefetch 3, 4 (empty slots); B needs {3, 5}: 3 hit (prefetch used), 5 miss; 5 evicts 4 (score 0)
    2: prefetch 4 over 5 (3 is predicted, kept); B needs {4, 5}: 4 hit (used), 5 miss; 5 evicts 3
    3: predicted 5, 4 resident: nothing issued; B needs {5, 4}: 2 hits, no prefetch used."""
    src_a, src_b = host_experts(6, seed=1), host_experts(6, seed=2)
    session = HeteroSession("cpu", torch.float32, src_a.dim, 2, max_tokens=4, copier=Copier("cpu", threaded=False))
    a = layer(src_a, 0, session, 0, prefetch=True)
    b = layer(src_b, 1, session, 2)
    a.next = (ScriptedGate([[3, 4], [4, 3], [5, 4]]), b)
    ref_a, ref_b = dequantized_reference(src_a), dequantized_reference(src_b)
    w = torch.tensor([[0.7, 0.3]])
    resident = []
    for ids_b in ([[3, 5]], [[4, 5]], [[5, 4]]):
        x = torch.randn(1, src_a.dim)
        ids_a, ids_b = torch.tensor([[0, 1]]), torch.tensor(ids_b)
        torch.testing.assert_close(a(x, ids_a, w), ref_a(x, ids_a, w), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b(x, ids_b, w), ref_b(x, ids_b, w), atol=1e-5, rtol=1e-5)
        resident.append(sorted(b.cache.resident()))
    assert resident == [[3, 5], [4, 5], [4, 5]]
    cb = b.counters
    assert (cb.calls, cb.hits, cb.misses, cb.hit_pairs, cb.miss_pairs) == (3, 4, 2, 4, 2)
    assert (cb.prefetches_issued, cb.prefetches_used, cb.promotions) == (3, 2, 2)
    assert cb.bytes_experts == 5 * b.cache.expert_bytes
    ca = a.counters
    assert (ca.calls, ca.hits, ca.misses, ca.prefetches_issued) == (3, 0, 6, 0)
    session.close()


@pytest.mark.parametrize("fmt", ["fp32", "q8_0", "q4_k"])
def test_layer_equals_the_dequantized_reference(fmt):
    """Cache hits, misses, several tokens per expert, and chunking above max_tokens, in a stored format."""
    src = host_experts(8, dim=256, inter=256, fmt=fmt, seed=4)
    session = HeteroSession("cpu", torch.float32, src.dim, 3, max_tokens=5, copier=Copier("cpu", threaded=False))
    e = layer(src, 0, session, 3)
    ref = dequantized_reference(src)
    g = torch.Generator().manual_seed(0)
    for tokens in (1, 1, 4, 13, 1, 2):
        x = torch.randn(tokens, src.dim, generator=g)
        ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(tokens)])
        w = torch.rand(tokens, 3, generator=g)
        torch.testing.assert_close(e(x, ids, w), ref(x, ids, w), atol=1e-4, rtol=1e-4)
    assert e.counters.hits > 0 and e.counters.misses > 0 and e.counters.calls == 1 + 1 + 1 + 3 + 1 + 1
    session.close()
