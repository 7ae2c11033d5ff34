"""Writing strategies (loudness measured with pyloudnorm, the oracle of our own meter), formats, reading and
resampling."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
import torch

from musicgen.audio import convert_channels, load_audio, loudness, normalize, resample, save_audio

SR = 32000


def music_like(seconds=3.0, seed=0, channels=1, level=0.05):
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    tone = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate([110, 220, 330, 440, 660]))
    beat = (np.sin(2 * np.pi * 2 * t) > 0.9) * g.normal(size=t.shape)
    x = level * (tone + beat)
    return torch.tensor(np.stack([x * (1 - 0.1 * c) for c in range(channels)]), dtype=torch.float32)


@pytest.mark.parametrize("level", [0.001, 0.05, 0.8])
@pytest.mark.parametrize("channels", [1, 2])
def test_loudness_strategy_gives_minus_14_lufs(tmp_path, level, channels):
    path = save_audio(tmp_path / "x.wav", music_like(level=level, channels=channels), SR, strategy="loudness")
    data, sr = sf.read(path)
    assert sr == SR
    assert abs(pyloudnorm.Meter(sr).integrated_loudness(data) + 14.0) < 0.5
    assert np.abs(data).max() < 1.0


@pytest.mark.parametrize("rate", [16000, 32000, 44100, 48000])
@pytest.mark.parametrize("channels, seconds", [(1, 10.0), (2, 3.3), (1, 0.45), (5, 2.0),
                                               (1, 2.76), (2, 0.66), (1, 10.16)])   # a last block past the end
def test_loudness_equals_pyloudnorm(rate, channels, seconds):
    """Our BS.1770 meter (FFT-applied K-weighting, gating) against pyloudnorm's, on noise with a stretch 60 dB
    quieter (under the absolute gate) and one 30 dB quieter (under the relative gate), and on tones across the
    filters' corners."""
    x = np.random.default_rng(channels).standard_normal((channels, int(rate * seconds))) * 0.1
    third = x.shape[1] // 3
    x[:, :third] *= 0.001
    x[:, third:2 * third] *= 0.03
    assert loudness(x, rate) == pytest.approx(pyloudnorm.Meter(rate).integrated_loudness(x.T), abs=1e-6)
    t = np.arange(rate) / rate
    for f in (20.0, 38.0, 440.0, 1500.0, 6000.0):
        tone = 0.5 * np.sin(2 * np.pi * f * t)[None]
        assert loudness(tone, rate) == pytest.approx(pyloudnorm.Meter(rate).integrated_loudness(tone.T), abs=1e-6)


def test_loudness_of_silence_and_gated_out_audio():
    assert loudness(np.zeros((1, SR)), SR) == -math.inf
    quiet = np.random.default_rng(0).standard_normal((1, SR)) * 1e-5
    assert loudness(quiet, SR) == -math.inf                             # every block under the -70 LUFS gate


def test_loud_peaky_audio_is_limited_not_clipped(tmp_path):
    x = music_like(level=0.002)
    x[0, ::3000] = 0.9                                     # sparse spikes: gain to -14 LUFS would push them past 1
    out = normalize(x, SR, "loudness")
    assert np.abs(out).max() <= 10 ** (-0.1 / 20) + 1e-9
    assert abs(loudness(out, SR) + 14.0) < 0.5


def test_peak_clip_and_none(tmp_path):
    x = music_like(level=0.1)
    assert np.abs(x).max() < 1.0
    assert math.isclose(np.abs(normalize(x, SR, "peak")).max(), 10 ** (-1 / 20), rel_tol=1e-6)
    assert np.abs(normalize(x * 10, SR, "clip")).max() == pytest.approx(0.99)
    np.testing.assert_allclose(normalize(x, SR, "none"), x.double().numpy())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        hot = normalize(x * 10, SR, "none")
    assert np.abs(hot).max() <= 1.0 and "clipping" in str(w[0].message)


def test_silence_and_short_clips(tmp_path):
    assert not normalize(torch.zeros(1, 1000), SR).any()
    short = music_like(seconds=0.1, level=0.01)
    assert abs(loudness(normalize(short, SR), SR) + 14.0) < 0.5


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
def test_formats_round_trip(tmp_path, fmt):
    x = music_like(seconds=1.0, channels=2)
    path = save_audio(tmp_path / f"x.{fmt}", x, SR, strategy="peak")
    y, sr = load_audio(path)
    assert sr == SR and y.shape[0] == 2
    assert abs(y.shape[1] - x.shape[1]) < 0.1 * SR            # lossy codecs may pad a frame


def test_bad_arguments(tmp_path):
    x = music_like(seconds=0.5)
    with pytest.raises(ValueError, match="unknown audio format"):
        save_audio(tmp_path / "x.xyz", x, SR)
    with pytest.raises(ValueError, match="unknown strategy"):
        save_audio(tmp_path / "x.wav", x, SR, strategy="loudest")
    with pytest.raises(ValueError, match="does not exist"):
        save_audio(tmp_path / "no" / "x.wav", x, SR)
    with pytest.raises(ValueError, match="NaN"):
        save_audio(tmp_path / "x.wav", x * float("nan"), SR)
    with pytest.raises(ValueError, match="channels, samples"):
        save_audio(tmp_path / "x.wav", x.T, SR)
    assert not list(tmp_path.iterdir())                        # nothing half-written left behind


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.wav"
    path.write_bytes(b"precious")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sf, "write", boom)
    with pytest.raises(RuntimeError):
        save_audio(path, music_like(seconds=0.5), SR)
    assert path.read_bytes() == b"precious" and len(list(tmp_path.iterdir())) == 1


def test_channels_convert_as_audiocraft_converts_them():
    """audiocraft's convert_audio_channels: mono is the mean of all channels, mono is copied, and more channels
    than asked keep the first ones (5.1 into stereo: front left and right, not a mono mix copied twice)."""
    x = torch.randn(6, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(convert_channels(x, 2), x[:2])
    torch.testing.assert_close(convert_channels(x, 1), x.mean(0, keepdim=True))
    assert torch.equal(convert_channels(x[:1], 2), x[:1].expand(2, -1)) and convert_channels(x, 6) is x
    with pytest.raises(ValueError, match="cannot turn 2-channel audio into 3 channels"):
        convert_channels(x[:2], 3)


def test_load_resamples_and_converts_channels(tmp_path):
    t = np.arange(44100) / 44100
    sf.write(tmp_path / "a.wav", np.stack([np.sin(2 * np.pi * 440 * t)] * 2, 1) * 0.5, 44100)
    y, sr = load_audio(tmp_path / "a.wav", sample_rate=SR, channels=1)
    assert sr == SR and y.shape == (1, SR)
    spectrum = np.abs(np.fft.rfft(y[0].numpy()))
    assert abs(np.argmax(spectrum) * SR / y.shape[1] - 440) < 2
    assert torch.equal(resample(y, SR, SR), y)


def test_load_errors(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF nonsense")
    with pytest.raises(ValueError, match="cannot read audio"):
        load_audio(tmp_path / "bad.wav")
    with pytest.raises(ValueError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")


def test_written_files_get_the_mode_open_gives(tmp_path):
    """Audio and evaluation reports are written through a private temporary file (mkstemp: 0600) and renamed;
    the result has the mode a file created with open() would have: 0666 less the umask."""
    import os

    from musicgen.eval.report import atomic_write

    mask = os.umask(0o027)
    try:
        save_audio(tmp_path / "a.wav", torch.zeros(1, 3200), 32000, strategy="none")
        atomic_write(tmp_path / "r.json", "{}")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.wav").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640

