"""Helpers of the training tests (tests/test_train*.py): clips on disk, runs of the command line, torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

CAPTIONS = ["lofi hip hop beat with mellow piano", "epic orchestral soundtrack", "techno with driving kick drum"]


def write_clips(folder: Path, seconds: float = 0.4, captions=CAPTIONS, sr: int = 32000, channels: int = 1,
                seed: int = 0) -> Path:
    """One noise clip per caption (clip0.wav + clip0.txt, ...); noise, so that every clip has codes of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, caption in enumerate(captions):
        sf.write(folder / f"clip{i}.wav", (0.3 * rng.standard_normal((int(sr * seconds), channels))).astype(np.float32), sr)
        (folder / f"clip{i}.txt").write_text(caption)
    return folder


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")


def run_cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "musicgen", *map(str, args)], capture_output=True, text=True,
                          env=env(), timeout=timeout)


def torchrun(nproc: int, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m musicgen ARGS` (gloo on CPU)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "musicgen", *map(str, args)], capture_output=True, text=True, env=env(),
                          timeout=timeout)


def final_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def assert_states_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst:.3g} (> {atol:g})"
