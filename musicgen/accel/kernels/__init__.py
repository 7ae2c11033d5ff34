"""Native CPU kernels, built on first use with the system C++ compiler (torch.utils.cpp_extension).

The functions below return the kernels (or the fused decoder class), or None where they cannot be had: not x86-64
with AVX2, FMA and F16C, no compiler, a failed build, or MUSICGEN_NO_KERNELS=1. Callers fall back to PyTorch's own
kernels, so a missing compiler costs speed, never a result. The build takes a few minutes once; torch caches it
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions).

Every kernel runs at every instruction-set level from AVX2 up; each call takes the path of the best level that
the CPU and the OS allow (`isa_levels()`), capped process-wide by `limit_isa()`. No timing decides a path.
The sources, one file per kernel family: int8.cpp, int4.cpp, dense.cpp (row kernels in rows.h), amx.cpp,
quantize.cpp, attention.cpp and decoder.cpp (the fused step), lstm.cpp; docs/kernels.md describes them.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).parent

# The instruction-set levels the kernels dispatch on, in order, each including the ones before it:
# "avx2" (AVX2, FMA, F16C: every kernel), "avx512" (AVX-512 F/BW/VL/DQ: 16-lane int8 and dense row kernels,
# int8-cache attention), "avx512_vnni" (the int4 kernel's integer dot products), "amx" (AMX int8 and bfloat16
# tiles, granted by Linux: int8, int4 and bfloat16 products with several rows).
LEVELS = ("avx2", "avx512", "avx512_vnni", "amx")

OPS = {}   # name -> the kernel registered as custom op musicgen::<name>, once built: for torch.compile graphs

_limit: str | None = None   # limit_isa's level, applied to the module when it is built


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        import torch
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


def isa_levels() -> list[str]:
    """The levels of LEVELS the kernels can run on this host, in order (a prefix of LEVELS); [] where the kernels
    cannot be had. The last is the default."""
    module = _module()
    return [] if module is None else list(LEVELS[:module.host_isa() + 1])


def isa_level() -> str | None:
    """The level the kernels take now: the host's best, capped by limit_isa(); None where they cannot be had."""
    module = _module()
    return None if module is None else LEVELS[module.isa()]


class limit_isa:
    """Cap the level of every kernel at `level` (one of LEVELS; None: no cap), process-wide, from now on; as a
    context manager, until the block ends (the cap before is then restored):

        with kernels.limit_isa("avx2"):
            y = kernels.int8_gemv()(x, q, scales, None)    # the AVX2 path, even on an AMX CPU

    A cap above the host's best level leaves the host's best. For tests and benchmarks, which run every path the
    host can run; a cap set before the kernels are built applies once they are."""

    def __init__(self, level: str | None):
        global _limit
        if level is not None and level not in LEVELS:
            raise ValueError(f"unknown instruction-set level {level!r}: expected one of {', '.join(LEVELS)} or None")
        self.previous, _limit = _limit, level
        _apply_limit()

    def __enter__(self) -> limit_isa:
        return self

    def __exit__(self, *exc) -> None:
        global _limit
        _limit = self.previous
        _apply_limit()


def _apply_limit() -> None:
    if _built.cache_info().currsize:   # built (or found unavailable) already; otherwise _built applies it
        module = _built()
        if module is not None:
            module.set_isa_limit(LEVELS.index(_limit or LEVELS[-1]))


def amx_available(kind: str = "int8") -> bool:
    """Whether the kernels take AMX tiles now (level "amx"): of kind "int8" (int4_gemv from 4 rows) or "bf16"
    (int8_gemv, and dense_gemv with bfloat16 weights, from 6 rows); the level "amx" has both."""
    if kind not in ("int8", "bf16"):
        raise ValueError(f"AMX tiles are of kind 'int8' or 'bf16', not {kind!r}")
    return isa_level() == "amx"


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
    bfloat16 (N, K) weight, bitwise what `quant.dequantize_int4_weight` (then .bfloat16()) gives; for products
    with many rows. None where the kernels cannot be had."""
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
    """dense_gemv(x float32 (M, K), w float32, bfloat16 or float16 (N, K), bias or None) -> float32 (M, N): the
    weights widened exactly, float32 sums; for products of unquantised layers with few rows (bfloat16 weights:
    many too, on AMX tiles). None where the kernels cannot be had."""
    module = _module()
    return None if module is None else module.dense_gemv


def lstm_layer():
    """lstm_layer(xw float32 (T, B, 4H), w_hh (4H, H), h0, c0 (B, H)) -> [y (T, B, H), h, c]: one LSTM layer's
    recurrence over precomputed input projections (musicgen/accel/codec.py `lstm`); H % 8 == 0. None where the
    kernels cannot be had."""
    module = _module()
    return None if module is None else module.lstm_layer


def fused_decoder():
    """The FusedDecoder class of decoder.cpp (every decoder layer of one decoding step in one call, for int4, int8,
    float32, bfloat16 or float16 layers), or None where the kernels cannot be had. musicgen/accel/fused.py builds
    it from a MusicLM."""
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


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold an OS file lock on `build_dir` while PyTorch builds or loads the kernels there, and clear PyTorch's
    own lock first if it is stale.

    PyTorch marks a build in progress with a plain file, `lock`, and a later build waits for it to go away, with
    no limit. A build that was killed (Ctrl-C, a job time limit, a lost machine) leaves the file behind, and
    every later load then hangs. Our builds hold an flock for their whole duration, which the OS drops when the
    process dies; so a `lock` file found while holding the flock was left by a dead build and is removed.
    Where flock does not exist (Windows), PyTorch's lock alone applies."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "musicgen.flock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)   # waits while another process builds here
        try:
            stale = build_dir / "lock"
            if stale.exists():
                print(f"musicgen: removing the lock file of an unfinished kernel build ({stale})", file=sys.stderr)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_name() -> str:
    """The kernels' build folder under torch's extension folder, one per installed copy of the package (and torch
    version): two copies sharing one folder (two environments, a checkout beside an install) would rebuild it
    each time the other had loaded, since torch rebuilds whenever the source paths differ."""
    import torch

    where = hashlib.sha256(f"{HERE.resolve()}|{torch.__version__}".encode()).hexdigest()[:10]
    return f"musicgen_kernels_{where}"


@functools.lru_cache(maxsize=1)
def _built():
    if os.environ.get("MUSICGEN_NO_KERNELS", "") not in ("", "0") or not _cpu_has_avx2_fma():
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return None
    try:
        import torch.utils.cpp_extension as ext

        name = build_name()
        build_dir = Path(ext._get_build_directory(name, verbose=False))
        if not any(build_dir.glob("*.so")):
            print("musicgen: building the CPU kernels (once, a few minutes; quantised decoding runs about twice "
                  "as fast with them)", file=sys.stderr, flush=True)
        sources = sorted(HERE.glob("*.cpp"))
        # torch rebuilds when the sources or the flags change; the headers' hash in the flags covers them too
        headers = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(HERE.glob("*.h")))).hexdigest()[:16]
        # loops on 64-byte lines: where a kernel's loop fell moved its speed by up to 10 % (docs/kernels.md)
        flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-falign-loops=64", "-fopenmp", f"-DMUSICGEN_HEADERS={headers}"]
        with _build_lock(build_dir):
            module = ext.load(name, [str(p) for p in sources], extra_cflags=flags,
                              extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no ninja, compiler error, ...: PyTorch's kernels still work
        print(f"musicgen: CPU kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); decoding "
              "runs on PyTorch's kernels, about half as fast in the quantised modes", file=sys.stderr)
        return None
    module.set_isa_limit(LEVELS.index(_limit or LEVELS[-1]))
    _register("int8_gemv", module.int8_gemv)
    _register("int4_gemv", module.int4_gemv)
    return module
