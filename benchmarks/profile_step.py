"""Where a decoding step's time goes: one generation under torch.profiler, kernel time grouped by kind.

    python benchmarks/profile_step.py --size small --mode int4                       # CPU
    python benchmarks/profile_step.py --device cuda --size medium --mode bfloat16+compile --seconds 5

The checkpoint is speed.py's random-weight one at the published shapes (built once into --cache). The model is
loaded in --mode (as in speed.py: float32, bfloat16, float16, int8, int4, with +compile or +reference) and
warmed up with a request of the same length (which compiles, and records the CUDA graphs it uses). That
request is timed once without the profiler, then profiled a second time. Time is grouped by what
the operator or kernel does and divided by the number of decoding steps, so the text encoder and the prefill
are spread over the steps (a few per cent of a 5 s request).

On CUDA the table is GPU kernel time (CUPTI sees the kernels inside CUDA graphs too); "device busy" is their sum
over the wall time. On CPU it is the self time of the operators the profiler records on the calling thread;
"outside operators" is what is left of the wall time (Python, mostly). The fused CPU step of
musicgen/accel/fused.py (every layer's products and attention in one native call) is its own row.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import PROMPTS, ensure_checkpoint, load_mode, sync  # noqa: E402

# first match wins: (kind, substrings of lower-cased operator / kernel names)
KINDS = [
    ("fused step layers", ("musicgen::fused_layers",)),      # CPU: every layer in one native call
    ("compiled graph's own kernels", ("compiledfxgraph",)),  # CPU, compile=True: inductor's C++ kernels
    ("guards and graph entry", ("torchdynamo cache lookup", "torch-compiled region")),
    ("attention", ("scaled_dot_product", "flash", "fmha", "attention", "efficient_attention")),
    ("products", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                  "aten::linear", "aten::matmul", "musicgen_kernels", "int4", "int8")),
    ("sampling", ("topk", "sort", "multinomial", "softmax", "cumsum", "exponential", "argmax")),
    ("copies", ("copy", "memcpy", "memset", "fill", "index_put", "index_copy", "clone", "aten::cat", "to_copy")),
    ("norms and elementwise", ("triton_", "layer_norm", "gelu", "aten::add", "aten::mul", "aten::where",
                               "elementwise", "vectorized", "reduce", "aten::sub", "aten::div", "embedding")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small", help="small, medium or large (speed.py's random checkpoints)")
    p.add_argument("--mode", default="float32", help="float32, bfloat16, float16, int8, int4, any +compile or "
                   "+reference (see speed.py)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seconds", type=float, default=5.0, help="audio per request")
    p.add_argument("--device", default="cpu")
    p.add_argument("--top", type=int, default=12, help="how many single operators / kernels to list")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "musicgen-bench")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    mode = args.mode
    model = load_mode(ensure_checkpoint(args.size, args.cache), mode, args.device)
    prompts = (PROMPTS * args.batch)[:args.batch]
    kw = dict(duration=args.seconds, top_k=250, guidance_scale=3.0, seed=0)

    def request():
        codes = model.generate_codes(prompts, **kw)
        sync(args.device)
        return codes

    cuda = args.device.startswith("cuda")
    request()                                                                  # warm-up (compile, graphs)
    t0 = time.perf_counter()
    codes = request()
    wall = time.perf_counter() - t0
    steps = codes.shape[-1] + model.cfg.lm.num_codebooks - 1
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        request()
        profiled_wall = time.perf_counter() - t0

    per_kind: dict[str, float] = defaultdict(float)   # microseconds over the request
    per_name: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        if cuda:
            us = ev.self_device_time_total if hasattr(ev, "self_device_time_total") else ev.self_cuda_time_total
        else:
            us = ev.self_cpu_time_total
        if us <= 0 or (not cuda and ev.key.startswith("ProfilerStep")):
            continue
        per_kind[kind_of(ev.key)] += us
        per_name[ev.key] += us
    total = sum(per_kind.values())
    if not cuda:   # the profiled wall time not inside any recorded operator
        per_kind["outside operators"] = max(profiled_wall * 1e6 - total, 0.0)
        total = profiled_wall * 1e6

    hw = torch.cuda.get_device_name() if cuda else f"{torch.backends.cpu.get_cpu_capability()} CPU"
    print(f"\n{args.size} {mode} batch {args.batch} on {args.device} ({hw}), torch {torch.__version__}: "
          f"{steps} steps in {wall:.2f} s = {steps / wall:.1f} steps/s ({wall / steps * 1e3:.2f} ms a step; "
          f"under the profiler {profiled_wall / steps * 1e3:.2f} ms)")
    if cuda:
        print(f"device busy: {total / 1e6 / profiled_wall:.0%} of the profiled wall time")
    print("\n| kind | ms a step | share |\n|---|---|---|")
    for kind, us in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {us / steps / 1e3:.3f} | {us / total:.0%} |")
    print(f"| total | {total / steps / 1e3:.3f} | |")
    print(f"\n| {'kernel' if cuda else 'operator'} | kind | ms a step |\n|---|---|---|")
    for name, us in sorted(per_name.items(), key=lambda kv: -kv[1])[:args.top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        print(f"| `{short}` | {kind_of(name)} | {us / steps / 1e3:.3f} |")


if __name__ == "__main__":
    main()
