"""The benchmark scripts' --json (scripts/bench_experts.py, bench_hetero.py, compare_llama_cpp.py,
record_routing.py) on tiny inputs: the same top-level document as `hetero-rt bench --json` (schema,
benchmark, model, config, machine header, runs, flat rows), with each script's row keys; and
scripts/bench_tables.py renders any of them to markdown, refusing bad files with what and where.
The figures themselves are not judged (no timing thresholds)."""
import json
import runpy
import sys
from pathlib import Path

import pytest

from hetero_rt.bench import document, tables
from hetero_rt.errors import HeteroRTError

ROOT = Path(__file__).parent.parent
SCRIPTS = ROOT / "scripts"
PROBE = str(4 << 20)


def run_script(name, argv, monkeypatch):
    """Run scripts/NAME in this process, as `python scripts/NAME ARGV...`; returns its exit status."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / name), *map(str, argv)])
    try:
        runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    except SystemExit as e:
        return e.code or 0
    return 0


def check_shape(path, benchmark, row_keys):
    doc = json.loads(Path(path).read_text())
    assert list(doc) == list(document.KEYS)
    assert doc["schema"] == document.SCHEMA and doc["benchmark"] == benchmark
    m = doc["machine"]
    assert {"cpu", "physical_cores", "logical_cores", "ram_bytes", "read_bandwidth", "gpu", "os", "versions"} <= set(m)
    assert doc["rows"] and all(row_keys <= set(r) for r in doc["rows"]), (row_keys, doc["rows"][0])
    document.check(doc, str(path))                       # flat rows
    text = tables.render(doc)
    assert text.count("\n|") == len(doc["rows"]) + 2     # header, rule, one line per row
    return doc


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt",
                                      synthetic_config("tiny", num_hidden_layers=3), seed=0, dtype="float32")


def test_bench_experts_json(tmp_path, monkeypatch):
    out = tmp_path / "k.json"
    assert run_script("bench_experts.py", ["--shapes", "tiny", "--formats", "fp32", "q8_0", "--tokens", "1", "4",
                                           "--threads", "1", "--rounds", "1", "--no-llama", "--min-bytes", 1 << 20,
                                           "--probe-bytes", PROBE, "--json", out], monkeypatch) == 0
    doc = check_shape(out, "bench_experts", {"shape", "backend", "fmt", "tokens", "seconds", "gb_per_s",
                                             "gflop_per_s", "baseline", "ratio", "baseline_unit"})
    assert {(r["backend"], r["fmt"], r["tokens"]) for r in doc["rows"]} >= {
        ("numba", "fp32", 1), ("numba", "q8_0", 4), ("torch", "fp32", 1), ("torch", "fp32", 4)}
    assert doc["machine"]["read_bandwidth"]["gb_per_s"] > 0 and doc["config"]["min_bytes"] == 1 << 20


def test_bench_hetero_json(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "h.json"
    assert run_script("bench_hetero.py", ["--model", ckpt, "--sizes", "2", "--prompt-len", "8", "--new-tokens", "2",
                                          "--repeats", "1", "--dtype", "float32", "--probe-bytes", PROBE,
                                          "--json", out], monkeypatch) == 0
    doc = check_shape(out, "bench_hetero", {"configuration", "slots", "prefill_tokens_per_s", "decode_tokens_per_s",
                                            "belady_hit_rate"})
    rows = {r["configuration"]: r for r in doc["rows"]}
    assert rows["all experts on the CPU (numba)"]["decode_vs_cpu_only"] == 1.0
    cached = rows["dynamic cache 2 + prefetch"]
    assert 0 <= cached["hit_rate"] <= 1 and 0 <= cached["belady_hit_rate"] <= 1 and cached["calls"] > 0
    assert rows["scheduler, no cache"]["belady_hit_rate"] is None


def test_record_routing_json(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    assert run_script("record_routing.py", ["--model", ckpt, "--random", "2", "--prompt-len", "8", "--new-tokens", "3",
                                            "--profile", tmp_path / "p.json", "--json", out], monkeypatch) == 0
    doc = check_shape(out, "record_routing", {"slots", "belady_hit_rate"})
    assert [r["slots"] for r in doc["rows"]] == list(range(9))
    assert doc["rows"][0]["belady_hit_rate"] == 0.0 and doc["rows"][-1]["belady_hit_rate"] == 1.0
    assert doc["runs"][0]["calls"] == 2 * 3 and doc["runs"][0]["layers"] == [1, 2]   # prefill + 2 decode, x2
    assert doc["machine"]["read_bandwidth"]["gb_per_s"] is None
    with pytest.raises(HeteroRTError, match=r"--sizes 2 9: expected cache sizes in 0..8 .* 8 experts per layer"):
        run_script("record_routing.py", ["--model", ckpt, "--random", "1", "--profile", tmp_path / "p.json",
                                         "--json", out, "--sizes", "2", "9"], monkeypatch)


@pytest.mark.slow   # its hetero_rt worker warms up every kernel in a fresh process (minutes on a cold numba cache)
def test_compare_llama_cpp_json(tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from gguf_models import make_gguf
    _, path, _ = make_gguf("v3", tmp_path, "F32", tokenizer=True, vocab_size=512)   # llama.cpp needs a vocab
    out = tmp_path / "c.json"
    rc = run_script("compare_llama_cpp.py", [path, "--threads", "1", "--prompt-tokens", "8", "--gen", "2",
                                             "--rounds", "2", "--agree-tokens", "4", "--probe-bytes", PROBE,
                                             "--json", out],
                    monkeypatch)
    assert rc == 0
    doc = check_shape(out, "compare_llama_cpp", {"engine", "prefill_tokens_per_s", "decode_tokens_per_s",
                                                 "peak_rss_bytes", "bandwidth_share"})
    assert [r["engine"] for r in doc["rows"]] == ["hetero_rt", "llama.cpp"]
    assert 0 <= doc["runs"][0]["top1_agreement"] <= 1 and doc["config"]["threads"] == 1
    rounds = doc["runs"][0]["rounds"]   # interleaved rounds, both engines, each timed
    assert [len(rounds[e]) for e in ("hetero_rt", "llama.cpp")] == [2, 2]
    assert all(r["prefill_s"] > 0 and r["decode_s"] > 0 for e in rounds.values() for r in e)
    assert doc["runs"][0]["decode_ratio"] > 0


def test_bench_tables_renders_files_and_refuses_bad_ones(tmp_path, monkeypatch, capsys):
    machine = {"cpu": {"name": "X", "flags": []}, "physical_cores": 1, "logical_cores": 2, "ram_bytes": 1 << 30,
               "read_bandwidth": {"gb_per_s": None, "threads": 1}, "gpu": None, "versions": {}}
    good = tmp_path / "good.json"
    document.write(document.document("record_routing", "m", {}, machine,
                                     [{"slots": 1, "belady_hit_rate": 0.5, "layers": 2, "seconds": [1.0, 3.0]}]), good)
    md = tmp_path / "t.md"
    assert run_script("bench_tables.py", [good, "-o", md], monkeypatch) == 0
    assert "| slots | belady_hit_rate | layers |\n|---|---|---|\n| 1 | 0.5 | 2 |" in md.read_text()
    assert tables.render(document.read(good), ["seconds"]).endswith("| 2 ± 1.4 (n=2) |")
    bad = tmp_path / "bad.json"
    for content, message in [("[]", "expected a JSON object with \"schema\""),
                             (json.dumps({"schema": document.SCHEMA}), "lacks benchmark"),
                             ("{", "not a benchmark JSON file")]:
        bad.write_text(content)
        assert run_script("bench_tables.py", [good, bad], monkeypatch) == 2
        err = capsys.readouterr().err
        assert str(bad) in err and message in err
    with pytest.raises(HeteroRTError, match="no row has the column"):
        tables.render(document.read(good), ["nope"])
    nested = document.document("x", None, {}, machine, [{"a": {"b": 1}}])
    with pytest.raises(HeteroRTError, match="row 0, 'a'.*nested data belongs in \"runs\""):
        document.write(nested, tmp_path / "n.json")
