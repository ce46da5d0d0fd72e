"""Write a synthetic DeepSeek-V3-architecture checkpoint in the Hugging Face format.

    python scripts/make_synthetic_checkpoint.py --out /tmp/ckpt --preset demo --dtype bfloat16   # 527 MB
    python scripts/make_synthetic_checkpoint.py --out /tmp/big --preset demo --layers 10 --experts 128 --shard-mb 512
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
    p.add_argument("--shard-mb", type=int, default=None,
                   help="shard size in MiB (model-0000K-of-0000N + index); default: one model.safetensors "
                        "unless the model exceeds 256 MiB")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--experts", type=int, default=None, help="override n_routed_experts")
    a = p.parse_args()
    overrides = {k: v for k, v in (("num_hidden_layers", a.layers), ("n_routed_experts", a.experts)) if v}
    config = synthetic_config(a.preset, **overrides)
    params, nbytes = checkpoint_size(config, a.dtype)
    print(f"{a.preset} ({a.dtype}): {params:,} parameters, {nbytes:,} bytes ({nbytes / 2 ** 20:.1f} MiB)")
    path = write_synthetic_checkpoint(a.out, config, seed=a.seed, dtype=a.dtype,
                                      shard_bytes=a.shard_mb << 20 if a.shard_mb else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
