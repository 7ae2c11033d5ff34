"""Melody conditioning: the chromagram of a reference recording, as audiocraft's ChromaStemConditioner makes it.

    melody (channels, samples) at any rate
      -> mono, resampled to 32 kHz
      -> [Demucs htdemucs: keep vocals + other, i.e. drop drums and bass]     (when `demucs` is installed)
      -> power STFT (n_fft 16384, hop 4096, Hann, centred, normalised)
      -> 12 pitch-class filter bank (librosa's chroma filters, starting at C)
      -> max-normalised per frame, then argmax one-hot                        (T, 12)
      -> repeated / cut to the `chroma_length` frames (235 = 30 s) the LM saw in training

The chroma frame rate is 32000 / 4096 = 7.8 Hz: one chroma vector per 4096 samples, whatever the LM frame
rate. A melody shorter than 30 s is looped (`torch.repeat`, as audiocraft with match_len_on_eval), a longer
one is cut; long-form generation slides over the melody itself (see longform.py).
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from .audio import convert_channels, resample
from .config import MelodyConfig

CHROMA_SAMPLE_RATE = 32000


@functools.lru_cache(maxsize=4)
def chroma_filters(sample_rate: int, n_fft: int, num_chroma: int = 12) -> torch.Tensor:
    """(num_chroma, n_fft // 2 + 1) filter bank, librosa.filters.chroma(tuning=0, ctroct=5, octwidth=2, norm=2)."""
    freqs = np.linspace(0, sample_rate, n_fft, endpoint=False)[1:]
    bins = num_chroma * np.log2(freqs / (440.0 / 16))                         # fractional pitch classes above C0-ish
    bins = np.concatenate(([bins[0] - 1.5 * num_chroma], bins))                # 0 Hz: 1.5 octaves below bin 1
    widths = np.concatenate((np.maximum(bins[1:] - bins[:-1], 1.0), [1]))
    d = np.subtract.outer(bins, np.arange(num_chroma, dtype="d")).T            # (num_chroma, n_fft)
    half = np.round(num_chroma / 2)
    d = np.remainder(d + half + 10 * num_chroma, num_chroma) - half            # wrap into -6..6 semitones
    w = np.exp(-0.5 * (2 * d / np.tile(widths, (num_chroma, 1))) ** 2)         # Gaussian bumps per pitch class
    w = w / np.sqrt(np.sum(w ** 2, axis=0, keepdims=True))
    w *= np.tile(np.exp(-0.5 * ((bins / num_chroma - 5.0) / 2.0) ** 2), (num_chroma, 1))  # favour octaves near C5
    w = np.roll(w, -3 * (num_chroma // 12), axis=0)                            # start at C, not A
    return torch.from_numpy(np.ascontiguousarray(w[:, : n_fft // 2 + 1])).float()


def power_spectrogram(wav: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """(B, samples) -> (B, n_fft // 2 + 1, frames) |STFT|^2, torchaudio.transforms.Spectrogram(normalized=True)."""
    window = torch.hann_window(n_fft, dtype=wav.dtype, device=wav.device)
    spec = torch.stft(wav, n_fft, hop, window=window, center=True, pad_mode="reflect", return_complex=True)
    spec = spec / window.pow(2).sum().sqrt()                                  # "normalized": unit-energy window
    return spec.abs().pow(2)


def chromagram(wav: torch.Tensor, cfg: MelodyConfig, sample_rate: int = CHROMA_SAMPLE_RATE) -> torch.Tensor:
    """(B, samples) mono at `sample_rate` -> argmax one-hot chroma (B, frames, num_chroma), frames = 1 + n // hop."""
    wav = wav.float()
    if wav.shape[-1] < cfg.n_fft:   # too short for one window: zero-pad both sides (as audiocraft's ChromaExtractor)
        pad = cfg.n_fft - wav.shape[-1]
        wav = torch.nn.functional.pad(wav, (pad // 2, pad - pad // 2))
    spec = power_spectrogram(wav, cfg.n_fft, cfg.hop_length)                  # (B, F, T)
    raw = torch.einsum("cf,bft->bct", chroma_filters(sample_rate, cfg.n_fft, cfg.num_chroma).to(wav.device), spec)
    norm = torch.nn.functional.normalize(raw, p=float("inf"), dim=1, eps=1e-6).transpose(1, 2)  # (B, T, 12)
    return torch.nn.functional.one_hot(norm.argmax(-1), cfg.num_chroma).float()


def fit_length(chroma: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T, C) -> (B, length, C): loop a short chroma, cut a long one (audiocraft's match_len_on_eval)."""
    if chroma.shape[1] < length:
        chroma = chroma.repeat(1, -(-length // chroma.shape[1]), 1)
    return chroma[:, :length]


def null_chroma(batch: int, cfg: MelodyConfig, device=None) -> torch.Tensor:
    """Chroma of "no melody": the argmax of an all-zero chromagram, i.e. one-hot on pitch class 0 everywhere."""
    chroma = torch.zeros(batch, cfg.chroma_length, cfg.num_chroma, device=device)
    chroma[..., 0] = 1
    return chroma


# -- preparing the reference audio ---------------------------------------------------------------------------
def prepare_melody(wav: torch.Tensor, sample_rate: int, demucs: bool = True) -> torch.Tensor:
    """(channels, samples) or (samples,) at `sample_rate` -> mono (samples,) at 32 kHz, drums and bass removed
    when Demucs is available and asked for."""
    if not isinstance(wav, torch.Tensor):
        wav = torch.as_tensor(np.asarray(wav), dtype=torch.float32)
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2:
        raise ValueError(f"a melody must be (channels, samples) or (samples,), got shape {tuple(wav.shape)}")
    if wav.shape[-1] == 0:
        raise ValueError("the melody is empty (0 samples)")
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"melody_sample_rate must be a positive integer, got {sample_rate!r}")
    if not torch.isfinite(wav).all():
        raise ValueError("the melody holds NaN or infinite samples")
    # audiocraft's route: the melody at the codec's rate, down-mixed to mono, then (with Demucs) up to Demucs'
    # rate and channels and back
    wav = resample(convert_channels(wav.float().cpu(), 1), sample_rate, CHROMA_SAMPLE_RATE)[0]
    return separate(wav) if demucs else wav


def separate(wav: torch.Tensor) -> torch.Tensor:
    """Mono (samples,) at 32 kHz -> the same without drums and bass, where Demucs is installed (else as it is,
    said once)."""
    return _separate(wav[None], CHROMA_SAMPLE_RATE) if _demucs_available() else wav


@functools.lru_cache(maxsize=1)
def _demucs_available() -> bool:
    try:
        import demucs  # noqa: F401
    except ImportError:
        warnings.warn("the 'demucs' package is not installed: melody chroma is taken from the full mix, without "
                      "removing drums and bass as the original does (pip install demucs; or pass demucs=False / "
                      "--no-demucs to silence this)", stacklevel=4)
        return False
    return True


@functools.lru_cache(maxsize=1)
def _demucs_model():
    from demucs import pretrained

    return pretrained.get_model("htdemucs").eval()


def _separate(wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Keep the vocals and 'other' stems of htdemucs (audiocraft's choice): (1, samples) at `sample_rate` ->
    mono (samples,) at 32 kHz."""
    from demucs.apply import apply_model

    model = _demucs_model()
    x = resample(convert_channels(wav, model.audio_channels), sample_rate, model.samplerate)
    with torch.inference_mode():
        stems = apply_model(model, x[None])[0]                                 # (sources, channels, samples)
    keep = [model.sources.index("vocals"), model.sources.index("other")]
    mix = stems[keep].sum(0)
    return resample(convert_channels(mix, 1), model.samplerate, CHROMA_SAMPLE_RATE)[0]
