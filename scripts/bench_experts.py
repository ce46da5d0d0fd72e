"""Routed-expert kernel benchmark: numba backend per weight format vs memory read bandwidth, torch
fp32 matmul, the torch reference backend and llama.cpp (when llama_cpp is importable), measured in
one run. Logic: hetero_rt.bench.kernels."""
import argparse

from hetero_rt.bench import kernels as bench
from hetero_rt.quant.ggml import FORMATS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", nargs="+", default=list(bench.DEFAULT_SHAPES), choices=list(bench.SHAPES))
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 128, 512], help="1 = decode; more = prefill")
    p.add_argument("--threads", type=int, default=None, help="default: physical cores")
    p.add_argument("--no-llama", action="store_true", help="skip the llama.cpp rows")
    p.add_argument("--no-int8", action="store_true", help="skip the int8-activation decode rows")
    p.add_argument("--rounds", type=int, default=3, help="decode rows: medians over this many rounds")
    p.add_argument("--dot-rates", action="store_true",
                   help="only the per-core rates of the fused row dots (weights in L2, one thread)")
    p.add_argument("--json", default=None, help="also write every row as JSON (hetero_rt.bench.document)")
    p.add_argument("--min-bytes", type=int, default=bench.MIN_BYTES,
                   help="experts held in memory per format, in bytes (smaller only to test the harness)")
    p.add_argument("--probe-bytes", type=int, default=bench.PROBE_BYTES, help="read-bandwidth probe, in bytes")
    p.add_argument("--overhead", action="store_true",
                   help="only the first-call (compile) time and the wrapper's per-call overhead at decode")
    a = p.parse_args()
    if a.overhead:
        bench.wrapper_overhead()
        return
    if a.dot_rates:
        print(bench.dot_rates(a.formats))
        return
    print(bench.run(a.shapes, a.formats, a.tokens, a.threads, llama=not a.no_llama, int8=not a.no_int8,
                    rounds=a.rounds, json_path=a.json, min_bytes=a.min_bytes, probe_bytes=a.probe_bytes))


if __name__ == "__main__":
    main()
