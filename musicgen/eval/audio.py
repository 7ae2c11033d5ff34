"""Audio as each metric sees it.

Every conversion is audiocraft's `convert_audio`: julius' windowed-sinc `resample_frac` at the clip's own rate
and length, then the mean over channels. FAD adds what happens to a clip between audiocraft's FAD and the
log-mel of Google's TensorFlow code: audiocraft writes it at 16 kHz with its peak at -1 dBFS
(`audio_write(strategy="peak")`) as 16-bit PCM (ffmpeg's float -> s16: round to nearest, clip); Google's
reader keeps the int16 values as they are (scipy, no division by 32768), and AudioSetModel divides the whole
clip by its largest positive sample (at least 0.1) before cutting it into windows.
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
    """(samples,) at 16 kHz -> float64 (samples,), the samples Google's FAD code computes features from:
    peak at -1 dBFS, rounded to int16 (audiocraft's file), then divided by max(0.1, the largest int16 value)
    (AudioSetModel.extract_features, normalize=True). The largest value, not the largest magnitude: a clip
    whose negative peak is deeper ends up below -1. A silent clip stays silent (audiocraft would divide by
    its zero peak)."""
    if mono.numel() == 0:
        return mono.double()
    peak = mono.abs().max()
    if peak > 0:
        mono = mono * (PEAK / peak)
    pcm = (mono * 32768.0).round().clamp(-32768, 32767).double()
    return pcm / max(0.1, float(pcm.max()))


def is_silent(wav: torch.Tensor) -> bool:
    return not bool(wav.abs().max() > 0)
