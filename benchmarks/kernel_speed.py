"""The native CPU kernels alone, on musicgen-small's layer set, at every instruction-set level this host runs.

    python benchmarks/kernel_speed.py                                     # every kernel, weight dtype, level; 1-16 rows
    python benchmarks/kernel_speed.py --kernels int4,int8 --rows 2 --levels amx,avx512_vnni --repeat 10

One pass is every product of a decoding step of musicgen-small: 24 layers x (qkv 3072x1024, out 1024x1024,
cross-attention q and out 1024x1024, fc1 4096x1024, fc2 1024x4096), 336 M weights, random (speed does not depend
on their values). Each row of the table is the best of --repeat passes after one warm-up pass, with torch's
intra-op threads (--threads). GB/s: the weight bytes one pass reads (scales included) over its time, to hold
against the machine's memory bandwidth.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from musicgen.accel import kernels

LAYERS = 24
SHAPES = [(3072, 1024), (1024, 1024), (1024, 1024), (1024, 1024), (4096, 1024), (1024, 4096)]   # (N, K) per layer
DENSE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def layer_set(kind: str) -> tuple[list[tuple], int]:
    """The products' weight arguments, (weight, scales) per product, and the bytes they hold."""
    g = torch.Generator().manual_seed(0)
    args, size = [], 0
    for _ in range(LAYERS):
        for n, k in SHAPES:
            if kind == "int8":
                w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
                s = torch.rand(n, generator=g) / 127
            elif kind == "int4":
                w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
                s = (torch.rand(n, k // 32, generator=g) / 7).half()
            else:
                w, s = torch.randn(n, k, generator=g).to(DENSE[kind]), None
            args.append((w, s))
            size += w.numel() * w.element_size() + (0 if s is None else s.numel() * s.element_size())
    return args, size


def one_pass(kind: str, args: list[tuple], xs: dict[int, torch.Tensor]) -> None:
    if kind == "int8":
        fn = kernels.int8_gemv()
        for w, s in args:
            fn(xs[w.shape[1]], w, s, None)
    elif kind == "int4":
        fn = kernels.int4_gemv()
        for w, s in args:
            fn(xs[2 * w.shape[1]], w, s, None)
    else:
        fn = kernels.dense_gemv()
        for w, _ in args:
            fn(xs[w.shape[1]], w, None)


def best_ms(kind: str, args: list[tuple], rows: int, repeat: int) -> float:
    xs = {k: torch.randn(rows, k) for k in {k for _, k in SHAPES}}
    one_pass(kind, args, xs)   # warm-up: scratch buffers, caches, thread pool
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        one_pass(kind, args, xs)
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernels", default="int8,int4,float32,bfloat16,float16",
                   help="int8, int4 and the dense weight dtypes float32, bfloat16, float16")
    p.add_argument("--rows", default="1,2,4,8,16", help="activation rows per product")
    p.add_argument("--levels", default=None, help="instruction-set levels (default: every one this host runs)")
    p.add_argument("--repeat", type=int, default=5, help="passes per row; the best is reported")
    p.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    host = kernels.isa_levels()
    if not host:
        raise SystemExit("the native kernels are not available here (no AVX2/FMA/F16C, no compiler, or "
                         "MUSICGEN_NO_KERNELS=1)")
    levels = host if args.levels is None else args.levels.split(",")
    for level in levels:
        if level not in host:
            raise SystemExit(f"level {level!r} is not one this host runs ({', '.join(host)})")
    kinds = args.kernels.split(",")
    for kind in kinds:
        if kind not in ("int8", "int4", *DENSE):
            raise SystemExit(f"unknown kernel {kind!r}: int8, int4, float32, bfloat16 or float16")
    rows = [int(r) for r in args.rows.split(",")]

    print(f"{cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; host levels "
          f"{', '.join(host)}; musicgen-small layer set, best of {args.repeat}")
    print("| kernel | weights | rows | level | ms | weights GB/s |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for kind in kinds:
            weights, size = layer_set(kind)
            name = "dense_gemv" if kind in DENSE else f"{kind}_gemv"
            for r in rows:
                for level in levels:
                    with kernels.limit_isa(level):
                        ms = best_ms(kind, weights, r, args.repeat)
                    print(f"| {name} | {kind} | {r} | {level} | {ms:.1f} | {size / ms / 1e6:.1f} |", flush=True)
            del weights


if __name__ == "__main__":
    main()
