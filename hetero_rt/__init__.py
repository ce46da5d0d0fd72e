"""hetero_rt: run DeepSeek-family Mixture-of-Experts models on one GPU plus host RAM.

    rt = hetero_rt.load("path/to/checkpoint")
    rt.logits([0, 5, 7])                      # numpy float32 (T, vocab)
    rt.generate("Hello", max_new_tokens=32)   # GenerationResult with .text and timings
"""
from .api import load
from .config import ModelArgs
from .errors import CheckpointError, ConfigError, ContextOverflowError, HeteroRTError, InputError
from .runtime.engine import Runtime

__all__ = ["load", "Runtime", "ModelArgs", "HeteroRTError", "ConfigError", "CheckpointError",
           "ContextOverflowError", "InputError"]
__version__ = "0.1.0"
