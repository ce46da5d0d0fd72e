"""Peak RSS of loading a checkpoint vs its size (the "no second copy in RAM" rule).

    python scripts/measure_load_rss.py --size-gb 1.0 --dir /tmp/rss_ckpt [--rules placement_rules/cpu-only.yaml]

Writes a synthetic DeepSeek-V3-architecture bf16 checkpoint of at least --size-gb GiB into --dir unless
it already holds one, then in fresh processes (1) reads every tensor through the safetensors reader and
(2) runs hetero_rt.load() plus one forward, and prints checkpoint size, peak RSS and their ratio.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from hetero_rt.bench.rss import measure_load_peak_rss, measure_model_load_peak_rss, write_sized_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0, help="minimum size of the synthetic checkpoint in GiB")
    p.add_argument("--dir", type=Path, required=True, help="checkpoint directory (written if it has no *.safetensors)")
    p.add_argument("--rules", type=Path, default=None, help="placement rules for the whole-model load")
    a = p.parse_args()
    if not any(a.dir.glob("*.safetensors")):
        write_sized_checkpoint(a.dir, int(a.size_gb * (1 << 30)))
    print("reader, every tensor:      ", measure_load_peak_rss(a.dir).report())
    print("hetero_rt.load + forward:  ", measure_model_load_peak_rss(a.dir, a.rules).report())


if __name__ == "__main__":
    main()
