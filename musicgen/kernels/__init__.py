"""Native CPU kernels, built on first use with the system C++ compiler (torch.utils.cpp_extension).

`int8_gemv()` returns the AVX2 weight-only int8 matrix-vector kernel, or None where it cannot be had: not
x86-64 with AVX2 and FMA, no compiler, a failed build, or MUSICGEN_NO_KERNELS=1. Callers fall back to
PyTorch's own kernels, so a missing compiler costs speed, never a result. The build takes about a minute
once; torch caches it (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions).
"""
from __future__ import annotations

import functools
import os
import platform
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).parent


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        import torch
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return " avx2" in flags and " fma" in flags


@functools.lru_cache(maxsize=1)
def int8_gemv():
    if os.environ.get("MUSICGEN_NO_KERNELS", "") not in ("", "0") or not _cpu_has_avx2_fma():
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return None
    try:
        import torch.utils.cpp_extension as ext

        build_dir = Path(ext._get_build_directory("musicgen_int8_gemv", verbose=False))
        if not any(build_dir.glob("*.so")):
            print("musicgen: building the int8 CPU kernel (once, about a minute)", file=sys.stderr, flush=True)
        module = ext.load("musicgen_int8_gemv", [str(HERE / "int8_gemv.cpp")],
                          extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
                          verbose=False)
        return module.int8_gemv
    except Exception as e:  # no ninja, compiler error, ...: PyTorch's kernels still work
        print(f"musicgen: int8 CPU kernel unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
              "using PyTorch's", file=sys.stderr)
        return None
