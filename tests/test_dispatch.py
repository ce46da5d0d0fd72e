"""Every vector path of the kernels, tested on this machine by compiling for lower targets: numba
compiles for the CPU named by NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, and the kernels choose their code
from those features (kernels.intrinsics.cpu_has: VNNI's vpdpbusd, AVX-512's 8-row GEMM blocks,
F16C's conversions). Each target reruns the row-dot and tile-decoder tests (fp32 and int8
activations, every format) in a fresh process with its own numba cache."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 targets")

_BASE = "+64bit,+cmov,+cx8,+fxsr,+mmx,+sse,+sse2"
_AVX2 = _BASE + ",+avx,+avx2,+bmi,+bmi2,+cx16,+f16c,+fma,+lzcnt,+movbe,+popcnt,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave"
# name -> (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES, host flag it needs, VNNI, F16C, AVX2, SSSE3 and AVX512 as the
# kernels must see them; SSSE3 and AVX2 choose IQ4_XS's table lookup: pshufb per 16 bytes, vpshufb, or
# compare-selects; AVX512 the 512-bit K-quant row dots, which the host run of the tests covers where it has them)
TARGETS = {
    "portable-sse2": ("x86-64", _BASE, None, (False, False, False, False, False)),
    "ssse3": ("core2", _BASE + ",+cx16,+sse3,+ssse3", "ssse3", (False, False, False, True, False)),
    "avx2": ("haswell", _AVX2, "avx2", (False, True, True, True, False)),
    "avx-vnni": ("alderlake", _AVX2 + ",+avxvnni", "avx_vnni", (True, True, True, True, False)),
}
TESTS = Path(__file__).parent


def _host_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.parametrize("target", list(TARGETS))
def test_kernels_on_a_lower_target(target, tmp_path):
    cpu, features, needs, flags = TARGETS[target]
    if needs and needs not in _host_flags():
        pytest.skip(f"this CPU cannot run {target} code (no {needs})")
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features, NUMBA_CACHE_DIR=str(tmp_path))
    probe = subprocess.run([sys.executable, "-c", "from hetero_rt.kernels import intrinsics as i; print(i.VNNI, i.F16C, i.AVX2, i.SSSE3, i.AVX512)"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert probe.stdout.split() == [str(f) for f in flags], probe.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_kernels_ggml.py"),
                          "-k", "dot or decode_tile"], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
