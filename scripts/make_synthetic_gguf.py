#!/usr/bin/env python3
"""Write a DeepSeek-V2-Lite-shaped deepseek2 GGUF with random weights, quantized by llama.cpp (needs
the `llama` extra). Logic and the choice of shapes: hetero_rt.bench.synthetic_gguf.

    python scripts/make_synthetic_gguf.py out/v2lite-q4km.gguf [--experts 16] [--layers 27] [--type Q4_K_M]
"""
import argparse
import sys
from pathlib import Path

from hetero_rt.bench.synthetic_gguf import FTYPES, make


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--type", default="Q4_K_M", choices=sorted(FTYPES))
    p.add_argument("--threads", type=int, default=0, help="llama.cpp quantize threads (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-f16", action="store_true")
    ns = p.parse_args(argv)
    return make(ns.out, ns.layers, ns.experts, ns.type, ns.threads, ns.seed, ns.keep_f16)


if __name__ == "__main__":
    sys.exit(main())
