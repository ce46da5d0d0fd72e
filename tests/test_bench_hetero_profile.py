"""`hetero-rt bench` on a hetero placement in CPU fallback: the trace holds the other threads' spans (the
CPU expert worker's job per layer, the copier's copies) beside the main thread's ops; the JSON holds the
expert cache's hit rate beside Belady at every cache size, and the PNG its third chart; the worker and
copier hook points are cleared afterwards. `hetero-rt run -v` ends with the per-op breakdown. Every
assertion is made after the threads have been drained: none depends on timing or scheduling."""
import json

import pytest
import torch

from hetero_rt import cli
from hetero_rt.bench import profile
from hetero_rt.experts.hetero import hetero_session

# cache: 1 slot of 8 experts with 2 per token: every token sends at least one pair to the CPU worker
HETERO = ("defaults: {device: cuda, dtype: float32}\nrules:\n  - match: {kind: routed_experts}\n"
          "    place: {device: cpu, backend: hetero, hetero: {cache: 1}}\n")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    # 3 layers: two MoE layers (1, 2), so layer 1 prefetches into layer 2's cache
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt",
                                      synthetic_config("tiny", num_hidden_layers=3), seed=0, dtype="float32")


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    path = tmp_path_factory.mktemp("rules") / "hetero.yaml"
    path.write_text(HETERO)
    return path


@pytest.fixture(scope="module")
def result(ckpt, rules, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--model", str(ckpt), "--rules", str(rules), "--cpu-fallback", "-p", "16", "-n", "4", "-t", "1",
            "-r", "1", "--bandwidth-probe", "16MiB", "--json", str(out / "b.json"), "--trace", str(out / "t.json"),
            "--plot", str(out / "b.png")]
    assert cli.main(argv) == 0
    return json.loads((out / "b.json").read_text()), json.loads((out / "t.json").read_text()), out / "b.png"


def _threads(trace):
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    procs = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    return names, procs


def test_trace_has_the_worker_thread_beside_the_main_thread(result):
    doc, trace, _ = result
    names, procs = _threads(trace)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for phase in ("decode", "prefill"):
        pid = next(p for p, n in procs.items() if n.endswith(phase))
        tids = {e["tid"] for e in spans if e["pid"] == pid}
        assert len(tids) >= 2
        threads = {names[pid, t] for t in tids}
        assert {"MainThread", "hetero-rt-cpu-experts"} <= threads
        worker = [e for e in spans if e["pid"] == pid and e["cat"] == profile.WORKER_OP]
        # one CPU job per MoE layer per call (1 slot of 8 experts, top-2: always a pair for the CPU)
        calls = doc["runs"][0]["breakdown"][phase]["steps"]
        assert sorted(e["args"]["layer"] for e in worker) == sorted([1, 2] * calls)
        assert all(names[pid, e["tid"]] == "hetero-rt-cpu-experts" and e["dur"] >= 0 for e in worker)
    copies = [e for e in spans if e["cat"] == profile.COPY_OP]
    assert all(names[e["pid"], e["tid"]] == "hetero-rt-copier" for e in copies)


def test_expert_cache_hit_rate_beside_belady(result):
    doc, _, png = result
    c = doc["runs"][0]["expert_cache"]
    assert c["layers"] == [1, 2] and c["slots_per_layer"] == {"1": 1, "2": 1} and c["n_experts"] == 8
    assert c["calls"] == doc["runs"][0]["breakdown"]["decode"]["steps"]
    m = c["measured"]
    # 2 layers x 4 decode steps, 2 distinct experts per call
    assert m["hits"] + m["misses"] == 2 * 4 * 2 and m["hit_rate"] == pytest.approx(m["hits"] / 16)
    curve = c["curve"]
    assert curve["slots"] == list(range(9))
    rates = curve["belady_hit_rate"]
    assert rates[0] == 0.0 and rates[-1] == 1.0                  # warm start: all 8 experts held
    assert all(a <= b for a, b in zip(rates, rates[1:]))         # more slots never hit less
    import matplotlib.image
    h, w = matplotlib.image.imread(png).shape[:2]
    assert w > 3 * h * 0.9                                       # three charts side by side


def test_no_cache_placed_means_no_cache_figures():
    from hetero_rt.bench import cache_curve
    assert cache_curve.figures(torch.nn.Module(), {}, cache_curve.LayerCounters()) is None
    assert cache_curve.cache_sizes(256, {1: 20})[:2] == [0, 8] and 20 in cache_curve.cache_sizes(256, {1: 20})


def test_worker_and_copier_spans_recorded_and_hooks_cleared(ckpt, rules):
    import hetero_rt
    rt = hetero_rt.load(ckpt, rules, cpu_fallback=True, context=32)
    session = hetero_session(rt.model)
    layer = session.layers[2]
    with profile.op_timers(rt.model, rt.device) as times:
        rt.step(torch.tensor([1, 2, 3]), 0, last_only=True)
        cache = layer.cache
        cache.load(next(e for e in range(8) if cache.slot_of[e] < 0), 0)   # one copy on the copier thread
    # op_timers drained the copy before returning
    by_op = {}
    for op, lyr, _, seconds, thread in times.events:
        by_op.setdefault(op, []).append((lyr, thread))
    assert sorted(by_op[profile.WORKER_OP]) == [(1, "hetero-rt-cpu-experts"), (2, "hetero-rt-cpu-experts")]
    assert (2, "hetero-rt-copier") in by_op[profile.COPY_OP]
    assert session.worker.on_job is None and session.copier.on_copy is None
    assert not any(op in {profile.WORKER_OP, profile.COPY_OP} for op, lyr in times.seconds)   # trace only
    session.close()


def test_run_verbose_prints_the_per_op_breakdown(ckpt, capsys):
    assert cli.main(["run", "--model", str(ckpt), "--prompt", "1 2 3", "-n", "4", "--dtype", "float32", "-v"]) == 0
    err = capsys.readouterr().err
    assert err.index("time to first token") < err.index("prefill of") < err.index("decode step")
    for op in (*profile.OPS, profile.OTHER):
        assert err.count(f"| {op} |") == 2
    assert cli.main(["run", "--model", str(ckpt), "--prompt", "1 2 3", "-n", "2", "--dtype", "float32"]) == 0
    assert "| attention (MLA) |" not in capsys.readouterr().err


def test_replay_accounts_for_the_whole_step(ckpt):
    import hetero_rt
    rt = hetero_rt.load(ckpt, dtype="float32", context=32)
    b = profile.replay(rt, [5, 6, 7, 8], [9, 10, 11])
    assert b["decode"]["steps"] == 2 and b["prefill"]["steps"] == 1
    for bd in b.values():
        assert sum(o["ms"] for o in bd["ops"]) == pytest.approx(bd["step_ms"], rel=1e-9)
    assert profile.replay(rt, [5, 6], [9])["decode"] is None
