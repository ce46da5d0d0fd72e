"""hetero_rt: run DeepSeek-family Mixture-of-Experts models on one GPU plus host RAM.

    rt = hetero_rt.load("path/to/checkpoint")
    rt.logits([0, 5, 7])                      # numpy float32 (T, vocab)
    rt.generate("Hello", max_new_tokens=32)   # GenerationResult with .text and timings
"""
import os

# torch and numba each bring an OpenMP thread pool; with the default (active) wait policy the idle
# pool spins while the other computes, and on a machine with few cores that made a decode step 4x
# slower (docs/benchmarks.md). Passive waiting fixes it. It only takes effect when hetero_rt is
# imported before torch (the CLI and scripts do); an explicit OMP_WAIT_POLICY is respected.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .api import load  # noqa: E402
from .config import ModelArgs  # noqa: E402
from .errors import CheckpointError, ConfigError, ContextOverflowError, HeteroRTError, InputError  # noqa: E402
from .runtime.engine import Runtime  # noqa: E402

__all__ = ["load", "Runtime", "ModelArgs", "HeteroRTError", "ConfigError", "CheckpointError",
           "ContextOverflowError", "InputError"]
__version__ = "0.1.0"
