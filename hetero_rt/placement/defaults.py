"""The placement a user gets by passing only a checkpoint (no rules): the best this machine does
without tuning, derived from the checkpoint's kind and the device asked for.

- On the CPU, for a checkpoint whose weight formats the CPU kernels read in place (GGUF, block
  FP8): routed experts on the CPU backend over the memory map, the projections that can stay in
  their stored format kept in it (format: stored), the rest dequantized once, float32 activations
  between layers; the few-token matmuls of ggml block formats quantize their input to int8 per 32
  values (activations: int8, as llama.cpp does; measured 1.23x faster decode on the V2-Lite-shaped
  Q4_K_M file, docs/benchmarks.md), `activations: fp32` in rules keeps the exact path. This is what
  placement_rules/gguf-cpu-only.yaml writes out, and a test holds the two equal.
- Otherwise: every module on the device asked for ("cpu" by default), in the checkpoint's dtype.
"""
from __future__ import annotations

from ..config import ModelArgs
from ..experts import registry
from .plan import model_modules
from .schema import FORMAT_KINDS, Place, Rule, RuleSet

CPU_IN_PLACE_DTYPE = "float32"   # activations between the stored-format kernels
CPU_IN_PLACE_ACTIVATIONS = "int8"  # what the kernels' few-token dots quantize their input to


def default_rules(args: ModelArgs, device: str | None, in_place: bool, dtype: str | None = None) -> RuleSet:
    """device: where the model runs ("cpu" when None); in_place: the checkpoint stores formats the CPU
    kernels read in place; dtype: the caller's dtype (a placement dtype name), if any."""
    device = device or "cpu"
    if device != "cpu" or not in_place:
        return RuleSet(f"<device={device}>", Place(device=device, dtype=dtype))
    kinds = {m.kind for m in model_modules(args)}
    act = CPU_IN_PLACE_ACTIVATIONS
    rules = (Rule(None, "routed_experts", Place(backend=registry.CPU_DEFAULT, activations=act), 0),
             *(Rule(None, kind, Place(format="stored", activations=act), 0)
               for kind in FORMAT_KINDS["stored"] if kind in kinds))
    return RuleSet("<default: on the cpu, weights as stored>", Place(device="cpu", dtype=dtype or CPU_IN_PLACE_DTYPE),
                   rules)
