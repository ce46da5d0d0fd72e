"""Benchmarks and references: `hetero-rt bench` (llama_bench, machine, profile), kernel and hetero benchmarks, the llama.cpp MoE reference, peak-RSS
measurement, routing recording. The runtime path never imports this package; scripts/ wrap it."""
