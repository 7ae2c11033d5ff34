"""Where a training step's time goes: one step of the trainer under torch.profiler, operators by self time.

    python benchmarks/profile_train.py                          # float32, full fine-tuning, 2 rows of 3 s
    python benchmarks/profile_train.py --precision bfloat16 --lora-rank 16

The checkpoint and DATA are train_speed.py's (random weights at musicgen-small shapes, random codes), built
once into --cache. The trainer takes two steps first (the second is timed without the profiler), then one under
the profiler; the table lists the operators that took most of it (self CPU time, so nested calls are not
counted twice).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import ensure_checkpoint, ensure_data  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "musicgen-bench")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from musicgen.train.distributed import Dist
    from musicgen.train.loop import TrainConfig, Trainer

    checkpoint = ensure_checkpoint("small", args.cache)
    data = ensure_data(checkpoint, args.cache / f"data-{args.seconds:g}s", args.seconds, max(8, args.batch))
    with tempfile.TemporaryDirectory() as run:
        cfg = TrainConfig(data=str(data), model=str(checkpoint), run=str(Path(run) / "run"), steps=3,
                          batch_size=args.batch, duration=args.seconds, precision=args.precision,
                          lora_rank=args.lora_rank, save_every=10**9, progress=False, device="cpu")
        trainer = Trainer(cfg, Dist(device=torch.device("cpu")), resume=False)
        trainer.step(1)
        start = time.perf_counter()
        trainer.step(2)
        plain = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            trainer.step(3)
            profiled = time.perf_counter() - start
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"\n{args.precision}, {'LoRA rank %d' % args.lora_rank if args.lora_rank else 'full'}, {args.batch} rows x "
          f"{args.seconds:g} s, torch {torch.__version__}: a step {plain:.2f} s ({profiled:.2f} s under the profiler)\n")
    print("| operator | s a step | share | calls |")
    print("|---|---:|---:|---:|")
    for e in events[:args.top]:
        s = e.self_cpu_time_total / 1e6
        print(f"| `{e.key[:70]}` | {s:.3f} | {s / total:.0%} | {e.count} |")


if __name__ == "__main__":
    main()
