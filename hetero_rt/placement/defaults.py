"""The placement a user gets by passing only a checkpoint (no rules): the best this machine does
without tuning, derived from the checkpoint's kind and the device asked for.

- On the CPU, for a checkpoint whose weight formats the CPU kernels read in place (GGUF): routed
  experts on the CPU backend over the memory map, the projections that can stay in their stored
  format kept in it (format: stored), the rest dequantized once, float32 activations (the stored
  formats are multiplied in fp32). This is what placement_rules/gguf-cpu-only.yaml writes out, and
  a test holds the two equal.
- Otherwise: every module on the device asked for ("cpu" by default), in the checkpoint's dtype.
"""
from __future__ import annotations

from ..config import ModelArgs
from ..experts import registry
from .plan import model_modules
from .schema import FORMAT_KINDS, Place, Rule, RuleSet

CPU_IN_PLACE_DTYPE = "float32"   # activations of the stored-format kernels


def default_rules(args: ModelArgs, device: str | None, in_place: bool, dtype: str | None = None) -> RuleSet:
    """device: where the model runs ("cpu" when None); in_place: the checkpoint stores formats the CPU
    kernels read in place; dtype: the caller's dtype (a placement dtype name), if any."""
    device = device or "cpu"
    if device != "cpu" or not in_place:
        return RuleSet(f"<device={device}>", Place(device=device, dtype=dtype))
    kinds = {m.kind for m in model_modules(args)}
    rules = (Rule(None, "routed_experts", Place(backend=registry.CPU_DEFAULT), 0),
             *(Rule(None, kind, Place(format="stored"), 0) for kind in FORMAT_KINDS["stored"] if kind in kinds))
    return RuleSet("<default: on the cpu, weights as stored>", Place(device="cpu", dtype=dtype or CPU_IN_PLACE_DTYPE),
                   rules)
