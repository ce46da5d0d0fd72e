"""Per-layer choice, for long prompts, between computing the missed routed experts on the CPU and
streaming them to the GPU (docs/hetero.md explains the model and its crossover).

For one MoE layer call, let n_e be the tokens routed to expert e among the experts the GPU cache
does not hold, F = 6 I D the flops of one token through one expert (three I x D matmuls), B_h the
bytes of one expert as stored in host memory and B_g its bytes in the GPU's dtype:

  CPU   : t_cpu    = sum_e max(B_h / cpu_bw, n_e F / cpu_flops)       (each expert read once, roofline)
  stream: t_stream = max(sum_e B_g / pcie_bw, sum_e n_e F / gpu_flops) (copies pipelined with compute)

and stream when t_stream < t_cpu. With every expert hit by n tokens, streaming wins once
n > B_g cpu_flops / (F pcie_bw) (for bf16: n > cpu_flops / (pcie_bw * 1 flop/byte)): at 25 GB/s of
PCIe and 1 TFLOP/s of CPU, about 40 tokens per expert. Decode (n = 1) always stays on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostModel:
    pcie_gbps: float = 25.0      # effective host -> GPU bytes/s incl. staging, in GB/s
    cpu_gbps: float = 100.0      # DRAM read bandwidth available to the expert kernels
    cpu_gflops: float = 1000.0   # CPU expert-kernel throughput in prefill
    gpu_tflops: float = 100.0    # GPU matmul throughput in the cache dtype

    def cpu_seconds(self, counts: np.ndarray, host_bytes: int, flops: int) -> float:
        """counts: tokens per expert (only the experts the CPU would run)."""
        n = counts[counts > 0]
        return float(np.maximum(host_bytes / (self.cpu_gbps * 1e9), n * flops / (self.cpu_gflops * 1e9)).sum())

    def stream_seconds(self, counts: np.ndarray, gpu_bytes: int, flops: int) -> float:
        n = counts[counts > 0]
        copy = len(n) * gpu_bytes / (self.pcie_gbps * 1e9)
        return max(copy, float(n.sum()) * flops / (self.gpu_tflops * 1e12))

    def choose(self, counts: np.ndarray, host_bytes: int, gpu_bytes: int, flops: int) -> tuple[str, float, float]:
        """-> ("cpu" | "stream", estimated CPU seconds, estimated streaming seconds)."""
        cpu = self.cpu_seconds(counts, host_bytes, flops)
        stream = self.stream_seconds(counts, gpu_bytes, flops)
        return ("stream" if stream < cpu else "cpu"), cpu, stream

    def crossover_tokens(self, host_bytes: int, gpu_bytes: int, flops: int) -> float:
        """Tokens per expert above which streaming one expert beats computing it on the CPU."""
        per_token_cpu = flops / (self.cpu_gflops * 1e9)
        copy = gpu_bytes / (self.pcie_gbps * 1e9)
        floor = host_bytes / (self.cpu_gbps * 1e9)
        return copy / per_token_cpu if copy > floor else 0.0
