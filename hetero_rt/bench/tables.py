"""Markdown tables from benchmark JSON documents (hetero_rt.bench.document), for docs/benchmarks.md
(scripts/bench_tables.py): per document a heading (which benchmark, which model), the machine in two
lines, and one table of its rows. Each benchmark has its default columns (COLUMNS); any row keys may
be asked for instead. Numbers are printed to 4 significant digits, lists (repetitions) as mean ± std
over n, missing values empty.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

from ..errors import HeteroRTError
from ..placement.sizes import fmt_bytes
from . import document

COLUMNS = {
    "hetero-rt bench": ("rules", "threads", "test", "mean_tokens_per_s", "std_tokens_per_s", "read_gb_per_s",
                        "bandwidth_percent"),
    "bench_experts": ("shape", "backend", "fmt", "tokens", "seconds", "gb_per_s", "gflop_per_s", "baseline",
                      "baseline_unit", "ratio", "vs_llama"),
    "bench_hetero": ("configuration", "prefill_tokens_per_s", "prefill_vs_cpu_only", "decode_tokens_per_s",
                     "decode_vs_cpu_only", "hit_rate", "belady_hit_rate", "dynamic_replay_hit_rate", "overlap"),
    "compare_llama_cpp": ("engine", "threads", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_gb_per_s",
                          "bandwidth_share", "peak_rss_bytes", "load_s"),
    "record_routing": ("slots", "belady_hit_rate", "layers"),
}


def columns_of(doc: dict, asked: Sequence[str] | None, where: str) -> list[str]:
    """The asked columns (each must be a key of some row), else the benchmark's own, else every key."""
    keys = list(dict.fromkeys(k for row in doc["rows"] for k in row))
    if asked:
        unknown = [c for c in asked if c not in keys]
        if unknown:
            raise HeteroRTError(f"{where}: no row has the column(s) {', '.join(unknown)}; its rows have: "
                                f"{', '.join(keys)}")
        return list(asked)
    own = [c for c in COLUMNS.get(doc["benchmark"], ()) if c in keys]
    return own or keys


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        if not value:
            return ""
        sd = statistics.stdev(value) if len(value) > 1 else 0.0
        return f"{statistics.fmean(value):.4g} ± {sd:.2g} (n={len(value)})"
    return str(value).replace("|", "\\|")


def machine_lines(m: dict) -> list[str]:
    cpu, bw, gpu = m["cpu"], m["read_bandwidth"], m.get("gpu")
    read = "not measured" if bw.get("gb_per_s") is None else f"{bw['gb_per_s']:.2f} GB/s ({bw['threads']} threads)"
    return [f"Machine: {cpu.get('name') or 'unknown CPU'} ({' '.join(cpu.get('flags') or []) or 'no SIMD flags'}); "
            f"{m['physical_cores']} physical / {m['logical_cores']} logical cores, RAM {fmt_bytes(m['ram_bytes'])}; "
            f"GPU: {'none' if not gpu else gpu['name']}.",
            f"Read bandwidth in the run: {read}. Versions: "
            + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()) + "."]


def render(doc: dict, columns: Sequence[str] | None = None, where: str = "document") -> str:
    cols = columns_of(doc, columns, where)
    model = Path(doc["model"]).name if doc["model"] else None
    out = [f"### {doc['benchmark']}" + (f": {model}" if model else ""), "", *machine_lines(doc["machine"]), "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell(row.get(c)) for c in cols) + " |" for row in doc["rows"]]
    return "\n".join(out)


def render_files(paths: Sequence[str | Path], columns: Sequence[str] | None = None) -> str:
    """Every file's table, in order, separated by a blank line (HeteroRTError names a bad file)."""
    if not paths:
        raise HeteroRTError("bench_tables: no JSON files given; pass the files written with --json")
    return "\n\n".join(render(document.read(p), columns, str(p)) for p in paths) + "\n"
