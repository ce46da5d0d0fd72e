"""Write a synthetic DeepSeek-V3-architecture checkpoint in the Hugging Face format.

    python scripts/make_synthetic_checkpoint.py --out /tmp/ckpt --preset demo --dtype bfloat16   # 527 MB
    python scripts/make_synthetic_checkpoint.py --out /tmp/big --preset demo --layers 10 --experts 128  # 2.4 GB
"""
from __future__ import annotations

import argparse
from pathlib import Path

from hetero_rt.checkpoint.synthetic import checkpoint_size, synthetic_config, write_synthetic_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="demo", choices=["demo", "tiny"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "fp8"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-mb", type=int, default=256,
                   help="largest shard in MiB; a bigger model is written as model-0000K-of-0000N + index "
                        "(0: always one model.safetensors)")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--experts", type=int, default=None, help="override n_routed_experts")
    p.add_argument("--hidden", type=int, default=None, help="override hidden_size")
    a = p.parse_args()
    overrides = {k: v for k, v in (("num_hidden_layers", a.layers), ("n_routed_experts", a.experts),
                                   ("hidden_size", a.hidden)) if v is not None}
    config = synthetic_config(a.preset, **overrides)
    params, nbytes = checkpoint_size(config, a.dtype)
    path = write_synthetic_checkpoint(a.out, config, seed=a.seed, dtype=a.dtype, shard_bytes=(a.shard_mb << 20) or None)
    print(f"{path}: {a.preset} ({a.dtype}), {params:,} parameters, {nbytes:,} bytes of tensor data "
          f"({nbytes / 2 ** 20:.1f} MiB)")


if __name__ == "__main__":
    main()
