"""RUN/final/: the trained model as a Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer
files), adapters merged, which `musicgen.load`, transformers' MusicgenForConditionalGeneration (or
MusicgenMelodyForConditionalGeneration) and `musicgen convert` (to audiocraft's format) all read.

The trained tensors are put into a fresh copy of the source checkpoint, loaded on the CPU: the frozen parts (T5,
EnCodec) come from the source unchanged, and whatever ran the training (DDP, FSDP shards, a GPU) leaves no trace.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .. import audiocraft_format
from .. import checkpoint as ckpt
from ..convert import save_hf
from .lora import add_lora, merge_lora
from .network import Network


def export(model_name: str, trained: dict[str, torch.Tensor], dst: Path, lora_rank: int = 0,
           lora_alpha: float | None = None) -> Path:
    """Write `dst` (replacing it whole) from the source checkpoint `model_name` and the trained tensors, named as
    in Network's state dict (LoRA adapters included when lora_rank > 0)."""
    from ..loading import load

    model = load(model_name, device="cpu")
    if lora_rank:
        add_lora(model.lm, lora_rank, lora_alpha)
    net = Network(model)
    state = net.state_dict()
    unknown = [k for k in trained if k not in state]
    if unknown:
        raise ValueError(f"trained weight {unknown[0]!r} is not part of {model_name}")
    state.update({k: v.to(state[k].dtype) for k, v in trained.items()})
    net.load_state_dict(state, strict=True)
    merge_lora(model.lm)
    folder = ckpt.resolve(model_name)
    text_folder = folder / audiocraft_format.T5_FOLDER if audiocraft_format.is_audiocraft(folder) else folder
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_hf(model, tmp, text_folder)
    if (folder / "generation_config.json").is_file():   # transformers' generate() reads its special tokens there
        shutil.copy(folder / "generation_config.json", tmp / "generation_config.json")
    old = dst.with_name(f".{dst.name}.old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst
