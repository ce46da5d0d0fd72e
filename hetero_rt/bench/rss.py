"""Measure the peak resident memory of loading a safetensors checkpoint, to check the memory rule:
loading never holds a second copy of the checkpoint in RAM (peak RSS ~ 1x checkpoint + interpreter).

The measurement runs in a fresh Python process (peak RSS is a per-process high-water mark), which
opens the checkpoint, load()s every tensor in its stored dtype, keeps them all alive and reads every
byte (so every page is faulted in), then reports its peak RSS: VmHWM from /proc/self/status on Linux.
Not getrusage().ru_maxrss: Linux carries the parent's high-water mark into ru_maxrss across
fork/exec, so a child of a process that had just written a 1 GiB checkpoint would report the
parent's peak, not its own.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.names import hf_tensor_shapes
from ..checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
from ..config import ModelArgs


# Run in the child process. argv[1]: checkpoint directory. Prints one JSON line.
_CHILD = r"""
import json, resource, sys
import torch
from hetero_rt.checkpoint.safetensors import DTYPES, SafetensorsCheckpoint

def peak_rss():
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except OSError:  # not Linux: ru_maxrss (bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

baseline = peak_rss()
ckpt = SafetensorsCheckpoint(sys.argv[1])
tensors = [ckpt.load(n, ckpt.info(n).shape, DTYPES[ckpt.info(n).dtype]) for n in ckpt.names()]
total, chunk = 0.0, 1 << 20
for t in tensors:
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        total += flat[i:i + chunk].float().sum().item()
peak = peak_rss()
print(json.dumps({"checkpoint_bytes": ckpt.total_bytes(), "peak_rss_bytes": peak,
                  "baseline_rss_bytes": baseline, "checksum": total}))
"""


# Run in the child process: hetero_rt.load() of a whole model plus one forward. argv[1]: checkpoint
# (directory or GGUF), argv[2]: placement rules or "" (the default placement).
_CHILD_MODEL = _CHILD[:_CHILD.index("baseline = ")] + r"""
import hetero_rt
from hetero_rt.checkpoint.source import open_source

def anon_rss():  # resident anonymous memory: what the process allocated, not pages of mapped files
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0

baseline, baseline_anon = peak_rss(), anon_rss()
rt = hetero_rt.load(sys.argv[1], sys.argv[2] or None, cpu_fallback=True)
rt.logits([1, 2, 3, 4])
print(json.dumps({"checkpoint_bytes": open_source(sys.argv[1]).ckpt.total_bytes(),
                  "peak_rss_bytes": peak_rss(), "baseline_rss_bytes": baseline,
                  "anon_rss_bytes": anon_rss(), "baseline_anon_bytes": baseline_anon}))
"""


@dataclass(frozen=True)
class LoadRSS:
    checkpoint_bytes: int       # tensor data in the checkpoint
    peak_rss_bytes: int         # high-water RSS of the loading process
    baseline_rss_bytes: int     # RSS after importing torch and hetero_rt, before opening
    anon_rss_bytes: int = 0     # model children: anonymous RSS at the end (allocations, not file pages)
    baseline_anon_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.peak_rss_bytes / self.checkpoint_bytes

    def report(self) -> str:
        gib = 1 << 30
        extra = (self.peak_rss_bytes - self.baseline_rss_bytes) / self.checkpoint_bytes
        return (f"checkpoint {self.checkpoint_bytes} B ({self.checkpoint_bytes / gib:.3f} GiB), "
                f"peak RSS {self.peak_rss_bytes} B ({self.peak_rss_bytes / gib:.3f} GiB), "
                f"ratio {self.ratio:.3f}; baseline {self.baseline_rss_bytes / gib:.3f} GiB, "
                f"(peak - baseline) / checkpoint = {extra:.3f}")


def measure_load_peak_rss(directory: str | Path) -> LoadRSS:
    """Load every tensor of the checkpoint in a fresh process and return its peak RSS."""
    return _run_child(_CHILD, [str(directory)], directory)


def measure_model_load_peak_rss(directory: str | Path, rules: str | Path | None = None) -> LoadRSS:
    """hetero_rt.load() the model (a checkpoint directory or a GGUF; with `rules`, CPU fallback, or
    the default placement) and run one forward in a fresh process; return its peak RSS."""
    return _run_child(_CHILD_MODEL, [str(directory), str(rules or "")], directory)


def rss_growth(small, big, rules=None) -> tuple[float, str]:
    """(peak RSS growth above the import baseline from `small` to `big`, over their checkpoints' growth;
    both reports): the fixed costs (interpreter, compiled kernels, allocator) cancel, what is left is
    what the placement holds per checkpoint byte."""
    peak, _, report = anon_growth(small, big, rules)
    return peak, report


def anon_growth(small, big, rules=None) -> tuple[float, float, str]:
    """rss_growth's ratio, and the same for anonymous RSS after the forward. File pages the kernels
    touch count in RSS (and the kernel maps pages of the page cache around each fault), so weights
    read in place show in the first; only the second tells memory the process allocated, which
    expanding weights would take."""
    a, b = measure_model_load_peak_rss(small, rules), measure_model_load_peak_rss(big, rules)
    grown = b.checkpoint_bytes - a.checkpoint_bytes
    peak = (b.peak_rss_bytes - b.baseline_rss_bytes) - (a.peak_rss_bytes - a.baseline_rss_bytes)
    anon = (b.anon_rss_bytes - b.baseline_anon_bytes) - (a.anon_rss_bytes - a.baseline_anon_bytes)
    return peak / grown, anon / grown, f"{a.report()}\n{b.report()}"


def _run_child(code: str, argv: list[str], directory) -> LoadRSS:
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS measurement of {directory} failed (exit {proc.returncode}):\n{proc.stderr}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return LoadRSS(data["checkpoint_bytes"], data["peak_rss_bytes"], data["baseline_rss_bytes"],
                   data.get("anon_rss_bytes", 0), data.get("baseline_anon_bytes", 0))


def write_sized_checkpoint(directory: str | Path, size_bytes: int, seed: int = 0) -> Path:
    """A synthetic DeepSeek-V3-architecture checkpoint (demo shapes, bf16) with enough MoE layers to
    hold at least size_bytes of weights."""
    layers = 2
    while True:
        cfg = synthetic_config("demo", num_hidden_layers=layers)
        shapes = [s for n, s in hf_tensor_shapes(ModelArgs.from_dict(cfg)).items() if not n.endswith("_scale_inv")]
        if sum(2 * math.prod(s) for _, s in shapes) >= size_bytes:
            return write_synthetic_checkpoint(directory, cfg, seed=seed, dtype="bfloat16")
        layers += 1
