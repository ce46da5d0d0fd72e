"""Peak RSS of loading a safetensors checkpoint vs its size (the "no second copy in RAM" rule).

    python scripts/measure_load_rss.py --size-gb 1.0 --dir /tmp/rss_ckpt

Writes a synthetic bf16 checkpoint of --size-gb GiB into --dir unless it already holds one,
then loads it in a fresh process and prints checkpoint size, peak RSS and their ratio.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from hetero_rt.checkpoint.rss import measure_load_peak_rss, write_synthetic_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0, help="size of the synthetic checkpoint in GiB")
    p.add_argument("--dir", type=Path, required=True, help="checkpoint directory (written if it has no *.safetensors)")
    a = p.parse_args()
    if not any(a.dir.glob("*.safetensors")):
        write_synthetic_checkpoint(a.dir, int(a.size_gb * (1 << 30)))
    print(measure_load_peak_rss(a.dir).report())


if __name__ == "__main__":
    main()
