"""Heterogeneous execution benchmark: prefill/decode tokens/s for all experts on the CPU, static cache,
dynamic cache + prefetch at several cache sizes; hit rate beside Belady on the same recorded trace;
overlap achieved; cost model. Without --model, a synthetic checkpoint is written (default: the demo
preset). Logic: hetero_rt.bench.hetero."""
import argparse
import tempfile
from pathlib import Path

from hetero_rt.checkpoint.synthetic import ensure_demo_checkpoint, synthetic_config, write_synthetic_checkpoint
from hetero_rt.experts.hetero.cost_model import CostModel
from hetero_rt.bench.hetero import bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", help="checkpoint directory (default: the synthetic demo checkpoint)")
    p.add_argument("--tiny", action="store_true", help="use a small synthetic checkpoint instead of the demo")
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32], help="cache slots per layer")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cpu-gflops", type=float, default=100.0,
                   help="cost model: CPU expert throughput (docs/benchmarks.md measures ~60-120 here)")
    p.add_argument("--pcie-gbps", type=float, default=25.0, help="cost model: host->GPU bandwidth")
    p.add_argument("--json", default=None, help="also write every row as JSON (hetero_rt.bench.document)")
    p.add_argument("--probe-bytes", type=int, default=1 << 30, help="with --json: the read-bandwidth probe, in bytes")
    a = p.parse_args()
    model = a.model
    if model is None and a.tiny:
        model = write_synthetic_checkpoint(Path(tempfile.mkdtemp()) / "tiny", synthetic_config(
            "tiny", num_hidden_layers=4, n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4,
            hidden_size=256, moe_intermediate_size=128))
    cost = CostModel(pcie_gbps=a.pcie_gbps, cpu_gflops=a.cpu_gflops)
    print(bench(model or ensure_demo_checkpoint(), a.sizes, a.prompt_len, a.new_tokens, a.dtype, repeats=a.repeats,
                cost=cost, json_path=a.json, probe_bytes=a.probe_bytes))


if __name__ == "__main__":
    main()
