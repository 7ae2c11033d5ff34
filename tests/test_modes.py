"""Continuation, unconditional and stereo generation against transformers' MusicgenForConditionalGeneration."""
from __future__ import annotations

import pytest
import torch

import musicgen
from conftest import build_hf_model, save_checkpoint

PROMPTS = ["80s pop track with bassy drums and synth", "lofi"]


def hf_greedy(hf_model, max_new_tokens, guidance_scale=3.0, **inputs):
    """transformers' greedy generate -> (codes (B, K, frames) it decoded, audio)."""
    decode = hf_model.audio_encoder.decode
    captured = []

    def spy(codes, *a, **kw):
        captured.append(codes[0].clone())
        return decode(codes, *a, **kw)

    hf_model.audio_encoder.decode = spy
    try:
        with torch.no_grad():
            audio = hf_model.generate(**inputs, do_sample=False, guidance_scale=guidance_scale,
                                      max_new_tokens=max_new_tokens)
    finally:
        del hf_model.audio_encoder.decode
    if len(captured) == 2:   # stereo: left codebooks decoded first, then right; we interleave L0 R0 L1 R1 ...
        return torch.stack(captured, dim=2).flatten(1, 2), audio
    return captured[0], audio


def noise(batch, channels, seconds, seed=0):
    return 0.3 * torch.randn(batch, channels, int(32000 * seconds), generator=torch.Generator().manual_seed(seed))


# -- continuation ---------------------------------------------------------------------------------------
def test_continuation_matches_transformers(model, hf_model, hf_tokenizer):
    audio = noise(2, 1, 0.1)                                                  # 5 frames of prompt
    inputs = dict(hf_tokenizer(PROMPTS, padding=True, return_tensors="pt"), input_values=audio)
    ref_codes, ref_audio = hf_greedy(hf_model, max_new_tokens=10 + 3, **inputs)
    frames = ref_codes.shape[2]
    codes = model.generate_codes(PROMPTS, duration=frames / 50, prompt_audio=audio, top_k=1)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(codes[:, :, :5], model.encode(audio))                 # the output starts with the prompt
    out = model.decode(codes)
    torch.testing.assert_close(out, ref_audio, atol=1e-4, rtol=0)


def test_continuation_without_text_and_resampled_prompt(model):
    audio = noise(1, 1, 0.2)
    codes = model.generate_codes(None, duration=0.4, prompt_audio=audio[0], top_k=1)
    assert codes.shape == (1, 4, 20)
    assert torch.equal(codes[:, :, :10], model.encode(audio))
    # a 16 kHz stereo prompt is down-mixed and resampled like audiocraft's convert_audio
    from musicgen.audio import resample

    low = resample(audio[0], 32000, 16000).expand(2, -1)
    again = model.generate_codes(None, duration=0.4, prompt_audio=low, prompt_sample_rate=16000, top_k=1)
    assert again.shape == (1, 4, 20)
    wav = model.generate(None, duration=0.4, prompt_audio=audio[0], top_k=1)
    assert wav.shape == (1, 1, 0.4 * 32000)


def test_prompt_resampled_as_audiocraft_convert_audio(model):
    """julius' resample_frac with int(samples * 32000 / rate) samples out: a 44.1 kHz prompt of 88201 samples is
    64000 samples, 100 frames (a resampler that rounds up makes 64001 samples and a 101st frame)."""
    import julius

    from musicgen.audio import resample

    audio = noise(1, 1, 88201 / 32000, seed=3)[0]                            # read as 44.1 kHz: 2.00002 s
    assert torch.equal(resample(audio, 44100, 32000), julius.resample_frac(audio, 44100, 32000))
    assert resample(audio, 44100, 32000).shape == (1, 64000)
    # so it fits a 2 s request (101 frames would be refused as longer than the duration) and is all of it
    codes = model.generate_codes(None, duration=2.0, prompt_audio=audio, prompt_sample_rate=44100)
    assert torch.equal(codes, model.encode(resample(audio, 44100, 32000)[None]))


def test_prompt_with_more_channels_is_mixed_as_audiocraft(model):
    """A 3-channel prompt into a mono model is the mean of its channels (convert_audio_channels)."""
    audio = noise(1, 3, 0.2)[0]
    codes = model.generate_codes(None, duration=0.2, prompt_audio=audio)
    assert torch.equal(codes, model.encode(audio.mean(0, keepdim=True)[None]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_audio=torch.zeros(1, 0)), "empty"),
    (dict(prompt_audio=torch.zeros(1, 32000)), r"50 frames \(1 s\): longer than the 10 frames \(0.2 s\)"),
    (dict(prompt_audio=torch.zeros(3200, 2)), r"3200 channels: pass \(channels, samples\)"),
    (dict(prompt_audio=torch.zeros(1, 3200), prompt_sample_rate=-1), "prompt_sample_rate"),
    (dict(prompt_audio=[torch.zeros(1, 3200), torch.zeros(1, 1600)], prompts=["a", "b"]), "different lengths"),
    (dict(prompt_audio=torch.zeros(1, 1, 2, 3)), "prompt_audio must be"),
])
def test_bad_prompt_audio(model, kwargs, message):
    prompts = kwargs.pop("prompts", ["x"])
    with pytest.raises(ValueError, match=message):
        model.generate_codes(prompts, duration=0.2, **kwargs)


# -- unconditional -------------------------------------------------------------------------------------
def test_unconditional_matches_transformers(model, hf_model):
    inputs = dict(hf_model.get_unconditional_inputs(num_samples=2))
    inputs.pop("guidance_scale", None)
    ref_codes, _ = hf_greedy(hf_model, max_new_tokens=8 + 3, guidance_scale=1.0, **inputs)
    codes = model.generate_codes(None, duration=ref_codes.shape[2] / 50, batch_size=2, top_k=1)
    assert torch.equal(codes, ref_codes)


def test_unconditional_default_is_one_row_and_sampling_reproducible(model):
    a = model.generate_codes(None, duration=0.1, seed=3)
    b = model.generate_codes(None, duration=0.1, seed=3)
    assert a.shape == (1, 4, 5) and torch.equal(a, b)
    assert model.generate(None, batch_size=3, duration=0.1, seed=0).shape == (3, 1, 3200)


# -- stereo -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stereo_pair(tmp_path_factory, spm_model):
    hf = build_hf_model(seed=1, stereo=True)
    folder = save_checkpoint(hf, tmp_path_factory.mktemp("tiny_stereo"), spm_model)
    return hf, musicgen.load(folder)


def test_stereo_greedy_codes_and_audio_match_transformers(stereo_pair, hf_tokenizer):
    hf, ours = stereo_pair
    assert ours.audio_channels == 2 and ours.cfg.lm.num_codebooks == 8
    inputs = hf_tokenizer(PROMPTS, padding=True, return_tensors="pt")
    ref_codes, ref_audio = hf_greedy(hf, max_new_tokens=12 + 3, **inputs)
    codes = ours.generate_codes(PROMPTS, duration=ref_codes.shape[2] / 50, top_k=1)
    assert codes.shape == (2, 8, ref_codes.shape[2])
    assert torch.equal(codes, ref_codes)
    audio = ours.decode(codes)
    assert audio.shape == ref_audio.shape == (2, 2, ref_codes.shape[2] * 640)
    torch.testing.assert_close(audio, ref_audio, atol=1e-4, rtol=0)


def test_stereo_continuation_takes_mono_or_stereo_prompts(stereo_pair):
    _, ours = stereo_pair
    stereo = noise(1, 2, 0.1)
    codes = ours.generate_codes(["x"], duration=0.2, prompt_audio=stereo, top_k=1)
    assert torch.equal(codes[:, :, :5], ours.encode(stereo))
    mono = ours.generate_codes(["x"], duration=0.2, prompt_audio=stereo[:, :1], top_k=1)   # duplicated to L and R
    assert torch.equal(mono[:, :, :5], ours.encode(stereo[:, :1].expand(-1, 2, -1)))


def test_encode_rejects_wrong_channel_count(model):
    with pytest.raises(ValueError, match="1-channel"):
        model.encode(torch.zeros(1, 2, 640))
