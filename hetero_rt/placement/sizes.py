"""Byte sizes as users write them (24GiB, 1.5 GB, 512MiB; a unit is required: a bare 24 is refused,
not taken as 24 bytes) and as hetero_rt prints them; the memory this machine has."""
from __future__ import annotations

import re
import resource
import sys

import psutil
import torch

from ..errors import HeteroRTError

_UNITS = {"b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str, what: str = "size") -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if m and not m.group(2):
        raise HeteroRTError(f"{what}: {text!r} has no unit; write e.g. {m.group(1)}GiB or {m.group(1)}GB "
                            f"(B for bytes)")
    if not m or m.group(2).lower() not in _UNITS:
        raise HeteroRTError(f"{what}: cannot read {text!r} as a size; write e.g. 24GiB, 24GB, 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: int) -> str:
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def machine_budgets(devices) -> tuple[dict[str, int], list[str]]:
    """Budgets for `plan` when none is given: this machine's RAM for "cpu", each CUDA device's memory
    for "cuda[:N]" where it exists; and a line per assumption (or per device it could not size)."""
    budgets, said = {}, []
    for dev in sorted(set(devices)):
        if dev == "cpu":
            budgets[dev] = psutil.virtual_memory().total
            said.append(f"assumed: cpu budget = this machine's RAM, {fmt_bytes(budgets[dev])} (--host-mem to plan "
                        f"for another)")
            continue
        index = int(dev.split(":")[1]) if ":" in dev else 0
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            budgets[dev] = torch.cuda.get_device_properties(index).total_memory
            said.append(f"assumed: {dev} budget = {torch.cuda.get_device_name(index)}, {fmt_bytes(budgets[dev])} "
                        f"(--gpu-mem to plan for another)")
        else:
            said.append(f"no budget for {dev}: this machine has no such GPU; pass --gpu-mem to plan for one")
    return budgets, said


def peak_rss_bytes() -> int:
    """This process's high-water resident memory: VmHWM on Linux, else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024
