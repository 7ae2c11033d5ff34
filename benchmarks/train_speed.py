"""Training throughput and peak memory of `musicgen train` against a transformers forward+backward of the same
batch, at musicgen-small shapes with random weights.

    python benchmarks/train_speed.py                              # CPU: full and LoRA, 2 rows of 3 s, 3 steps
    python benchmarks/train_speed.py --batch 2 --seconds 3 --steps 3 --rows ours-full,transformers-full
    python benchmarks/train_speed.py --device cuda --batch 8 --seconds 30 --precision bfloat16 --steps 10

Ours runs the trainer's own step (musicgen/train/loop.py: data rows, frozen T5, LM forward and backward, clipping,
AdamW) on random codes prepared in the DATA layout; transformers runs MusicgenForConditionalGeneration(...,
labels=...) with its text encoder and codec frozen, the same AdamW and clipping, on the same number of rows and
frames (labels delayed as ours, pads ignored). Both load one random checkpoint, built once with transformers
into --cache. Each row runs in its own process (clean peak memory) and reports the best of `--steps` steps after
one warm-up.

Columns: seconds of audio trained per second and codec tokens per second (rows x frames x 4 codebooks / step
time), the ratio to transformers' full fine-tuning, model GFLOP/s (the LM's matrix products: forward 2 x
weights x positions plus attention, x3 for full training, x2 for LoRA, whose frozen weights get no gradient),
on CUDA that as a share of the card's peak (--peak-tflops, or the known value of an H100 / A100), and peak memory
(CPU: max RSS of the process, T5 and codec included; CUDA: max allocated).

On a shared machine, `--repeat 2` runs the list of rows twice, one after the other, and keeps each row's best:
a row is then not judged by one disturbed run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from speed import PROMPTS, cpu_name, ensure_checkpoint  # noqa: E402

ROWS = ("ours-full", "ours-lora", "transformers-full", "transformers-lora")
PEAK_TFLOPS = {("H100", "bfloat16"): 989.0, ("H100", "float16"): 989.0, ("H100", "float32"): 495.0,   # float32: TF32
               ("H200", "bfloat16"): 989.0, ("H200", "float16"): 989.0, ("H200", "float32"): 495.0,
               ("A100", "bfloat16"): 312.0, ("A100", "float16"): 312.0, ("A100", "float32"): 156.0}


def ensure_data(folder: Path, out: Path, seconds: float, rows: int) -> Path:
    """A DATA folder of random codes for the checkpoint at `folder` (what `musicgen prepare` writes)."""
    import numpy as np

    import musicgen
    from musicgen.train.encode import codec_info

    if (out / "index.jsonl").is_file():
        return out
    model = musicgen.load(folder)
    frames = round(seconds * model.frame_rate)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, model.cfg.lm.vocab_size, (rows, model.cfg.lm.num_codebooks, frames), dtype=np.uint16)
    (out / "parts" / "rank0.codes").write_bytes(codes.tobytes())
    size = codes[0].size
    (out / "index.jsonl").write_text("".join(json.dumps(dict(
        source=f"random{i}", part="rank0", caption=PROMPTS[i % len(PROMPTS)], meta={}, split="train", start=0.0,
        offset=i * size, frames=frames, chroma_offset=0, chroma_frames=0)) + "\n" for i in range(rows)))
    (out / "meta.json").write_text(json.dumps(dict(format=1, model=str(folder), codec=codec_info(model),
                                                   segment=seconds, min_segment_ratio=0.8, melody=None)))
    return out


def lm_flops(lm_cfg, rows: int, positions: int, text: int, lora: bool) -> float:
    """Matrix-product FLOPs of one training step of the LM (see the module docstring)."""
    D, F, V, K, L = lm_cfg.dim, lm_cfg.ffn_dim, lm_cfg.vocab_size, lm_cfg.num_codebooks, lm_cfg.num_layers
    per_position = L * 2 * (6 * D * D + 2 * D * F) + 2 * D * V * K
    attention = L * 2 * 2 * positions * D                                 # scores and values, per position
    forward = rows * (positions * (per_position + attention) + L * 2 * text * 2 * D * D)
    return forward * (2 if lora else 3)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step, steps: int, device: str) -> float:
    """The best of `steps` timed calls, after one warm-up (the machine may be shared: the best is the least
    disturbed)."""
    step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_ours(args, lora: bool) -> dict:
    import torch

    from musicgen.train.distributed import Dist
    from musicgen.train.loop import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as run:
        cfg = TrainConfig(data=str(args.data), model=str(args.checkpoint), run=str(Path(run) / "run"),
                          steps=args.steps + 1, batch_size=args.batch, duration=args.seconds, precision=args.precision,
                          lora_rank=args.lora_rank if lora else 0, grad_checkpoint=args.grad_checkpoint,
                          save_every=10**9, progress=False, device=args.device)
        trainer = Trainer(cfg, Dist(device=torch.device(args.device)), resume=False)
        steps = iter(range(1, args.steps + 2))
        seconds = timed(lambda: trainer.step(next(steps)), args.steps, args.device)
        lm_cfg = trainer.model.cfg.lm
    return dict(step_s=seconds, peak_mb=peak_mb(args.device), lm=lm_cfg)


def measure_transformers(args, lora: bool) -> dict:
    import torch
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    from musicgen.train.loss import IGNORE, delayed_batch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.precision]
    model = MusicgenForConditionalGeneration.from_pretrained(args.checkpoint).to(args.device).train()
    model.text_encoder.requires_grad_(False)
    model.audio_encoder.requires_grad_(False)
    V = model.config.decoder.vocab_size
    model.config.decoder.decoder_start_token_id = V
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
        model.decoder = get_peft_model(model.decoder, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank,
                                                                 target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    # the fused AdamW, as ours, and as transformers' Trainer picks by default with torch >= 2.8
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    frames = round(args.seconds * 50)
    g = torch.Generator().manual_seed(0)

    def step():
        text = tokenizer([PROMPTS[i % len(PROMPTS)] for i in range(args.batch)], padding=True, return_tensors="pt")
        codes = torch.randint(0, V, (args.batch, 4, frames), generator=g)
        _, targets = delayed_batch(codes, torch.full((args.batch,), frames), V)
        labels = targets.masked_fill(targets == IGNORE, V).transpose(1, 2)          # pads ignored by transformers
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**text.to(args.device), labels=labels.to(args.device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, args.steps, args.device)
    from musicgen.config import LMConfig

    return dict(step_s=seconds, peak_mb=peak_mb(args.device), lm=LMConfig.from_hf(model.config.decoder.to_dict()))


def measure(args) -> None:
    """One row, in this process; prints its JSON."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    lora = args.measure.endswith("lora")
    row = measure_ours(args, lora) if args.measure.startswith("ours") else measure_transformers(args, lora)
    frames = round(args.seconds * 50)
    flops = lm_flops(row.pop("lm"), args.batch, frames + 3, 16, lora)
    print(json.dumps(dict(row, name=args.measure, gflops=flops / row["step_s"] / 1e9)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help="which of " + ", ".join(ROWS))
    p.add_argument("--batch", type=int, default=2, help="rows per step (default 2)")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds of audio per row (default 3)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default 3)")
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--grad-checkpoint", action="store_true", help="ours with activation checkpointing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads per row (default: torch's own choice)")
    p.add_argument("--repeat", type=int, default=1, help="run the rows this many times; each row's best is kept")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's peak for the precision (CUDA)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "musicgen-bench")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return measure(args)
    import torch

    args.checkpoint = ensure_checkpoint("small", args.cache)
    args.data = ensure_data(args.checkpoint, args.cache / f"data-{args.seconds:g}s", args.seconds, max(8, args.batch))
    best: dict[str, dict] = {}
    for name in args.rows.split(",") * args.repeat:
        if name == "transformers-lora":
            try:
                import peft  # noqa: F401
            except ImportError:
                print("transformers-lora skipped: peft is not installed", file=sys.stderr)
                continue
        cmd = [sys.executable, __file__, "--measure", name, "--checkpoint", str(args.checkpoint), "--data",
               str(args.data), "--batch", str(args.batch), "--seconds", str(args.seconds), "--steps", str(args.steps),
               "--precision", args.precision, "--lora-rank", str(args.lora_rank), "--device", args.device,
               "--threads", str(args.threads)]
        cmd += ["--grad-checkpoint"] if args.grad_checkpoint else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {name}: {row['step_s']:.2f} s/step, {row['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
        if name not in best or row["step_s"] < best[name]["step_s"]:
            best[name] = row
    results = list(best.values())
    hw = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{cpu_name()}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"
    peak = args.peak_tflops or next((v for (card, prec), v in PEAK_TFLOPS.items()
                                     if card in hw and prec == args.precision), None)
    frames = round(args.seconds * 50)
    print(f"\ndevice: {args.device} ({hw}); torch {torch.__version__}; musicgen-small shapes, random weights; "
          f"{args.batch} rows x {args.seconds:g} s ({frames} frames); {args.precision}; best of {args.steps} steps after "
          f"1 warm-up, best of {args.repeat} run(s); {args.threads or torch.get_num_threads()} threads; fused AdamW; LoRA rank {args.lora_rank}"
          f"{'; activation checkpointing (ours)' if args.grad_checkpoint else ''}\n")
    print("| row | s/step | audio s/s | tokens/s | × transformers full | GFLOP/s | % of peak | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    base = next((r for r in results if r["name"] == "transformers-full"), None)
    for r in results:
        ratio = f"{base['step_s'] / r['step_s']:.2f}×" if base else "-"
        share = f"{100 * r['gflops'] / 1e3 / peak:.1f}" if peak and args.device.startswith("cuda") else "-"
        print(f"| {r['name']} | {r['step_s']:.2f} | {args.batch * args.seconds / r['step_s']:.2f} | "
              f"{args.batch * frames * 4 / r['step_s']:.0f} | {ratio} | {r['gflops']:.0f} | {share} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
