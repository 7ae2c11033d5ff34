"""Reading and writing audio files, resampling, and loudness normalisation.

Writing follows audiocraft's `audio_write` strategies:

    loudness  gain to -14 LUFS (ITU-R BS.1770-4 integrated loudness); a soft limiter takes any peak
              the gain would push past -0.1 dBFS, and the gain is re-measured so the file still reads -14 LUFS
    peak      scale so the peak sits at -1 dBFS
    clip      hard-limit to +-0.99 (the caller asked for it)
    none      write the samples as they are, unless they would clip: then scaled down, with a warning

The file is written beside its destination and renamed into place, so a failed write never leaves half a
file or destroys an existing one.
"""
from __future__ import annotations

import functools
import math
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from .files import write_atomically

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"),
           "mp3": ("MP3", "MPEG_LAYER_III")}
STRATEGIES = ("loudness", "peak", "clip", "none")
CEILING = 10 ** (-0.1 / 20)          # -0.1 dBFS: the highest peak we ever write
PEAK_TARGET = 10 ** (-1.0 / 20)      # "peak" strategy: -1 dBFS, as audiocraft's peak_clip_headroom_db=1
BLOCK_SECONDS = 0.4                  # BS.1770 gating block


def _as_array(audio) -> np.ndarray:
    """(channels, samples) or (samples,) tensor/array -> float64 (channels, samples)."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(audio, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ValueError(f"audio must be (channels, samples) or (samples,), got shape {a.shape}")
    if a.shape[0] > 8 and a.shape[1] <= 8:
        raise ValueError(f"audio looks like (samples, channels) {a.shape}; pass (channels, samples)")
    if not np.isfinite(a).all():
        raise ValueError("audio holds NaN or infinite samples")
    return a


def loudness(audio, sample_rate: int) -> float:
    """Integrated loudness in LUFS (BS.1770-4 K-weighting and gating). Clips shorter than one 400 ms block are
    measured on their periodic extension. Silence gives -inf.

    The filters and gates are those of pyloudnorm's meter, which the tests hold this to (within 1e-6 LU); it
    is written here because pyloudnorm imports scipy.signal, 0.7 s of every `musicgen generate`."""
    a = _as_array(audio)
    if not np.any(a):
        return -math.inf
    need = int(math.ceil(BLOCK_SECONDS * sample_rate)) + 1
    if a.shape[1] < need:
        a = np.tile(a, (1, need // a.shape[1] + 1))
    weighted = _k_weighting(a, sample_rate)
    # mean square of each channel over 400 ms blocks starting every 100 ms (75 % overlap)
    T = a.shape[1] / sample_rate
    blocks = int(np.round((T - BLOCK_SECONDS) / (BLOCK_SECONDS * 0.25))) + 1
    starts = [int(BLOCK_SECONDS * j * 0.25 * sample_rate) for j in range(blocks)]
    # the block count is rounded, so the last block may run past the end: as in pyloudnorm, it then holds the
    # samples there are, over a whole block's length
    ends = [min(int(BLOCK_SECONDS * (j * 0.25 + 1) * sample_rate), a.shape[1]) for j in range(blocks)]
    power = np.concatenate([np.zeros((a.shape[0], 1)), np.cumsum(weighted ** 2, axis=1)], axis=1)
    z = (power[:, ends] - power[:, starts]) / (BLOCK_SECONDS * sample_rate)             # (channels, blocks)
    gains = np.array([1.0, 1.0, 1.0, 1.41, 1.41][:a.shape[0]] + [1.0] * (a.shape[0] - 5))[:, None]

    def lufs(zs: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return -0.691 + 10 * np.log10((gains * zs).sum(axis=0))

    block_loudness = lufs(z)
    kept = block_loudness > -70.0                                       # absolute gate
    if not kept.any():
        return -math.inf
    relative = lufs(z[:, kept].mean(axis=1, keepdims=True))[0] - 10.0    # relative gate
    kept &= block_loudness > relative
    if not kept.any():
        return -math.inf
    return float(lufs(z[:, kept].mean(axis=1, keepdims=True))[0])


def _biquad(kind: str, gain_db: float, q: float, fc: float, rate: int) -> tuple[tuple, tuple]:
    """(b, a) of an RBJ audio-EQ-cookbook high shelf or high pass, normalised so a[0] = 1."""
    A, w0 = 10 ** (gain_db / 40), 2 * math.pi * fc / rate
    alpha, cos = math.sin(w0) / (2 * q), math.cos(w0)
    if kind == "high_shelf":
        r = 2 * math.sqrt(A) * alpha
        b = (A * ((A + 1) + (A - 1) * cos + r), -2 * A * ((A - 1) + (A + 1) * cos), A * ((A + 1) + (A - 1) * cos - r))
        a = ((A + 1) - (A - 1) * cos + r, 2 * ((A - 1) - (A + 1) * cos), (A + 1) - (A - 1) * cos - r)
    else:   # high pass
        b = ((1 + cos) / 2, -(1 + cos), (1 + cos) / 2)
        a = (1 + alpha, -2 * cos, 1 - alpha)
    return tuple(x / a[0] for x in b), tuple(x / a[0] for x in a)


def _k_weighting(a: np.ndarray, rate: int) -> np.ndarray:
    """BS.1770's K-weighting (a +4 dB shelf above 1.5 kHz, then a 38 Hz high pass) of (channels, samples), as
    the two recursive filters would give from silence: their product applied as one FFT convolution. The
    padding outlasts both impulse responses (they fall below 1e-30 within about 16000 samples at 48 kHz), so the
    circular product equals the recursion to float64 rounding."""
    n_in = a.shape[1]
    tail = max(16384, int(rate))                 # the high pass's slowest pole: r = 0.995 at 48 kHz
    n = _fft_size(n_in + tail)
    spectrum = torch.fft.rfft(torch.from_numpy(a), n, dim=1) * _k_response(n, rate)   # torch's FFT: 3x numpy's
    return torch.fft.irfft(spectrum, n, dim=1)[:, :n_in].numpy()


@functools.lru_cache(maxsize=4)   # normalize measures the same length again after limiting
def _k_response(n: int, rate: int) -> torch.Tensor:
    """The K-weighting filters' frequency response at the n-point FFT's bins (n // 2 + 1 of them)."""
    z = torch.polar(torch.ones(n // 2 + 1, dtype=torch.float64),
                    -2 * math.pi / n * torch.arange(n // 2 + 1, dtype=torch.float64))   # e^{-jw}
    response = torch.ones_like(z)
    for kind, g, q, fc in (("high_shelf", 4.0, 1 / math.sqrt(2), 1500.0), ("high_pass", 0.0, 0.5, 38.0)):
        b, den = _biquad(kind, g, q, fc, rate)
        response *= (b[0] + b[1] * z + b[2] * z * z) / (den[0] + den[1] * z + den[2] * z * z)
    return response


def _fft_size(m: int) -> int:
    """The smallest 2^i 3^j 5^k >= m (sizes the FFT splits well)."""
    best, p5 = 1 << (m - 1).bit_length(), 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35 << max(0, (-(-m // p35) - 1).bit_length())   # times the power of 2 that reaches m
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def _soft_limit(a: np.ndarray, threshold: float, ceiling: float) -> np.ndarray:
    """Identity below `threshold`; above it a tanh knee that approaches (never reaches) `ceiling`."""
    mag = np.abs(a)
    over = mag > threshold
    if not over.any():
        return a
    room = ceiling - threshold
    out = a.copy()
    out[over] = np.sign(a[over]) * (threshold + room * np.tanh((mag[over] - threshold) / room))
    return out


def normalize(audio, sample_rate: int, strategy: str = "loudness", loudness_db: float = -14.0) -> np.ndarray:
    """Apply a writing strategy; returns float64 (channels, samples) whose peak never exceeds 1."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    a = _as_array(audio)
    peak = float(np.abs(a).max()) if a.size else 0.0
    if strategy == "none":
        if peak > 1.0:
            warnings.warn(f"audio peaks at {peak:.3f}; scaled down to avoid clipping", stacklevel=2)
            return a * (CEILING / peak)
        return a
    if strategy == "clip":
        return np.clip(a, -0.99, 0.99)
    if peak == 0.0:
        return a
    if strategy == "peak":
        return a * (PEAK_TARGET / peak)
    current = loudness(a, sample_rate)
    out = a * 10 ** ((loudness_db - current) / 20)
    for _ in range(6):   # limit the peaks, then restore the loudness the limiter took away
        if np.abs(out).max() <= CEILING:
            break
        out = _soft_limit(out, 0.5 * CEILING, CEILING)
        gain = 10 ** ((loudness_db - loudness(out, sample_rate)) / 20)
        out = out * gain
    peak = float(np.abs(out).max())
    if peak > CEILING:   # still too hot for the target: give up loudness rather than clip
        warnings.warn(f"cannot reach {loudness_db:g} LUFS without clipping; reached "
                      f"{loudness(out * CEILING / peak, sample_rate):.1f} LUFS", stacklevel=2)
        out = out * (CEILING / peak)
    return out


def save_audio(path: str | os.PathLike, audio, sample_rate: int, strategy: str = "loudness",
               loudness_db: float = -14.0, format: str | None = None) -> Path:
    """Write (channels, samples) audio to wav / flac / ogg / mp3 after a normalisation strategy."""
    import soundfile as sf

    path = Path(path)
    fmt = (format or path.suffix.lstrip(".") or "wav").lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown audio format {fmt!r}: choose one of {', '.join(FORMATS)}")
    major, subtype = FORMATS[fmt]
    if major not in sf.available_formats() or subtype not in sf.available_subtypes(major):
        raise ValueError(f"this system's libsndfile cannot write {fmt}; use wav or flac")
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    data = normalize(audio, sample_rate, strategy, loudness_db)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"output folder {folder} does not exist")
    write_atomically(path, lambda tmp: sf.write(tmp, data.T.astype(np.float32), sample_rate, format=major,
                                                subtype=subtype), suffix=f".{fmt}")
    return path


def resample(audio: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resampling along the last axis as audiocraft's `convert_audio` does it: julius' windowed-sinc
    `resample_frac` with its defaults, int(samples * new_sr / orig_sr) samples out. Prompts, melodies and
    training audio then give audiocraft's codes and chroma (its length included)."""
    if orig_sr == new_sr:
        return audio
    import julius

    dtype = audio.dtype if audio.is_floating_point() else torch.float32
    return julius.resample_frac(audio.detach().float(), int(orig_sr), int(new_sr)).to(dtype)


def convert_channels(audio: torch.Tensor, channels: int) -> torch.Tensor:
    """(C, T) -> (channels, T) as audiocraft's convert_audio_channels: mono is the mean of every channel, mono
    audio is copied to each channel, and audio with more channels than asked keeps its first ones (stereo from
    5.1 is its front left and right)."""
    c = audio.shape[0]
    if c == channels:
        return audio
    if channels == 1:
        return audio.mean(dim=0, keepdim=True)
    if c == 1:
        return audio.expand(channels, -1).clone()
    if c > channels:
        return audio[:channels].clone()
    raise ValueError(f"cannot turn {c}-channel audio into {channels} channels")


def load_audio(path: str | os.PathLike, sample_rate: int | None = None,
               channels: int | None = None) -> tuple[torch.Tensor, int]:
    """Read any format libsndfile knows -> (float32 (channels, samples), sample_rate), optionally converted."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"audio file {path} does not exist")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError for anything unreadable
        raise ValueError(f"cannot read audio file {path}: {e}") from e
    if data.shape[0] == 0:
        raise ValueError(f"audio file {path} is empty")
    audio = torch.from_numpy(np.ascontiguousarray(data.T))
    if channels is not None:
        audio = convert_channels(audio, channels)
    if sample_rate is not None and sample_rate != sr:
        audio, sr = resample(audio, sr, sample_rate), sample_rate
    return audio.float(), sr


# -- 16-bit WAV written as it is generated (streams) ------------------------------------------------------
def wav_header(sample_rate: int, channels: int) -> bytes:
    """RIFF/WAVE header for 16-bit PCM whose length is not known yet (sizes set to the maximum)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16) +
            b"data" + struct.pack("<I", unknown - 36))


def pcm16(audio: torch.Tensor) -> bytes:
    """(channels, samples) float -> interleaved little-endian int16 bytes (clipped, not normalised)."""
    a = (audio.clamp(-1, 1) * 32767).round().to(torch.int16)
    return a.t().contiguous().numpy().tobytes()
