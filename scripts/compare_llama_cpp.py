#!/usr/bin/env python3
"""hetero_rt and llama.cpp (llama-cpp-python) side by side on the same GGUF, thread count and prompt:
prefill and decode tokens/s, decode GB/s against the read bandwidth measured in the run, peak RSS,
load time, and logit agreement. Logic: hetero_rt.bench.compare_llama.

    python scripts/compare_llama_cpp.py MODEL.gguf [--threads N] [--prompt-tokens 512] [--gen 32]
        [--rounds 3] [--rules RULES.yaml] [--dtype float32]
"""
import argparse
import sys

import psutil

from hetero_rt.bench.compare_llama import Options, compare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--agree-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of prefill + decode per engine, the engines taking turns (medians reported)")
    p.add_argument("--rules", default=None,
                   help="hetero_rt placement (default: none, the default placement: on the CPU every weight in "
                        "its stored ggml type, like llama.cpp)")
    p.add_argument("--dtype", default="float32", help="hetero_rt's dtype for the dequantized dense part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-llama-extra-bufts", dest="llama_extra_bufts", action="store_false",
                   help="load llama.cpp without its extra CPU buffer types (AMX / repacked weights): a "
                        "workaround for builds that crash in them; slows llama.cpp, so say so when used")
    p.add_argument("--json", default=None, help="also write both engines' rows as JSON (hetero_rt.bench.document)")
    p.add_argument("--probe-bytes", type=int, default=1 << 30, help="the read-bandwidth probe, in bytes")
    return compare(Options(**vars(p.parse_args(argv))))


if __name__ == "__main__":
    sys.exit(main())
