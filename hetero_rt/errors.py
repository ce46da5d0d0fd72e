"""Exceptions raised for bad input. Every message names the file, key or tensor at fault
and says what was expected, so a user can fix the input without reading our code."""


class HeteroRTError(Exception):
    """Base class of every error hetero_rt raises on purpose."""


class ConfigError(HeteroRTError, ValueError):
    """config.json (or GGUF metadata) is missing a field, has a wrong value, or contradicts itself."""


class CheckpointError(HeteroRTError, ValueError):
    """A weight file is missing, truncated, corrupt, or holds a tensor of the wrong name/shape/dtype."""


class ContextOverflowError(HeteroRTError, ValueError):
    """A request needs more positions than the preallocated latent KV cache holds."""


class InputError(HeteroRTError, ValueError):
    """A prompt or token ids that cannot be run (empty, id out of the vocabulary, ...)."""


class MemoryBudgetError(HeteroRTError):
    """The placement needs more memory on a device than the machine has (checked before loading)."""
