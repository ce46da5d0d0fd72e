"""Routed-expert kernel benchmark: numba backend per weight format vs memory read bandwidth, torch
fp32 matmul and the torch reference backend, measured in one run. Logic: hetero_rt.kernels.bench."""
import argparse

from hetero_rt.kernels import bench
from hetero_rt.quant.ggml import FORMATS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", nargs="+", default=list(bench.SHAPES), choices=list(bench.SHAPES))
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 128, 512], help="1 = decode; more = prefill")
    p.add_argument("--experts-v3", type=int, default=16, help="experts in memory for the V3 shape")
    p.add_argument("--experts-v2-lite", type=int, default=64, help="experts in memory for the V2-Lite shape")
    p.add_argument("--threads", type=int, default=None, help="default: physical cores")
    a = p.parse_args()
    print(bench.run(a.shapes, a.formats, a.tokens, {"v3": a.experts_v3, "v2-lite": a.experts_v2_lite}, a.threads))


if __name__ == "__main__":
    main()
