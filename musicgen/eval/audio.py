"""Audio as each metric sees it.

Every conversion is audiocraft's `convert_audio`: julius' windowed-sinc `resample_frac` at the clip's own rate
and length, then the mean over channels. FAD adds what audiocraft's FAD does before Google's TensorFlow code
reads the files: each clip scaled so its peak sits at -1 dBFS (`audio_write(strategy="peak")`) and stored as
16-bit PCM (ffmpeg's float -> s16: round to nearest, clip), which the reader divides by 32768 again.
"""
from __future__ import annotations

import os

import torch

PEAK = 10 ** (-1.0 / 20)   # audiocraft's peak_clip_headroom_db = 1


def read(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """Any file libsndfile reads -> (float32 (channels, samples), sample_rate); ValueError for an empty one."""
    from ..audio import load_audio

    return load_audio(path)


def convert_audio(wav: torch.Tensor, from_rate: int, to_rate: int) -> torch.Tensor:
    """(channels, samples) at from_rate -> mono (samples',) float32 at to_rate: julius, then the channel mean."""
    import julius

    wav = wav.float()
    if from_rate != to_rate:
        wav = julius.resample_frac(wav, int(from_rate), int(to_rate))
    return wav.mean(dim=0)


def fad_waveform(mono: torch.Tensor) -> torch.Tensor:
    """(samples,) -> the same after the trip through audiocraft's FAD files: peak at -1 dBFS, then 16-bit PCM.
    A silent clip stays silent (audiocraft would divide by its zero peak)."""
    if mono.numel() == 0:
        return mono
    peak = mono.abs().max()
    if peak > 0:
        mono = mono * (PEAK / peak)
    return (mono * 32768.0).round().clamp(-32768, 32767) / 32768.0


def is_silent(wav: torch.Tensor) -> bool:
    return not bool(wav.abs().max() > 0)
