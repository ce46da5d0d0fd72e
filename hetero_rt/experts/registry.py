"""Every routed-experts backend, declared once: its name, where its weights live, which placement
options it takes, which weight formats it runs as stored, and how one layer of it is built.

The YAML schema, the plan, the memory planner, the rules writer and both checkpoint loaders ask this
table; no other module spells a backend's name. To add a backend: write it in this package, give it
a `build(weights, placement, builder)` function (experts.build) and add one Backend here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import HeteroRTError
from ..quant.ggml import FORMATS
from . import hetero, numba_backend, torch_backend


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    cpu_only: bool                     # weights in host memory, whatever device the rules name
    options: tuple[str, ...]           # placement keys it takes beyond device, dtype and threads
    stored_formats: tuple[str, ...]    # formats (quant.ggml names) it runs in place; others arrive in the dtype
    gpu_cache: bool                    # keeps an expert cache (and accumulators) on the main device
    build: Callable                    # build(ExpertWeights, placement, ExpertsBuilder) -> nn.Module

    def runs_stored(self, fmt: str | None) -> bool:
        return fmt is not None and fmt in self.stored_formats


_KERNEL_FORMATS = tuple(FORMATS)       # every format the numba kernels read

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("torch", "stacked torch tensors on the placement device (the reference)", cpu_only=False,
            options=(), stored_formats=(), gpu_cache=False, build=torch_backend.build),
    Backend("numba", "numba CPU kernels over the stored bytes, weights read in place", cpu_only=True,
            options=("activations",), stored_formats=_KERNEL_FORMATS, gpu_cache=False, build=numba_backend.build),
    Backend("hetero", "numba CPU kernels plus a GPU expert cache, overlapped with the shared experts",
            cpu_only=True, options=("activations", "hetero"), stored_formats=_KERNEL_FORMATS, gpu_cache=True,
            build=hetero.build),
)}
DEFAULT = "torch"           # routed experts with no backend in the rules
CPU_DEFAULT = "numba"       # what the rules writer puts on routed experts it places on the CPU


def get(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise HeteroRTError(f"unknown routed-experts backend {name!r}; expected one of {', '.join(BACKENDS)}") \
            from None


def names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def cpu_only() -> tuple[str, ...]:
    return tuple(n for n, b in BACKENDS.items() if b.cpu_only)


def with_option(option: str) -> tuple[str, ...]:
    return tuple(n for n, b in BACKENDS.items() if option in b.options)


def without_settings() -> tuple[str, ...]:
    """Backends that need no settings of their own (what `plan --write-rules` offers)."""
    return tuple(n for n, b in BACKENDS.items() if not b.gpu_cache)
