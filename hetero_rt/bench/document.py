"""The one JSON shape every benchmark writes (`hetero-rt bench --json`, scripts/bench_experts.py,
bench_hetero.py, compare_llama_cpp.py, record_routing.py with --json), which scripts/bench_tables.py
renders into the markdown tables of docs/benchmarks.md:

  {"schema": SCHEMA, "benchmark": which one wrote it, "model": path or null, "config": its options,
   "machine": bench.machine.machine() (CPU, cores, RAM, read bandwidth, GPU, versions),
   "runs": [per configuration or model load: what the rows share], "rows": [one flat dict per figure]}

A row's values are numbers, strings, booleans, null or lists of numbers (repetitions); what the rows
of one benchmark share (a placement, a breakdown) lives in "runs", and a row's "run" indexes it.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import HeteroRTError

SCHEMA = "hetero_rt.bench/1"
KEYS = ("schema", "benchmark", "model", "config", "machine", "runs", "rows")


def document(benchmark: str, model, config: dict, machine: dict, rows: list[dict], runs: list[dict] = ()) -> dict:
    return {"schema": SCHEMA, "benchmark": benchmark, "model": None if model is None else str(model),
            "config": config, "machine": machine, "runs": list(runs), "rows": rows}


def write(doc: dict, path: str | Path) -> None:
    check(doc, str(path))
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def read(path: str | Path) -> dict:
    """A benchmark JSON file, checked (HeteroRTError naming the file and what is wrong)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HeteroRTError(f"{path}: not a benchmark JSON file ({e}); write one with --json") from None
    return check(doc, str(path))


def check(doc, where: str) -> dict:
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise HeteroRTError(f"{where}: expected a JSON object with \"schema\": {SCHEMA!r} (written by a benchmark's "
                            f"--json); got {type(doc).__name__}" + (f" with schema {doc.get('schema')!r}"
                                                                   if isinstance(doc, dict) else ""))
    missing = [k for k in KEYS if k not in doc]
    if missing:
        raise HeteroRTError(f"{where}: the benchmark document lacks {', '.join(missing)}; write it again with --json")
    if not isinstance(doc["rows"], list) or not all(isinstance(r, dict) for r in doc["rows"]):
        raise HeteroRTError(f"{where}: \"rows\" must be a list of objects (one per figure)")
    if not isinstance(doc["machine"], dict) or "read_bandwidth" not in doc["machine"]:
        raise HeteroRTError(f"{where}: \"machine\" must be the machine header of hetero_rt.bench.machine")
    for i, row in enumerate(doc["rows"]):
        for key, value in row.items():
            if not _flat(value):
                raise HeteroRTError(f"{where}: row {i}, {key!r}: expected a number, string, boolean, null or a list "
                                    f"of numbers; got {type(value).__name__} (nested data belongs in \"runs\")")
    return doc


def _flat(v) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
