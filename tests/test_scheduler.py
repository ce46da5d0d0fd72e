"""The hetero backend (hetero_rt.experts.hetero) end to end in CPU fallback: logits equal the torch
backend's (the oracle, itself tested against transformers) whatever the cache size, policy, prefetch,
overlap and streaming; worker errors surface; placement keys are validated with file:line errors and
the memory planner counts the cache.

Tolerance: fp32, different accumulation order (numba vs torch): max |diff| <= 1e-4 x max |logit|."""
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import hetero_rt
from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
from hetero_rt.config import ModelArgs
from hetero_rt.errors import HeteroRTError
from hetero_rt.checkpoint.source import read_tensor_meta
from hetero_rt.placement.memory import plan_memory
from hetero_rt.placement.plan import resolve
from hetero_rt.placement.schema import PlacementError, parse_rules
from hetero_rt.bench.routing import RoutingRecorder, load_trace
from hetero_rt.experts.hetero import hetero_session
from hetero_models import CFG, DECODE, PROMPT, close, hetero_checkpoint, run

V3 = Path(__file__).parent / "fixtures" / "deepseek_v3"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return hetero_checkpoint(tmp_path_factory.mktemp("hetero"))


@pytest.fixture(scope="module")
def reference(ckpt):
    return run(hetero_rt.load(ckpt, dtype="float32", context=64))


@pytest.fixture(scope="module")
def profile(ckpt, tmp_path_factory):
    rt = hetero_rt.load(ckpt, dtype="float32", context=64)
    d = tmp_path_factory.mktemp("profile")
    with RoutingRecorder(rt.model) as rec:
        run(rt)
    rec.save(d / "profile.json", d / "trace.npz")
    return d / "profile.json"


def hetero_rules(tmp_path, hetero: str, extra: str = "") -> Path:
    path = tmp_path / "hetero.yaml"
    path.write_text("defaults: {device: cuda, dtype: float32}\nrules:\n  - match: {kind: routed_experts}\n"
                    f"    place: {{device: cpu, backend: hetero, hetero: {hetero}}}\n" + extra)
    return path


CONFIGS = {
    "no-cache": "{}",
    "cache-3": "{cache: 3}",
    "cache-all": "{cache: 16}",
    "cache-2-no-prefetch": "{cache: 2, prefetch: false}",
    "cache-8-no-overlap": "{cache: 8, overlap: false}",
    "cache-5-serial": "{cache: 5, overlap: false, prefetch: false}",
    "cache-bytes": "{cache: 40KiB, decay: 0.5}",     # 40 KiB / (3 x 32 x 64 x 4 B) = 1 slot
    "stream": "{cache: 4, stream: true, cpu_gflops: 0.001}",   # the cost model always streams prefill
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_the_torch_backend(name, ckpt, reference, tmp_path):
    rt = hetero_rt.load(ckpt, hetero_rules(tmp_path, CONFIGS[name]), cpu_fallback=True, context=64)
    close(run(rt), reference)                          # copies complete whenever the copy thread gets to them
    hetero_session(rt.model).drain()
    close(run(rt), reference)                          # the second run starts with every copy done
    total = hetero_session(rt.model).total()
    moe_layers = CFG["num_hidden_layers"] - 1
    assert total.calls == 2 * moe_layers * (1 + DECODE)
    assert total.hit_pairs + total.miss_pairs == 2 * moe_layers * (len(PROMPT) + DECODE) * CFG["num_experts_per_tok"]
    if name == "no-cache":
        assert total.hits == 0 and total.bytes_experts == 0
    else:
        assert total.hits > 0                          # after drain(): cached experts ran on the "GPU" path
    if name == "stream":
        assert total.stream_calls == 2 * moe_layers and total.streamed_experts > 0
        profile = hetero_session(rt.model).describe()
        assert profile.count("\n") == 2 + moe_layers and "| all | 42 |" in profile
    if "no-prefetch" in name or "serial" in name or name == "no-cache":
        assert total.prefetches_issued == 0
    elif name in ("cache-3", "cache-8-no-overlap"):
        assert total.prefetches_issued > 0
    hetero_session(rt.model).close()


def test_prediction_is_not_recorded_as_routing(ckpt, profile, tmp_path):
    """The prefetcher applies the next layer's gate early; a RoutingRecorder must not see those calls."""
    rt = hetero_rt.load(ckpt, hetero_rules(tmp_path, "{cache: 4}"), cpu_fallback=True, context=64)
    with RoutingRecorder(rt.model) as rec:
        run(rt)
    want = load_trace(profile.parent / "trace.npz")
    assert hetero_session(rt.model).total().prefetches_issued > 0
    for layer, calls in want.items():
        assert len(rec.calls[layer]) == len(calls)
        for got, ref in zip(rec.calls[layer], calls):
            np.testing.assert_array_equal(got, ref)
    hetero_session(rt.model).close()


def test_static_policy_from_a_recorded_profile(ckpt, reference, profile, tmp_path):
    rules = hetero_rules(tmp_path, f"{{cache: 6, policy: static, profile: {profile}}}")
    rt = hetero_rt.load(ckpt, rules, cpu_fallback=True, context=64)
    session = hetero_session(rt.model)
    counts = {int(k): v for k, v in __import__("json").loads(profile.read_text())["layers"].items()}
    for layer, experts in rt.model.layers.named_children():
        if hasattr(experts.ffn, "gate"):
            cache = experts.ffn.experts.cache
            hottest = sorted(np.argsort(-np.array(counts[int(layer)]), kind="stable")[:6].tolist())
            assert sorted(cache.resident()) == hottest
    close(run(rt), reference)
    assert session.total().promotions == 3 * 6 and session.total().prefetches_issued == 0
    trace = load_trace(profile.parent / "trace.npz")
    assert sorted(trace) == [1, 2, 3] and len(trace[1]) == 1 + DECODE and trace[1][0].shape == (len(PROMPT), 4)
    session.close()


def deferral_oracle(rt, d: int) -> None:
    """Patch the torch-backend model: in every MoE layer but the last, the d lowest-weighted experts of
    each token are computed apart and added to the next MoE layer's output."""
    moe = [b.ffn for b in rt.model.layers if hasattr(b.ffn, "gate")]
    state = {"pending": None}

    def make(m, last):
        def forward(x):
            w, ids = m.gate(x)
            if last:
                now, later = m.experts(x, ids, w), None
            else:
                low = w.argsort(dim=1, stable=True)[:, :d]
                mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, low, True)
                now, later = m.experts(x, ids, w.masked_fill(mask, 0)), m.experts(x, ids, w.masked_fill(~mask, 0))
            if state["pending"] is not None:
                now = now + state["pending"]
            state["pending"] = later
            return now + m.shared_experts(x)
        return forward
    for i, m in enumerate(moe):
        m.forward = make(m, i == len(moe) - 1)


def test_deferral_equals_its_oracle(ckpt, reference, tmp_path):
    oracle = hetero_rt.load(ckpt, dtype="float32", context=64)
    deferral_oracle(oracle, 1)
    want = run(oracle)
    rt = hetero_rt.load(ckpt, hetero_rules(tmp_path, "{defer: 1}"), cpu_fallback=True, context=64)
    close(run(rt), want)
    assert hetero_session(rt.model).total().deferred_pairs == 2 * (len(PROMPT) + DECODE)
    hetero_session(rt.model).close()


def test_deferral_changes_logits_only_when_on(ckpt, reference, tmp_path):
    rt = hetero_rt.load(ckpt, hetero_rules(tmp_path, "{cache: 4, defer: 1}"), cpu_fallback=True, context=64)
    got = run(rt)
    diff = max(np.abs(g - w).max() / np.abs(w).max() for g, w in zip(got, reference))
    assert diff > 1e-3                                 # deferral is an approximation
    total = hetero_session(rt.model).total()
    assert 0 < total.deferred_pairs <= 2 * (len(PROMPT) + DECODE)   # at most d=1 per token, not in the last layer
    hetero_session(rt.model).close()


def in_thread(fn, timeout=600):
    """Run fn in a thread; returns its exception. Fails the test on a hang instead of hanging."""
    box = []

    def target():
        try:
            fn()
        except BaseException as e:
            box.append(e)
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "hung"
    return box[0] if box else None


def test_worker_error_surfaces(ckpt, reference, tmp_path, monkeypatch):
    rt = hetero_rt.load(ckpt, hetero_rules(tmp_path, "{cache: 2}"), cpu_fallback=True, context=64)
    host = rt.model.layers[2].ffn.experts.host

    def explode(*a, **k):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(host, "run", explode)
    err = in_thread(lambda: rt.logits(PROMPT))
    assert isinstance(err, HeteroRTError)
    assert "layer 2: the CPU expert worker failed" in str(err) and "RuntimeError: kernel exploded" in str(err)
    monkeypatch.undo()
    close(run(rt), reference)                          # the worker survives a failed job
    session = hetero_session(rt.model)
    session.worker.close()
    err = in_thread(lambda: rt.logits(PROMPT))
    assert isinstance(err, HeteroRTError) and "worker thread has stopped" in str(err)
    session.copier.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_worker_failure_death_and_timeout_are_errors():
    from hetero_rt.experts.hetero import CpuWorker, HostBuffers, Job
    worker = CpuWorker()
    job = Job(HostBuffers(1, 4, 1, pinned=False))
    job.layer = 7
    job.run = lambda: (_ for _ in ()).throw(SystemExit())  # noqa: E731  kills nothing: caught per job
    worker.submit(job)
    with pytest.raises(HeteroRTError, match="layer 7: the CPU expert worker failed"):
        worker.wait(job)
    job.run = lambda: None
    job.done.clear()
    worker.queue.put("poison")                         # the loop itself fails: the thread dies with
    worker.queue.put(job)                              # this job queued behind (put, not submit: no race)
    with pytest.raises(HeteroRTError, match="layer 7: the CPU expert worker thread died"):
        worker.wait(job)
    worker.thread.join(600)
    with pytest.raises(HeteroRTError, match="worker thread has stopped"):
        worker.submit(job)
    hang = Job(HostBuffers(1, 4, 1, pinned=False))
    hang.layer = 8
    release = threading.Event()
    hang.run = release.wait
    slow = CpuWorker(timeout_s=0.3)
    slow.submit(hang)
    with pytest.raises(HeteroRTError, match="layer 8: the CPU expert worker did not finish"):
        slow.wait(hang)
    release.set()
    worker.close()
    slow.close()


RULE = "rules:\n  - match: {kind: routed_experts}\n    place: {device: cpu, backend: hetero, hetero: %s}\n"


@pytest.mark.parametrize("hetero,needle", [
    ("{slots: 4}", "r.yaml:3: unknown key 'slots' in hetero"),
    ("{policy: lru}", "r.yaml:3: unknown cache policy 'lru'; expected one of static, dynamic"),
    ("{policy: static, prefetch: true, profile: /x}", "r.yaml:3: routing profile '/x' not found"),
    ("{policy: static}", "r.yaml:3: policy static needs profile"),
    ("{policy: static, prefetch: true}", "r.yaml:3: prefetch replaces cached experts"),
    ("{cache: -1}", "r.yaml:3: hetero.cache must be a number of expert slots"),
    ("{cache: 12 parsecs}", "r.yaml:3: hetero.cache: cannot read '12 parsecs' as a size"),
    ("{decay: 1.5}", "r.yaml:3: hetero.decay must be a number in (0, 1]"),
    ("{defer: -1}", "r.yaml:3: hetero.defer must be an integer from 0 to 1024"),
    ("{prefetch: 3}", "r.yaml:3: hetero.prefetch must be true or false"),
    ("{pcie_gbps: 0}", "r.yaml:3: hetero.pcie_gbps must be a positive number"),
    ("[1, 2]", "r.yaml:3: hetero must be a mapping"),
])
def test_hetero_key_errors(hetero, needle):
    with pytest.raises(PlacementError) as e:
        parse_rules(RULE % hetero, "r.yaml")
    assert needle in str(e.value)


def test_hetero_resolution_errors(ckpt, tmp_path):
    args = ModelArgs.from_config_file(ckpt / "config.json")
    with pytest.raises(PlacementError, match="r.yaml:3: hetero settings apply to routed_experts, not gate"):
        parse_rules("rules:\n  - match: {kind: gate}\n    place: {hetero: {cache: 2}}\n", "r.yaml")
    text = ("defaults: {device: cpu}\nrules:\n  - match: {kind: routed_experts}\n    place: {hetero: {cache: 2}}\n"
            "  - match: {kind: routed_experts}\n    place: {backend: numba}\n")
    with pytest.raises(PlacementError, match=r"r.yaml:4: model.layers.1.mlp.experts: hetero settings need backend "
                                             r"hetero, the rules give backend 'numba'"):
        resolve(args, parse_rules(text, "r.yaml"))
    with pytest.raises(PlacementError, match="backend 'hetero' runs on the CPU"):
        parse_rules("rules:\n  - match: {kind: routed_experts}\n    place: {device: cuda, backend: hetero}\n", "r.yaml")
    with pytest.raises(HeteroRTError, match="hetero.defer=4 must be below the 4 experts per token"):
        hetero_rt.load(ckpt, hetero_rules(tmp_path, "{defer: 4}"), cpu_fallback=True, context=64)


def test_planner_counts_the_expert_cache():
    args = ModelArgs.from_config_file(V3 / "config.json")
    text = ("defaults: {device: cuda, dtype: bfloat16}\nrules:\n  - match: {kind: routed_experts}\n"
            "    place: {device: cpu, backend: hetero, hetero: {cache: 16}}\n"
            "  - match: {name: 'model\\.layers\\.(3|4)\\.mlp\\.experts'}\n"
            "    place: {hetero: {cache: 1GiB, stream: true}}\n")
    plan = resolve(args, parse_rules(text, "c.yaml"), check_devices=False)
    mem = plan_memory(args, plan, read_tensor_meta(V3), 4096, "bfloat16")
    expert = 3 * 2048 * 7168 * 2
    want = 56 * 16 * expert + 2 * ((2 ** 30 // expert) * expert + 2 * expert)
    assert mem.devices["cuda"].weights["expert_cache"] == want
    assert "expert_cache" in mem.describe() and "hetero={cache: 16, policy: dynamic" in plan.describe()
    budget = {"cuda": mem.devices["cuda"].total - 2 ** 30}
    short = plan_memory(args, plan, read_tensor_meta(V3), 4096, "bfloat16", budget)
    assert "cuda is short by 1.00 GiB; lower hetero.cache" in short.verdict()


def test_cost_model_crossover():
    from hetero_rt.experts.hetero.cost_model import CostModel
    m = CostModel(pcie_gbps=20, cpu_gbps=80, cpu_gflops=800, gpu_tflops=50)
    i, d = 2048, 7168
    flops, gpu_b, host_b = 6 * i * d, 3 * i * d * 2, 3 * i * d * 2
    n = m.crossover_tokens(host_b, gpu_b, flops)
    assert n == pytest.approx(gpu_b / 20e9 / (flops / 800e9))       # = 40 tokens per expert for bf16
    for tokens, want in ((n * 0.9, "cpu"), (n * 1.1, "stream"), (1, "cpu")):
        counts = np.full(16, tokens)
        assert m.choose(counts, host_b, gpu_b, flops)[0] == want
    assert m.crossover_tokens(host_b, gpu_b // 8, flops) == 0.0     # copying cheaper than reading on the CPU


@pytest.mark.parametrize("variant", ["v2_lite", "v2", "v3"])
def test_transformers_models_with_cache_and_prefetch(variant, tmp_path):
    """Against transformers directly: V2-Lite (softmax, greedy, 2 shared experts), V2 (group-limited,
    scaling), V3 (sigmoid, noaux_tc, correction bias)."""
    from hf_models import build_hf_model, hf_logits, save_hf_model
    hf = build_hf_model(variant, seed=7)
    path = save_hf_model(hf, variant, tmp_path / "ckpt")
    rt = hetero_rt.load(path, hetero_rules(tmp_path, "{cache: 3, decay: 0.5}"), cpu_fallback=True, context=64)
    ids = PROMPT[:12]
    want = hf_logits(hf, [i % 96 for i in ids]).numpy()
    for _ in range(2):                                 # second pass: the cache is warm
        got = rt.logits([i % 96 for i in ids])
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
        hetero_session(rt.model).drain()
    assert hetero_session(rt.model).total().hits > 0
    hetero_session(rt.model).close()


@pytest.mark.slow
def test_bench_script_runs(tmp_path):
    import subprocess
    import sys
    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, str(root / "scripts" / "bench_hetero.py"), "--tiny", "--sizes", "4", "8",
                          "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1"], capture_output=True, text=True,
                         cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "| dynamic cache 8 + prefetch |" in out.stdout and "Belady" in out.stdout
    profile, trace = tmp_path / "p.json", tmp_path / "t.npz"
    ckpt = write_synthetic_checkpoint(tmp_path / "ck", synthetic_config("tiny", **CFG), dtype="float32")
    out = subprocess.run([sys.executable, str(root / "scripts" / "record_routing.py"), "--model", str(ckpt),
                          "--random", "2", "--prompt-len", "8", "--new-tokens", "3", "--profile", str(profile),
                          "--trace", str(trace)], capture_output=True, text=True, cwd=root,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=600)
    assert out.returncode == 0, out.stderr
    assert sum(load_trace(trace)[1][0].shape) > 0 and profile.is_file()


@pytest.mark.parametrize("content, message", [
    ("[1, 2, 3]", "not a routing profile"),
    ('{"layers": {"1": [1, 2]}}', "not a routing profile .*format 'hetero_rt.routing_profile/1'"),
    ('{"format": "hetero_rt.routing_profile/1", "layers": [1]}', "not a routing profile"),
    ('{"format": "hetero_rt.routing_profile/1", "layers": {"1": "many"}}', "counts must be a list of finite"),
    ('{"format": "hetero_rt.routing_profile/1", "layers": {"1": [1, "x", 3, 4]}}', "counts must be a list of finite"),
    ('{"format": "hetero_rt.routing_profile/1", "layers": {"1": [1, -2, 3, 4]}}', "counts must be a list of finite"),
    ('{"format": "hetero_rt.routing_profile/1", "layers": {"1": [1, 2]}}', "has counts for 2 experts, the model has 4"),
    ("\xff not json", "not a routing profile"),
])
def test_a_file_that_is_not_a_routing_profile_is_named(tmp_path, content, message):
    from hetero_rt.experts.hetero import load_profile
    path = tmp_path / "p.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(HeteroRTError, match=message):
        load_profile(path, 1, 4)
