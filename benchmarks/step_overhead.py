"""What the Python of a kernel-free decoding step costs: the layer loop as it runs, against the same operators
replayed by PyTorch's C++ graph interpreter.

    python benchmarks/step_overhead.py                       # small, float32, int8, int4
    python benchmarks/step_overhead.py --modes int4 --position 1000

Without our native kernels (`MUSICGEN_NO_KERNELS=1`, set here) a step runs the reference layer loop
(lm.MusicLM.step_layers): some 600 PyTorch operators called one by one from Python. This captures one step's
inputs from a real request (random weights at musicgen-small's shapes, speed.py's checkpoint), then times
- eager: `step_layers` on them, as generation calls it;
- replayed: a `torch.jit.trace` of that call, which runs the very same operators in the same order (its output
  is checked equal) from TorchScript's interpreter, without Python between them.
The difference is the cost of the Python around the operators. The package does not decode through
TorchScript (deprecated since PyTorch 2.5, and one more backend); this script only measures what that cost is.
Rounds alternate the two to share the machine's drift.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ["MUSICGEN_NO_KERNELS"] = "1"          # before musicgen is imported: the kernel-free path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import ensure_checkpoint, load_mode  # noqa: E402


def capture_step(model, position: int):
    """(x, pos, cache, window, mask) of the step_layers call at `position` of a one-prompt request."""
    lm, seen = model.lm, {}
    run = lm.step_layers

    def spy(x, pos, cache, window, mask):
        if not seen and window > position:
            seen["call"] = (x.clone(), pos, cache, window, mask)
        return run(x, pos, cache, window, mask)

    lm.step_layers = spy
    try:
        model.generate_codes(["80s pop track with bassy drums and synth"], duration=(position + 10) / 50,
                             top_k=250, guidance_scale=3.0, seed=0)
    finally:
        del lm.step_layers
    if not seen:
        raise SystemExit(f"no step reached position {position}")
    return seen["call"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", help="small, medium or large (speed.py's random checkpoints)")
    p.add_argument("--modes", default="float32,int8,int4", help="comma-separated: float32, bfloat16, int8, int4")
    p.add_argument("--position", type=int, default=250, help="cache position of the timed step (50 a second)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=20, help="steps per timing")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "musicgen-bench")
    args = p.parse_args()

    import torch

    folder = ensure_checkpoint(args.size, args.cache)
    rows = []
    for mode in args.modes.split(","):
        model = load_mode(folder, mode, "cpu")
        x, pos, cache, window, mask = capture_step(model, args.position)

        def eager(x):
            return model.lm.step_layers(x, pos, cache, window, mask)

        def timed(f) -> float:
            t0 = time.perf_counter()
            for _ in range(args.repeat):
                f(x)
            return (time.perf_counter() - t0) / args.repeat * 1e3

        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")                # trace's deprecation and constant-folding warnings
            replayed = torch.jit.trace(eager, (x,), check_trace=False)
            for f in (eager, replayed, eager, replayed):   # warm-up (the interpreter optimises on early runs)
                f(x)
            if not torch.equal(eager(x), replayed(x)):
                raise SystemExit(f"{mode}: the replayed step differs from the eager one")
            times = {"eager": [], "replayed": []}
            for _ in range(args.rounds):
                times["eager"].append(timed(eager))
                times["replayed"].append(timed(replayed))
        e, r = statistics.median(times["eager"]), statistics.median(times["replayed"])
        rows.append((mode, e, r))
        del model

    print(f"\n{args.size}, one prompt with guidance (2 rows), step at position {args.position}, no native kernels; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds} rounds of "
          f"{args.repeat} steps\n")
    print("| mode | layers eager (ms) | same operators replayed (ms) | Python (ms) | Python share |")
    print("|---|---:|---:|---:|---:|")
    for mode, e, r in rows:
        print(f"| {mode} | {e:.1f} | {r:.1f} | {e - r:.1f} | {(e - r) / e:.0%} |")


if __name__ == "__main__":
    main()
