"""Melody conditioning against transformers' MusicgenMelody (chroma features and greedy generation)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from musicgen import chroma
from musicgen.audio import resample
from musicgen.config import MelodyConfig

PROMPTS = ["80s pop track with bassy drums and synth", "lofi"]


def tone(seconds: float, sr: int = 32000, freqs=(261.63, 392.0, 329.63), channels: int = 1) -> torch.Tensor:
    """A little tune: one note after another, (channels, samples)."""
    n = int(seconds * sr)
    t = torch.arange(n) / sr
    f = torch.tensor(freqs)[(torch.arange(n) * len(freqs) // n).clamp(max=len(freqs) - 1)]
    wav = 0.5 * torch.sin(2 * math.pi * f * t) + 0.05 * torch.randn(n, generator=torch.Generator().manual_seed(0))
    return wav.expand(channels, n).clone()


def reference_chroma(wav: np.ndarray) -> torch.Tensor:
    """MusicgenMelodyFeatureExtractor's own chroma step on a numpy spectrogram.

    The extractor needs torchaudio for its Spectrogram, which this environment lacks; its documented settings
    (Hann window, centred with reflect padding, normalised, power 2) are computed here in numpy, and the
    extractor's filter bank, normalisation and argmax code run unchanged."""
    from transformers.models.musicgen_melody.feature_extraction_musicgen_melody import MusicgenMelodyFeatureExtractor
    from transformers.audio_utils import chroma_filter_bank

    n_fft, hop = 16384, 4096
    x = np.pad(wav, (n_fft // 2, n_fft // 2), mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)        # periodic Hann
    frames = np.stack([x[i:i + n_fft] for i in range(0, len(x) - n_fft + 1, hop)])
    spec = np.abs(np.fft.rfft(frames * window, axis=-1) / np.sqrt((window ** 2).sum())) ** 2
    fe = object.__new__(MusicgenMelodyFeatureExtractor)
    fe.n_fft, fe.hop_length = n_fft, hop
    fe.chroma_filters = torch.from_numpy(chroma_filter_bank(sampling_rate=32000, num_frequency_bins=n_fft, tuning=0,
                                                            num_chroma=12)).float()
    fe.spectrogram = lambda w: torch.from_numpy(spec.T[None]).float()
    return fe._torch_extract_fbank_features(torch.from_numpy(wav)[None])


def test_filter_bank_equals_transformers():
    from transformers.audio_utils import chroma_filter_bank

    ref = chroma_filter_bank(sampling_rate=32000, num_frequency_bins=16384, tuning=0, num_chroma=12)
    torch.testing.assert_close(chroma.chroma_filters(32000, 16384), torch.from_numpy(ref).float())


def test_chromagram_equals_feature_extractor():
    wav = tone(3.0)[0]
    ours = chroma.chromagram(wav[None], MelodyConfig())                       # (1, frames, 12)
    ref = reference_chroma(wav.numpy().astype(np.float64))
    assert ours.shape == ref.shape == (1, 1 + wav.shape[0] // 4096, 12)
    assert torch.equal(ours, ref)
    assert torch.equal(ours.sum(-1), torch.ones(1, ours.shape[1]))           # one-hot per frame
    # the three notes C, G, E show up as pitch classes 0, 7, 4
    assert set(ours[0].argmax(-1).tolist()) == {0, 7, 4}


def test_chroma_fits_the_training_length():
    c = torch.eye(12)[None, :5]                                               # (1, 5, 12)
    looped = chroma.fit_length(c, 12)
    assert looped.shape == (1, 12, 12) and torch.equal(looped[0, 5:10], c[0])
    assert chroma.fit_length(torch.eye(12)[None].repeat(1, 30, 1), 235).shape == (1, 235, 12)
    assert chroma.fit_length(torch.eye(12)[None].repeat(1, 30, 1), 100).shape == (1, 100, 12)


def _hf_greedy(hf_model, frames, capture, **inputs):
    K = hf_model.decoder.num_codebooks
    decode = hf_model.audio_encoder.decode

    def spy(codes, *a, **kw):
        capture.append(codes[0].clone())
        return decode(codes, *a, **kw)

    hf_model.audio_encoder.decode = spy
    try:
        with torch.no_grad():
            return hf_model.generate(**inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=frames + K - 1)
    finally:
        del hf_model.audio_encoder.decode


def test_melody_checkpoint_loads_with_chroma_projection(melody_model):
    assert melody_model.supports_melody and melody_model.cfg.melody.chroma_length == 24
    assert melody_model.chroma_proj is not None and melody_model.lm.layers[0].cross_attn is None


@pytest.mark.parametrize("with_melody", [True, False])
def test_greedy_melody_generation_matches_transformers(melody_model, hf_melody_model, hf_tokenizer, with_melody):
    frames = 12
    melody = tone(1.5)
    inputs = dict(hf_tokenizer(PROMPTS, padding=True, return_tensors="pt"))
    if with_melody:
        feats = chroma.chromagram(melody, MelodyConfig())                     # (1, 12, 12)
        inputs["input_features"] = feats.expand(len(PROMPTS), -1, -1)
    captured = []
    ref_audio = _hf_greedy(hf_melody_model, frames, captured, **inputs)
    kw = dict(melody=melody, melody_sample_rate=32000, demucs=False) if with_melody else {}
    codes = melody_model.generate_codes(PROMPTS, duration=frames / 50, top_k=1, guidance_scale=3.0, **kw)
    assert torch.equal(codes, captured[0])
    audio = melody_model.decode(codes)
    torch.testing.assert_close(audio, ref_audio, atol=1e-4, rtol=0)


def test_one_melody_per_prompt_and_resampling(melody_model):
    a, b = tone(1.0), tone(1.0, freqs=(440.0, 220.0))
    both = melody_model.generate_codes(PROMPTS, duration=0.2, top_k=1, melody=[a, b], demucs=False)
    first = melody_model.generate_codes(PROMPTS[:1], duration=0.2, top_k=1, melody=a, demucs=False)
    assert torch.equal(both[:1], first)
    # the same melody at 48 kHz, stereo: resampled and down-mixed, same chroma
    a48 = torch.from_numpy(__import__("scipy.signal", fromlist=["x"]).resample_poly(a.numpy(), 3, 2, axis=-1)).float()
    again = melody_model.generate_codes(PROMPTS[:1], duration=0.2, top_k=1, melody=a48.expand(2, -1),
                                        melody_sample_rate=48000, demucs=False)
    assert torch.equal(again, first)


def test_melody_without_demucs_says_so_once(melody_model):
    chroma._demucs_available.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        melody_model.generate_codes(["x"], duration=0.1, top_k=1, melody=tone(0.5))
        melody_model.generate_codes(["x"], duration=0.1, top_k=1, melody=tone(0.5))
    messages = [str(w.message) for w in caught if "demucs" in str(w.message)]
    assert len(messages) == 1 and "not installed" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        melody_model.generate_codes(["x"], duration=0.1, top_k=1, melody=tone(0.5), demucs=False)


def test_demucs_keeps_vocals_and_other_stems(monkeypatch):
    """With demucs installed, the melody is htdemucs' vocals + other stems (drums and bass dropped), mono at
    32 kHz, as audiocraft's ChromaStemConditioner does. demucs' weights cannot be downloaded here, so a stand-in
    package with demucs' interface (pretrained.get_model, apply_model, sources, samplerate, audio_channels)
    returns known stems; the separation network itself is demucs' code, not ours."""
    import sys
    import types

    rate, seen = 44100, {}

    class FakeHTDemucs:
        sources = ["drums", "bass", "other", "vocals"]
        samplerate, audio_channels = rate, 2

        def eval(self):
            return self

    def apply_model(model, mix):
        seen["mix"] = mix                                          # (1, 2, samples) at 44.1 kHz
        t = torch.arange(mix.shape[-1]) / rate
        stems = [torch.sin(2 * math.pi * f * t).expand(2, -1) for f in (60.0, 80.0, 440.0, 660.0)]
        return torch.stack(stems)[None] * 0.25                     # (1, sources, channels, samples)

    fake = types.ModuleType("demucs")
    fake.pretrained = types.SimpleNamespace(get_model=lambda name: seen.setdefault("name", name) and FakeHTDemucs())
    fake.apply = types.SimpleNamespace(apply_model=apply_model)
    monkeypatch.setitem(sys.modules, "demucs", fake)
    monkeypatch.setitem(sys.modules, "demucs.pretrained", fake.pretrained)
    monkeypatch.setitem(sys.modules, "demucs.apply", fake.apply)
    chroma._demucs_available.cache_clear()
    chroma._demucs_model.cache_clear()
    try:
        out = chroma.prepare_melody(tone(1.0, sr=16000), 16000, demucs=True)
    finally:
        chroma._demucs_available.cache_clear()
        chroma._demucs_model.cache_clear()
    assert seen["name"] == "htdemucs" and seen["mix"].shape == (1, 2, rate)   # stereo at demucs' rate
    t = torch.arange(rate) / rate
    kept = 0.25 * (torch.sin(2 * math.pi * 440.0 * t) + torch.sin(2 * math.pi * 660.0 * t))     # other + vocals
    expected = resample(kept[None], rate, 32000)[0]
    assert out.shape == expected.shape == (32000,)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    no_drums = chroma.prepare_melody(tone(1.0, sr=16000), 16000, demucs=False)   # demucs=False: the full mix
    assert not torch.allclose(no_drums, out, atol=1e-2)


@pytest.mark.parametrize("melody, kwargs, message", [
    (torch.zeros(1, 0), {}, "empty"),
    (torch.zeros(2, 2, 100), {}, "inconsistent batch"),
    (torch.full((1, 1000), float("nan")), {}, "NaN"),
    (torch.zeros(1000, 2), {}, "not \\(samples, channels\\)"),
    (torch.zeros(1, 1000), dict(melody_sample_rate=0), "melody_sample_rate"),
])
def test_bad_melodies(melody_model, melody, kwargs, message):
    with pytest.raises(ValueError, match=message):
        melody_model.generate_codes(["x"], duration=0.1, melody=melody, demucs=False, **kwargs)


def test_melody_given_to_a_text_model(model):
    with pytest.raises(ValueError, match="no melody conditioning"):
        model.generate_codes(["x"], duration=0.1, melody=tone(0.5))


@pytest.fixture
def fake_demucs(monkeypatch):
    """Demucs (weights from the internet) stood in for by a recorder: its inputs go to the returned list; its
    stems are fixed gains of the input (drums 10, bass 20, other 1, vocals 2; right channel x -0.5)."""
    import sys
    import types

    seen = []

    class Separator:
        samplerate, audio_channels = 44100, 2
        sources = ["drums", "bass", "other", "vocals"]

    def apply_model(model, x):
        seen.append(x.clone())
        gains = torch.tensor([10.0, 20.0, 1.0, 2.0])
        return gains[None, :, None, None] * x[:, None] * torch.tensor([1.0, -0.5])[None, None, :, None]

    demucs = types.ModuleType("demucs")
    demucs.apply = types.SimpleNamespace(apply_model=apply_model)
    monkeypatch.setitem(sys.modules, "demucs", demucs)
    monkeypatch.setitem(sys.modules, "demucs.apply", demucs.apply)
    monkeypatch.setattr(chroma, "_demucs_model", lambda: Separator())
    chroma._demucs_available.cache_clear()
    yield seen
    chroma._demucs_available.cache_clear()


def test_demucs_route_is_audiocraft_s(fake_demucs):
    """With Demucs the melody goes as in audiocraft's generate_with_chroma and ChromaStemConditioner: to 32 kHz
    mono, then to Demucs' rate and channels; the vocals and 'other' stems are summed, down-mixed and brought back
    to 32 kHz."""
    import julius

    wav = tone(0.5, sr=48000, channels=2) * torch.tensor([[1.0], [0.3]])  # a stereo tune at 48 kHz
    out = chroma.prepare_melody(wav, 48000, demucs=True)
    mono32 = julius.resample_frac(wav.mean(0, keepdim=True), 48000, 32000)
    expected_in = julius.resample_frac(mono32, 32000, 44100).expand(2, -1)
    torch.testing.assert_close(fake_demucs[0][0], expected_in)
    mix = 3.0 * expected_in * torch.tensor([[1.0], [-0.5]])                  # other + vocals, per channel
    torch.testing.assert_close(out, julius.resample_frac(mix.mean(0), 44100, 32000))


def test_long_form_separates_each_window_s_melody(melody_ckpt_dir, fake_demucs):
    """audiocraft's long-form hands each window the melody under it and its conditioner runs Demucs on that
    slice; one window runs it on the whole melody."""
    import dataclasses

    import julius

    import musicgen

    m = musicgen.load(melody_ckpt_dir)
    m.cfg = dataclasses.replace(m.cfg, max_duration=0.4)                    # 0.4 s windows, 12800 samples
    tune = tone(1.0)
    m.generate_codes(["folk"], melody=tune, duration=0.3, top_k=1)
    assert [x.shape[-1] for x in fake_demucs] == [44100]                   # one window: the whole second
    fake_demucs.clear()
    m.generate_codes(["folk"], melody=tune, duration=0.6, extend_stride=0.2, top_k=1)
    assert len(fake_demucs) == 2                                           # two windows, 0.2 s apart
    for x, start in zip(fake_demucs, (0, 6400)):
        under = tune[0, start:start + 12800]
        torch.testing.assert_close(x[0, 0], julius.resample_frac(under, 32000, 44100))


def test_rows_without_melody_get_the_null_chroma(melody_model):
    """melody=[wav, None]: the second row is conditioned on its text alone (the text prefix padded as in the batch:
    melody checkpoints see the padding)."""
    a = tone(1.0)
    kw = dict(duration=0.2, top_k=1, demucs=False)
    both = melody_model.generate_codes(PROMPTS, melody=[a, None], **kw)
    assert torch.equal(both[:1], melody_model.generate_codes(PROMPTS[:1], melody=a, **kw))
    assert torch.equal(both[1:], melody_model.generate_codes(PROMPTS, **kw)[1:])
    with pytest.raises(ValueError, match="prompt_audio holds None rows"):
        melody_model.generate_codes(PROMPTS, prompt_audio=[a, None], duration=0.2)
