"""Helpers of the training tests (tests/test_train*.py): clips on disk, runs of the command line, torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models in one thread: on a busy 2-core machine two threads wait on each other for every small
    operation (a tiny training step took 30x longer). Imported by each training test module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def env() -> dict:
    """Subprocesses as the tests' own process runs: offline, one thread (see one_thread)."""
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


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


def diverse_checkpoint(folder: Path, spm_model: Path, stereo: bool = False) -> Path:
    """A tiny random checkpoint whose codec gives noise many different codes.

    With conftest's random codebooks the tiny codec's latents all fall nearest to one entry per codebook, so every
    clip has the same constant codes and a model learns nothing about them. Here each residual codebook is drawn
    from the latents (and residuals) of noise, as EnCodec's k-means initialisation starts."""
    from conftest import build_hf_model, save_checkpoint

    hf = build_hf_model(stereo=stereo)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = hf.audio_encoder.encoder(0.3 * torch.randn(4, 1, 64000, generator=g))       # (B, D, frames)
        residual = z.transpose(1, 2).reshape(-1, z.shape[1])
        for layer in hf.audio_encoder.quantizer.layers:
            embed = layer.codebook.embed
            embed.copy_(residual[torch.randperm(len(residual), generator=g)[:embed.shape[0]]])
            residual = residual - embed[torch.cdist(residual, embed).argmin(-1)]
            layer.codebook.embed_avg.copy_(embed)
    return save_checkpoint(hf, folder, spm_model)
