"""Markdown tables for docs/benchmarks.md from the JSON documents the benchmarks write with --json
(hetero-rt bench, scripts/bench_experts.py, bench_hetero.py, compare_llama_cpp.py, record_routing.py):
one table per file, with its machine. Logic: hetero_rt.bench.tables.

    python scripts/bench_tables.py RUN1.json [RUN2.json ...] [--columns a,b,c] [-o TABLES.md]
"""
import argparse
import sys
from pathlib import Path

from hetero_rt.bench.tables import render_files
from hetero_rt.errors import HeteroRTError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="benchmark JSON files (written with --json)")
    p.add_argument("--columns", default=None, help="comma-separated row keys (default: each benchmark's own)")
    p.add_argument("-o", "--output", default=None, help="write the markdown here (default: stdout)")
    a = p.parse_args(argv)
    try:
        text = render_files(a.files, a.columns.split(",") if a.columns else None)
    except HeteroRTError as e:
        print(f"bench_tables: error: {e}", file=sys.stderr)
        return 2
    if a.output:
        Path(a.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
