"""The options of `musicgen train` (TrainConfig), their checks, and what may change when a run resumes."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EMA_EVERY = 10   # optimizer steps between EMA steps (audiocraft's optim.ema.updates for MusicGen)
# audiocraft's (classifier_free_guidance.training_dropout, t5.word_dropout) by kind of checkpoint:
# config/conditioner/text2music.yaml and chroma2music.yaml
DROPOUTS = {"text": (0.3, 0.3), "melody": (0.2, 0.2)}


@dataclass
class TrainConfig:
    data: str                                # folder written by `musicgen prepare`
    model: str                               # checkpoint to start from (hub id or folder)
    run: str                                 # output folder
    steps: int = 1000
    batch_size: int = 8                      # the global batch, split over ranks and accumulation micro-batches
    accumulate: int = 1                      # micro-batches per rank and step
    lr: float | None = None                  # peak learning rate; None: 1e-5 (full), 1e-4 (LoRA)
    warmup: int | None = None                # linear warm-up steps; None: 5 % of steps
    weight_decay: float = 0.1                # on matrices and embeddings, not on norms and biases
    clip: float = 1.0                        # gradient norm clipping
    duration: float | None = None            # seconds of each random crop; None: the data's segment
    precision: str | None = None             # float32, bfloat16, float16 (autocast); None: bfloat16 on CUDA
    lora_rank: int = 0                       # 0: full fine-tuning
    lora_alpha: float | None = None          # adapter scale alpha / rank; None: alpha = rank
    ema: float = 0.0                         # EMA decay (0: off; audiocraft 0.99), stepped every EMA_EVERY steps;
                                             # the export takes the EMA
    grad_checkpoint: bool = False            # recompute each decoder layer in backward (activation checkpointing)
    fsdp: bool = False                       # shard parameters, gradients and optimizer state over ranks
    cfg_dropout: float | None = None         # probability of the null condition (classifier-free guidance) and
    word_dropout: float | None = None        # of dropping each caption word; None: DROPOUTS of the checkpoint's kind
    seed: int = 0
    save_every: int = 500                    # checkpoint every N steps (and at the end)
    keep: int = 3                            # checkpoints kept
    valid_every: int = 100                   # validation loss every N steps (when DATA has a validation split)
    sample_every: int = 0                    # samples every N steps from sample_prompts (0: off)
    sample_prompts: tuple = ()
    sample_duration: float = 8.0
    device: str | None = None                # cpu, cuda (each rank its LOCAL_RANK); None: CUDA when available
    progress: bool = True


# options a resumed run may change: none of them changes the weights it ends with
FREE_ON_RESUME = ("save_every", "keep", "valid_every", "sample_every", "sample_prompts", "sample_duration", "device",
                  "progress", "accumulate", "grad_checkpoint", "fsdp")


def resume_config(run: str | Path, given: dict) -> TrainConfig:
    """RUN's own options, with the `given` ones (those set on the command line) where they may change. The run
    goes on in `run` (where config.json was found), wherever it was started: a RUN folder may be moved or
    copied and resumed there."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise ValueError(f"nothing to resume: {run} has no config.json (start it without --resume)")
    saved = json.loads(path.read_text())
    saved["run"] = str(run)
    for key, value in given.items():
        if value is None or key in ("run",):
            continue
        old = saved.get(key)
        same = (list(value) == list(old or ())) if key == "sample_prompts" else value == old
        if not same and key not in FREE_ON_RESUME:
            if key in ("data", "model"):
                same = Path(str(value)).expanduser().resolve() == Path(str(old)).expanduser().resolve()
            if not same:
                flag = "--" + key.replace("_", "-")
                raise ValueError(f"{run} was started with {flag} {'at its default' if old is None else old}; --resume "
                                 f"continues it with its own options (leave out {flag}, or train into a new RUN)")
        saved[key] = value
    saved["sample_prompts"] = tuple(saved.get("sample_prompts") or ())
    return TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved})


def dropouts(cfg: TrainConfig, melody: bool) -> tuple[float, float]:
    """(cfg_dropout, word_dropout) of a run: those given, else audiocraft's for a text or melody checkpoint."""
    default = DROPOUTS["melody" if melody else "text"]
    return (cfg.cfg_dropout if cfg.cfg_dropout is not None else default[0],
            cfg.word_dropout if cfg.word_dropout is not None else default[1])


def check_options(cfg: TrainConfig, world: int) -> None:
    """Every option checked before anything loads: a bad value is one ValueError naming its flag."""
    if cfg.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.batch_size < 1 or cfg.accumulate < 1:
        raise ValueError("--batch-size and --accumulate must be at least 1")
    if cfg.batch_size % (world * cfg.accumulate):
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {world} rank(s) x "
                         f"{cfg.accumulate} micro-batch(es)")
    if cfg.precision is not None and cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {cfg.precision!r}: choose float32, bfloat16 or float16")
    if cfg.duration is not None and not cfg.duration > 0:
        raise ValueError(f"--duration must be positive, got {cfg.duration:g}")
    for name in ("cfg_dropout", "word_dropout"):
        if getattr(cfg, name) is not None and not 0 <= getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(cfg, name):g}")
    if not 0 <= cfg.ema < 1:
        raise ValueError(f"--ema is a decay in [0, 1), got {cfg.ema:g}")
    if cfg.ema and cfg.steps < EMA_EVERY:   # no EMA step yet: the export would be the starting weights
        raise ValueError(f"--ema averages every {EMA_EVERY} steps: it needs --steps {EMA_EVERY} or more")
    if cfg.lora_rank < 0:
        raise ValueError(f"--lora-rank must be positive, got {cfg.lora_rank}")
    if cfg.sample_every < 0:
        raise ValueError(f"--sample-every must be 0 (off) or more, got {cfg.sample_every}")
    if cfg.fsdp and (cfg.ema or cfg.sample_every):
        raise ValueError("--fsdp keeps no whole copy of the weights on a rank: --ema and --sample-every need one "
                         "(sample from an export instead)")
    if cfg.sample_every and not cfg.sample_prompts:
        raise ValueError("--sample-every needs --sample-prompt")
    if cfg.save_every < 1 or cfg.keep < 1 or cfg.valid_every < 1:
        raise ValueError("--save-every, --keep and --valid-every must be at least 1")
    if not cfg.sample_duration > 0:
        raise ValueError(f"--sample-duration must be positive, got {cfg.sample_duration:g}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr:g}")
    if cfg.warmup is not None and cfg.warmup < 0:
        raise ValueError(f"--warmup must be 0 or more, got {cfg.warmup}")
    if not cfg.weight_decay >= 0:
        raise ValueError(f"--weight-decay must be 0 or more, got {cfg.weight_decay:g}")
    if cfg.lora_alpha is not None and not cfg.lora_alpha > 0:
        raise ValueError(f"--lora-alpha must be positive, got {cfg.lora_alpha:g}")
