"""`musicgen prepare` and `musicgen train`: the command-line layer over prepare.prepare and loop.train.

    musicgen prepare songs/ -o data --model facebook/musicgen-small --valid-fraction 0.05
    musicgen train data --model facebook/musicgen-small -o run --lora-rank 16 --steps 2000 --batch-size 8
    torchrun --nproc_per_node 8 -m musicgen train data --model facebook/musicgen-medium -o run --batch-size 64
    musicgen train data -o run --resume                      continue a run (killed, or preempted) where it stopped

Nothing here imports torch, so that `musicgen --help` stays fast; bad options end with one line (exit 2).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

DEFAULT_MODEL = "facebook/musicgen-small"


def add_parsers(sub) -> None:
    p = sub.add_parser("prepare", help="encode songs into training codes once (the DATA of musicgen train)")
    p.add_argument("src", type=Path, help="folder of audio with .txt or .json captions, a .jsonl manifest "
                                          "(audiocraft's) or a .csv with path,caption")
    p.add_argument("-o", "--output", type=Path, required=True, help="DATA folder (re-running resumes it)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint whose codec encodes (hub id or folder)")
    p.add_argument("--segment", type=float, default=None,
                   help="segment seconds, rounded to whole codec frames (default: the model's window, 30 s)")
    p.add_argument("--min-segment-ratio", type=float, default=0.8,
                   help="skip files shorter than this share of a segment; a shorter last segment is read by "
                        "crops only, not a row of its own (default 0.8)")
    p.add_argument("--valid-fraction", type=float, default=0.0, help="share of files held out for validation")
    p.add_argument("--batch-size", type=int, default=4, help="segments encoded together (default 4)")
    p.add_argument("--no-demucs", action="store_true", help="melody checkpoints: chroma of the full mix")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    t = sub.add_parser("train", help="fine-tune a checkpoint on prepared data (full or LoRA; torchrun for many GPUs)")
    t.add_argument("data", type=Path, help="folder written by musicgen prepare")
    t.add_argument("-o", "--output", type=Path, required=True, help="RUN folder: checkpoints, metrics, final/")
    t.add_argument("--model", default=None, help=f"checkpoint to fine-tune (default {DEFAULT_MODEL})")
    t.add_argument("--resume", action="store_true", help="continue RUN from its last checkpoint, with its options")
    t.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    t.add_argument("--batch-size", type=int, help="global batch, split over ranks and --accumulate (default 8)")
    t.add_argument("--accumulate", type=int, help="micro-batches per rank and step (default 1)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 1e-5, LoRA 1e-4)")
    t.add_argument("--warmup", type=int, help="warm-up steps (default 5%% of --steps), then cosine to lr/10")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    t.add_argument("--duration", type=float, help="seconds of each random crop (default: DATA's segment)")
    t.add_argument("--precision", choices=("float32", "bfloat16", "float16"),
                   help="autocast precision (default bfloat16 on CUDA, float32 on CPU)")
    t.add_argument("--lora-rank", type=int, help="train rank-R adapters instead of every weight")
    t.add_argument("--lora-alpha", type=float, help="adapter scale alpha/R (default alpha = R)")
    t.add_argument("--ema", type=float, help="keep audiocraft's bias-corrected EMA of the weights with this decay "
                                              "(audiocraft: 0.99), stepped every 10 steps; final/ takes it")
    t.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing: recompute layers in backward, for longer crops or batches")
    t.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="shard weights, gradients and optimizer state over ranks (torchrun; --no-fsdp on "
                        "--resume continues a sharded run on one process or with DDP)")
    t.add_argument("--cfg-dropout", type=float,
                   help="probability of the null condition (default audiocraft's: 0.3, melody checkpoints 0.2)")
    t.add_argument("--word-dropout", type=float,
                   help="probability of dropping each caption word (default audiocraft's: 0.3, melody 0.2)")
    t.add_argument("--seed", type=int, help="seed of data order, crops, dropouts and adapters (default 0)")
    t.add_argument("--save-every", type=int, help="checkpoint every N steps (default 500)")
    t.add_argument("--keep", type=int, help="checkpoints kept (default 3)")
    t.add_argument("--valid-every", type=int, help="validation loss every N steps (default 100)")
    t.add_argument("--sample-every", type=int, help="write samples to RUN/samples every N steps")
    t.add_argument("--sample-prompt", dest="sample_prompts", action="append", help="prompt for samples (repeatable)")
    t.add_argument("--sample-duration", type=float, help="seconds per sample (default 8)")
    t.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)


def cmd_prepare(args) -> int:
    from .encode import prepare

    summary = prepare(args.src, args.output, args.model, segment=args.segment,
                      min_segment_ratio=args.min_segment_ratio, valid_fraction=args.valid_fraction,
                      batch_size=args.batch_size, demucs=not args.no_demucs, device=args.device,
                      progress=not args.quiet)
    if summary is not None:   # rank 0
        print(f"musicgen: {summary['files']} files, {summary['segments']} segments "
              f"({summary['train_hours'] * 60:.1f} min to train on, {summary['valid_hours'] * 60:.1f} min held out); "
              f"{len(summary['skipped'])} skipped, {len(summary['uncaptioned'])} without caption "
              f"(see {args.output / 'report.txt'})", file=sys.stderr)
        print(args.output)
    return 0


def cmd_train(args) -> int:
    from .loop import train

    cfg = train_config(args)
    final = train(cfg, resume=args.resume)
    import os

    if os.environ.get("RANK", "0") == "0":
        print(final)
    return 0


def train_config(args):
    """The TrainConfig that `musicgen train` ARGS ask for: RUN's saved options on --resume, with those given
    here where they may change (a flag left out keeps the saved value; -q applies to this session only)."""
    from .options import TrainConfig, resume_config

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    # absolute paths: RUN/config.json must still name them when the run is resumed from another folder
    given.update(data=str(args.data.resolve()), run=str(args.output), progress=not args.quiet)
    if given.get("model") and Path(given["model"]).expanduser().exists():
        given["model"] = str(Path(given["model"]).expanduser().resolve())
    if args.sample_prompts is not None:
        given["sample_prompts"] = tuple(args.sample_prompts)
    if args.resume:
        return resume_config(args.output, given)
    given["model"] = given.get("model") or DEFAULT_MODEL
    return TrainConfig(**{k: v for k, v in given.items() if v is not None})
