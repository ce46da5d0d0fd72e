"""numba kernels for the routed experts (moe.py) and the weight decoders they inline (dequant.py).

numba's on-disk cache (cache=True) keys each function on its own file only: a kernel in moe.py that
inlines a decoder from dequant.py would keep running stale machine code after dequant.py changes.
So before the kernels are imported, the cache files of this package are dropped whenever any of its
sources, or quant/ggml.py (which owns the format codes the kernels switch on), changed (a hash of
them is kept next to the cache).
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def _drop_stale_cache() -> None:
    here = Path(__file__).parent
    sources = sorted(here.glob("*.py")) + [here.parent / "quant" / "ggml.py"]   # ggml.py: the format codes
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
    cache = here / "__pycache__"
    stamp = cache / "kernels.srchash"
    try:
        if stamp.is_file() and stamp.read_text() == digest:
            return
        for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            f.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:
        pass  # read-only install: numba then falls back to its own cache locations


_drop_stale_cache()
