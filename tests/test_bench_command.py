"""`hetero-rt bench` (hetero_rt.bench.llama_bench) on a tiny synthetic checkpoint: the JSON has one row per
rules file x thread count x test with every repetition, tokens/s are tokens / seconds of each repetition, the
per-op breakdown covers a MoE layer's attention, gate and routed experts within the step total, the CSV
matches the JSON, the profiling hooks are gone afterwards, bad arguments exit 2. No timing thresholds."""
import csv
import json

import pytest
import torch

from hetero_rt import cli
from hetero_rt.bench import profile
from hetero_rt.model import layers, transformer

RULES = "placement_rules/cpu-only.yaml"
NAMED_SHARE = 0.5     # at least this share of a profiled step is in the named ops (measured: ~0.85-0.9)
PROFILED_FACTOR = 10  # a profiled decode step is at most this many times the unprofiled one (measured: ~1.3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", synthetic_config("tiny"), seed=0,
                                      dtype="float32")


@pytest.fixture(scope="module")
def result(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--model", str(ckpt), "-p", "16", "-n", "4", "-t", "1,2", "--repetitions", "2",
            "--bandwidth-probe", "16MiB", "--json", str(out / "b.json"), "--csv", str(out / "b.csv"),
            "--trace", str(out / "trace.json"), "--plot", str(out / "bench.png")]
    return cli.main(argv), json.loads((out / "b.json").read_text()), out / "b.csv"


def test_exit_code_and_rows(result):
    rc, doc, _ = result
    assert rc == 0
    assert [(r["rules"], r["threads"], r["test"]) for r in doc["rows"]] == [
        ("default", 1, "pp16"), ("default", 1, "tg4"), ("default", 2, "pp16"), ("default", 2, "tg4")]
    for r in doc["rows"]:
        assert len(r["seconds"]) == len(r["tokens_per_s"]) == 2
        assert all(v > 0 for v in r["tokens_per_s"])
        assert r["tokens_per_s"] == [r["tokens"] / s for s in r["seconds"]]
        assert r["mean_tokens_per_s"] == pytest.approx(sum(r["tokens_per_s"]) / 2)
    assert all(r["bandwidth_percent"] > 0 for r in doc["rows"] if r["kind"] == "tg")


def test_machine_and_bytes(result):
    _, doc, _ = result
    m = doc["machine"]
    assert m["read_bandwidth"]["gb_per_s"] > 0 and m["logical_cores"] >= 1 and m["ram_bytes"] > 0
    assert set(m["versions"]) == {"hetero_rt", "torch", "numba", "python"}
    (run,) = doc["runs"]
    b = run["decode_bytes"]
    # tiny: 1 MoE layer, 8 experts of 3 x 32 x 64 fp32 weights, 2 active per token
    assert b["routed_experts_active"] == 2 * 3 * 32 * 64 * 4
    assert b["total"] == b["routed_experts_active"] + b["dense"] and b["dense"] > 0
    assert run["memory"]["peak_rss_bytes"] > 0


@pytest.mark.parametrize("which", ["decode", "prefill"])
def test_breakdown(result, which):
    _, doc, _ = result
    bd = doc["runs"][0]["breakdown"][which]
    ops = {o["op"]: o for o in bd["ops"]}
    assert list(ops) == list(profile.OPS) + [profile.OTHER]
    named = sum(o["ms"] for name, o in ops.items() if name != profile.OTHER)
    assert named <= bd["step_ms"] + 1e-9
    # the accounting: the named ops and "everything else" are the profiled step, to rounding
    assert sum(o["ms"] for o in ops.values()) == pytest.approx(bd["step_ms"], rel=1e-9)
    assert sum(o["percent"] for o in ops.values()) == pytest.approx(100, rel=1e-9)
    # the named ops are most of it: "everything else" (Python between the hooks) is not the step
    assert named >= NAMED_SHARE * bd["step_ms"]
    for op in ("attention (MLA)", "gate", "routed experts"):
        assert ops[op]["layers"]["1"] > 0                       # layer 1 is the tiny model's MoE layer
    assert ops["dense MLP"]["layers"]["0"] > 0 and "0" not in ops["gate"]["layers"]


def test_profiled_step_is_comparable_to_the_timed_step(result):
    """The profiled decode step (hooks synchronize around every op) against the unprofiled tg steps of
    the same run: within PROFILED_FACTOR either way (a loose bound: the two are measured apart in
    time, on a machine others may share; what it catches is a breakdown of some other step)."""
    _, doc, _ = result
    step_s = doc["runs"][0]["breakdown"]["decode"]["step_ms"] / 1e3
    threads = doc["runs"][0]["breakdown"]["threads"]
    (tg,) = [r for r in doc["rows"] if r["kind"] == "tg" and r["threads"] == threads]
    timed_s = min(tg["seconds"]) / tg["tokens"]
    assert timed_s / PROFILED_FACTOR <= step_s <= timed_s * PROFILED_FACTOR, (step_s, timed_s)


def test_csv_matches_json(result):
    _, doc, path = result
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["rows"])
    for c, j in zip(rows, doc["rows"]):
        assert (int(c["run"]), c["rules"], int(c["threads"]), c["test"], int(c["repetitions"])) == \
            (j["run"], j["rules"], j["threads"], j["test"], len(j["seconds"]))
        assert [float(v) for v in c["tokens_per_s"].split(";")] == j["tokens_per_s"]
        assert [float(v) for v in c["seconds"].split(";")] == j["seconds"]
        assert float(c["mean_tokens_per_s"]) == j["mean_tokens_per_s"]


def test_several_rules_files(ckpt, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--model", str(ckpt), "-p", "8", "-n", "2", "-t", "1", "-r", "1", "--cpu-fallback",
                     "--bandwidth-probe", "16MiB", "--rules", RULES, "--rules", "all-gpu", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [(r["run"], r["rules"], r["test"]) for r in doc["rows"]] == [
        (0, "cpu-only.yaml", "pp8"), (0, "cpu-only.yaml", "tg2"), (1, "all-gpu", "pp8"), (1, "all-gpu", "tg2")]
    assert [run["rules"] for run in doc["runs"]] == ["cpu-only.yaml", "all-gpu"]
    text = capsys.readouterr().out
    assert "| ckpt | cpu-only.yaml | 1 | pp8 |" in text and "| ckpt | all-gpu | 1 | tg2 |" in text
    assert text.count("decode reads") == 2 and text.count("everything else") == 4


def test_hooks_removed(ckpt):
    import hetero_rt
    rt = hetero_rt.load(ckpt, dtype="float32", context=32)
    with profile.op_timers(rt.model, rt.device) as times:
        rt.step(torch.tensor([1, 2, 3]), 0, last_only=True)
    assert times.seconds
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in rt.model.modules())
    assert transformer.embedding is layers.embedding and transformer.linear is layers.linear


@pytest.mark.parametrize("bad", [["-t", "0"], ["-t", "x"], ["-t", "1,"], ["--repetitions", "0"], ["-p", "-1"]])
def test_bad_arguments_exit_2(ckpt, capsys, bad):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--model", str(ckpt)] + bad)
    assert e.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_trace_holds_every_profiled_op_and_step(result):
    """--trace: Chrome trace events of the profiled prefill and decode steps, one process each; every
    op per layer, and its durations add up to the breakdown's figure for that op."""
    _, doc, csv_path = result
    trace = json.loads((csv_path.parent / "trace.json").read_text())
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert sorted(names.values()) == ["default: decode", "default: prefill"]
    decode = next(pid for pid, n in names.items() if n.endswith("decode"))
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == decode]
    steps = doc["runs"][0]["breakdown"]["decode"]["steps"]
    assert sum(e["name"].startswith("decode step") for e in spans) == steps
    attn = [e for e in spans if e["cat"] == "attention (MLA)"]
    op = next(o for o in doc["runs"][0]["breakdown"]["decode"]["ops"] if o["op"] == "attention (MLA)")
    assert {e["args"]["layer"] for e in attn} == {int(k) for k in op["layers"]} and len(op["layers"]) > 1
    assert sum(e["dur"] for e in attn) / 1e3 / steps == pytest.approx(op["ms"], rel=1e-6)
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert "events" not in doc["runs"][0]["breakdown"]["decode"]         # the JSON document stays small


def test_plot_writes_a_png_of_both_charts(result):
    _, doc, csv_path = result
    png = (csv_path.parent / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.image
    h, w = matplotlib.image.imread(csv_path.parent / "bench.png").shape[:2]
    assert w > 2 * h * 0.9                       # two charts side by side
