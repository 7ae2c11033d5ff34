"""Native CPU kernels, built on first use with the system C++ compiler (torch.utils.cpp_extension).

`int8_gemv()` and `int4_gemv()` return the quantised matrix-vector kernels of gemv.cpp (AVX2; AVX-512, VNNI
and, for many rows, AMX paths chosen at run time), and `fused_decoder()` the native decoder layers of
decoder.cpp (musicgen/fused.py), or None where they cannot be had: not x86-64 with AVX2, FMA
and F16C, no compiler, a failed build, or MUSICGEN_NO_KERNELS=1. Callers fall back to PyTorch's own kernels,
so a missing compiler costs speed, never a result. The build takes about a minute once; torch caches it
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions).
"""
from __future__ import annotations

import functools
import hashlib
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
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


OPS = {}   # name -> the kernel registered as custom op musicgen::<name>, once built: for torch.compile graphs


def int8_gemv():
    """x (M, K) float32, q (N, K) int8, scales (N,) float32, bias (N,) or None -> (M, N); None where the kernels
    cannot be had. Eager code calls the function itself (no custom-op dispatch cost per call); compiled graphs
    call OPS["int8_gemv"]."""
    module = _module()
    return None if module is None else module.int8_gemv


def int4_gemv():
    """x (M, K) float32, packed 4-bit weights (N, K / 2) uint8, float16 group scales (N, K / 32), bias (N,) or
    None -> (M, N); activations are quantised to int8 per group of 32 inside. None where it cannot be had."""
    module = _module()
    return None if module is None else module.int4_gemv


def int4_dequant():
    """packed 4-bit weights (N, K / 2) uint8, float16 group scales (N, K / 32), bf16: bool -> the float32 or
    bfloat16 (N, K) weight, bitwise what `quant.dequantize_int4_weight` (then .bfloat16()) gives, about 15x
    faster; for products with many rows. None where the kernels cannot be had."""
    module = _module()
    return None if module is None else module.int4_dequant


def int4_quantize():
    """float32 (N, K), K % 64 == 0 -> [packed 4-bit weights (N, K / 2), float16 group scales (N, K / 32)],
    bitwise what `quant.quantize_int4_weight_reference` gives. None where the kernels cannot be had."""
    module = _module()
    return None if module is None else module.int4_quantize


def int8_quantize():
    """float32 (N, K) -> [int8 (N, K), float32 per-row scales (N,)], bitwise what
    `quant.quantize_per_channel_reference` gives. None where the kernels cannot be had."""
    module = _module()
    return None if module is None else module.int8_quantize


def dense_gemv():
    """dense_gemv(x float32 (M, K), w float32, bfloat16 or float16 (N, K), bias or None) -> float32 (M, N), for products
    of unquantised layers with few rows (bfloat16 weights: many too, on AMX tiles); AVX-512 only (None
    elsewhere, or with MUSICGEN_NO_AVX512=1)."""
    module = _module()
    return module.dense_gemv if module is not None and module.avx512_available() else None


def lstm_layer():
    """lstm_layer(xw float32 (T, B, 4H), w_hh (4H, H), h0, c0 (B, H)) -> [y (T, B, H), h, c]: one LSTM layer's
    recurrence over precomputed input projections (musicgen/codec_fast.py `lstm`); AVX-512 only, else None."""
    module = _module()
    return module.lstm_layer if module is not None and module.avx512_available() else None


def amx_available(kind: str = "int8") -> bool:
    """Whether the kernels use AMX tiles of `kind`: "int8" (int4_gemv from 4 rows) or "bf16" (int8_gemv, and
    dense_gemv with bfloat16 weights, from 6 rows). Needs an Intel CPU from Sapphire Rapids on, a Linux kernel
    that grants the tile state, and MUSICGEN_NO_AMX unset (checked per call)."""
    module = _module()
    return module is not None and module.amx_available(kind)


def fused_decoder():
    """The FusedDecoder class of decoder.cpp (every decoder layer of one decoding step in one call, for int4/int8
    or bfloat16 layers), or None where the kernels cannot be had. musicgen/fused.py builds it from a MusicLM."""
    module = _module()
    return None if module is None else module.FusedDecoder


def _register(name: str, fn) -> None:
    import torch

    op = torch.library.custom_op(f"musicgen::{name}", fn, mutates_args=(),
                                 schema="(Tensor x, Tensor q, Tensor scales, Tensor? bias) -> Tensor")
    op.register_fake(lambda x, q, scales, bias: x.new_empty(x.shape[0], q.shape[0]))
    OPS[name] = op


def _module():
    from .. import settings

    return _built() if settings.kernels else None


@functools.lru_cache(maxsize=1)
def _built():
    if os.environ.get("MUSICGEN_NO_KERNELS", "") not in ("", "0") or not _cpu_has_avx2_fma():
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return None
    try:
        import torch.utils.cpp_extension as ext

        build_dir = Path(ext._get_build_directory("musicgen_kernels", verbose=False))
        if not any(build_dir.glob("*.so")):
            print("musicgen: building the CPU kernels (once, about a minute; they make CPU decoding several "
                  "times faster)", file=sys.stderr, flush=True)
        # torch rebuilds when the sources or flags change; the header's hash in the flags covers it too
        header = hashlib.sha256((HERE / "gemv.h").read_bytes()).hexdigest()[:16]
        module = ext.load("musicgen_kernels", [str(HERE / "gemv.cpp"), str(HERE / "decoder.cpp")],
                          extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", f"-DMUSICGEN_HEADER={header}"],
                          extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no ninja, compiler error, ...: PyTorch's kernels still work
        print(f"musicgen: CPU kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); decoding "
              "runs on PyTorch's kernels, several times slower in the quantised modes", file=sys.stderr)
        return None
    _register("int8_gemv", module.int8_gemv)
    _register("int4_gemv", module.int4_gemv)
    return module
