"""Fine-tuning MusicGen: from a folder of songs to a checkpoint this project (and transformers, and audiocraft
after `musicgen convert`) generates from.

    songs/ + captions --encode.py-->  DATA: uint16 EnCodec codes, memory-mapped, with an index (once)
    DATA --dataset.py--> crops and augmented captions, a pure function of (seed, step, row)
         --network.py--> frozen T5 -> projections -> MusicLM logits
         --loss.py-->    cross-entropy per codebook on the delayed grid
         --loop.py-->    AdamW, cosine schedule, clipping, autocast, accumulation, DDP / FSDP (distributed.py),
                         LoRA (lora.py), checkpoints and metrics (state.py); its options in options.py
         --export.py-->  RUN/final: a Hugging Face checkpoint folder, adapters merged

    from musicgen.train import prepare, train, TrainConfig
    prepare("songs/", "data", "facebook/musicgen-small")
    train(TrainConfig(data="data", model="facebook/musicgen-small", run="run", lora_rank=16, steps=2000))

Nothing is imported until used: the command line builds its parsers from cli.py without torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"prepare": "encode", "train": "loop", "TrainConfig": "options"}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'musicgen.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
