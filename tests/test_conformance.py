"""Our model against transformers' MusicgenForConditionalGeneration on the same tiny random checkpoint."""
from __future__ import annotations

import pytest
import torch

import musicgen

PROMPTS = ["80s pop track with bassy drums and synth", "lofi", "jazz trio: upright bass, brushed drums & piano solo"]


def hf_inputs(hf_tokenizer, prompts):
    return hf_tokenizer(prompts, padding=True, return_tensors="pt")


def test_both_weight_norm_spellings_load_the_same(ckpt_dir, ckpt_dir_old_wn, model):
    other = musicgen.load(ckpt_dir_old_wn)
    a, b = model.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_codec_codes_equal_and_audio_close(model, hf_model):
    torch.manual_seed(1)
    audio = torch.randn(2, 1, 32000 // 2 + 77) * 0.3
    with torch.no_grad():
        ref_codes = hf_model.audio_encoder.encode(audio).audio_codes[0]        # (B, K, F)
        ref_audio = hf_model.audio_encoder.decode(ref_codes[None], [None]).audio_values
    codes = model.encode(audio)
    assert codes.shape == ref_codes.shape
    assert torch.equal(codes, ref_codes)
    out = model.decode(codes)
    assert out.shape == ref_audio.shape
    torch.testing.assert_close(out, ref_audio, atol=1e-5, rtol=1e-4)


def test_text_states_close(model, hf_model, hf_tokenizer):
    inputs = hf_inputs(hf_tokenizer, PROMPTS)
    with torch.no_grad():
        ref = hf_model.text_encoder(**inputs).last_hidden_state
        ref = hf_model.enc_to_dec_proj(ref) * inputs.attention_mask[..., None]
    states, mask = model.encode_text(PROMPTS)
    assert torch.equal(mask, inputs.attention_mask)
    torch.testing.assert_close(states, ref, atol=1e-5, rtol=1e-4)


def test_lm_logits_close(model, hf_model, hf_tokenizer):
    inputs = hf_inputs(hf_tokenizer, PROMPTS)
    B, K, T, V = len(PROMPTS), 4, 9, hf_model.config.decoder.vocab_size
    codes = torch.randint(0, V + 1, (B, K, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf_model(**inputs, decoder_input_ids=codes.reshape(B * K, T)).logits.reshape(B, K, T, V)
    states, mask = model.encode_text(PROMPTS)
    with torch.inference_mode():
        logits = model.lm(codes, model.lm.cross_kv(states), model.lm.cross_bias(mask, states.dtype))
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_cached_decoding_equals_full_forward(model):
    """A prefill block, then one engine step per position (every row at its own position), over the static
    cache: the logits of the whole sequence at once."""
    from musicgen.conditions import Conditions
    from musicgen.engine import Engine

    states, mask = model.encode_text(PROMPTS[:2])
    kv, bias = model.lm.cross_kv(states), model.lm.cross_bias(mask, states.dtype)
    codes = torch.randint(0, 65, (2, 4, 12), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        full = model.lm(codes, kv, bias)
        engine = Engine(model, rows=2, length=12, text_length=states.shape[1])
        engine.cache.put_text(0, Conditions(cross_kv=kv, cross_bias=bias))
        parts = [model.lm(codes[:, :, :5], kv, bias, stores=engine.cache.stores(slice(0, 2)))]   # a prefill ...
        parts += [engine.forward(codes[:, :, t], [t, t])[:, :, None] for t in range(5, 12)]      # ... then steps
    torch.testing.assert_close(torch.cat(parts, dim=2), full, atol=1e-5, rtol=1e-5)


def _hf_greedy(hf_model, inputs, frames, capture):
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


@pytest.fixture(scope="module")
def reference_model(ckpt_dir):
    """The checkpoint on the reference backend (the PyTorch layer loop), whatever this machine's default."""
    from musicgen import accel

    with accel.override(backend="reference"):
        m = musicgen.load(ckpt_dir)
    assert m.backend.name == "reference"
    return m


@pytest.mark.parametrize("which", ["model", "reference_model"])   # the default backend here, and the reference
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS])
def test_greedy_generation_matches_transformers(request, which, hf_model, hf_tokenizer, prompts):
    model = request.getfixturevalue(which)
    duration = 0.3
    frames = int(duration * 50)
    captured = []
    ref_audio = _hf_greedy(hf_model, hf_inputs(hf_tokenizer, prompts), frames, captured)
    ref_codes = captured[0]
    codes = model.generate_codes(prompts, duration=duration, top_k=1, guidance_scale=3.0)
    assert codes.shape == (len(prompts), 4, frames)
    assert torch.equal(codes, ref_codes)
    audio = model.generate(prompts, duration=duration, top_k=1, guidance_scale=3.0)
    assert audio.shape == ref_audio.shape
    torch.testing.assert_close(audio, ref_audio, atol=1e-4, rtol=0)
