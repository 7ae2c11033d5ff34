"""Streaming: the joined stream is the one-shot result, and audio arrives before generation ends."""
from __future__ import annotations

import math

import pytest
import torch

from musicgen.codec import EnCodec
from musicgen.config import preset
from musicgen.streaming import StreamingDecoder, stream_codes


def snr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    noise = (reference - test).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(reference.pow(2).sum().item() / noise)


def stream_decode(codec, codes, chunk):
    dec = StreamingDecoder(codec)
    n = codes.shape[-1]
    parts = [dec.push(codes[..., i:i + chunk], final=i + chunk >= n) for i in range(0, n, chunk)]
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("chunk", [2, 25])
def test_streamed_decode_matches_one_shot(model, chunk):
    codes = torch.randint(0, 64, (2, 4, 40), generator=torch.Generator().manual_seed(0))
    whole = model.decode(codes)
    streamed = stream_decode(model.codec, codes, chunk)
    assert streamed.shape == whole.shape
    assert snr_db(whole, streamed) > 100          # measured: ~130 dB: float rounding only


def test_streamed_decode_at_the_real_codec_shape():
    """musicgen-small's codec shape (64 filters, 2x LSTM of 1024) with random weights: >100 dB as well
    (measured: 134 dB over 250 frames in 5- and 50-frame chunks)."""
    torch.manual_seed(0)
    codec = EnCodec(preset("small").codec).eval()
    for m in codec.modules():
        if isinstance(m, torch.nn.Conv1d | torch.nn.ConvTranspose1d):
            m.weight.data.mul_(0.5)               # keep random activations in a sane range through 4 scales
    for layer in codec.quantizer.layers:
        layer.codebook.embed.normal_()
    codes = torch.randint(0, 2048, (1, 4, 20))
    with torch.inference_mode():
        whole = codec.decode(codes)
        streamed = stream_decode(codec, codes, 10)
    assert snr_db(whole, streamed) > 100


def test_stream_codes_equal_generate_codes(model):
    kw = dict(duration=0.5, seed=3, top_k=5)
    ref = model.generate_codes(["lofi beat", "techno"], **kw)
    parts = list(stream_codes(model, ["lofi beat", "techno"], chunk_frames=7, **kw))
    assert [last for _, last in parts] == [False] * (len(parts) - 1) + [True]
    assert torch.equal(torch.cat([c for c, _ in parts], dim=-1), ref)


def test_stream_codes_equal_generate_codes_in_every_mode(model, melody_model):
    """Melody (prepended condition tokens), continuation (prompt frames come first) and no text at all."""
    kw = dict(duration=0.5, seed=5, top_k=5)
    tune = torch.sin(torch.arange(16000) / 16000 * 2 * torch.pi * 330.0)
    intro = 0.1 * torch.randn(1, 3200)
    cases = [(melody_model, ["folk"], dict(melody=tune, melody_sample_rate=16000, demucs=False)),
             (model, ["jazz"], dict(prompt_audio=intro, prompt_sample_rate=32000)),
             (model, None, dict(batch_size=2))]
    for m, prompts, extra in cases:
        ref = m.generate_codes(prompts, **kw, **extra)
        parts = list(stream_codes(m, prompts, chunk_frames=4, **kw, **extra))
        assert torch.equal(torch.cat([c for c, _ in parts], dim=-1), ref)


def test_stream_refuses_long_form(model):
    with pytest.raises(ValueError, match="one 30 s window"):
        next(model.stream(["x"], duration=31.0))


def test_stream_yields_progressively_and_matches_generate(model):
    ref = model.generate(["ambient pads"], duration=2.0, seed=1)
    chunks = list(model.stream(["ambient pads"], duration=2.0, chunk_seconds=0.5, seed=1))
    assert len(chunks) >= 4                        # four 0.5 s chunks of decoding, not one at the end
    assert 0 < chunks[0].shape[-1] <= 16000        # the first one after about one chunk of decoding
    joined = torch.cat(chunks, dim=-1)
    assert joined.shape == ref.shape
    assert snr_db(ref, joined) > 100


def test_stream_starts_with_a_short_chunk(model):
    """By default the first chunk is at most FIRST_CHUNK_SECONDS (0.25 s) of decoding, the rest chunk_seconds;
    first_chunk_seconds sets it. The stream still joins to generate()'s audio."""
    from musicgen.streaming import FIRST_CHUNK_SECONDS

    ref = model.generate(["ambient pads"], duration=3.0, seed=2)
    chunks = list(model.stream(["ambient pads"], duration=3.0, chunk_seconds=1.0, seed=2))
    rate = model.sample_rate
    assert 0 < chunks[0].shape[-1] <= FIRST_CHUNK_SECONDS * rate
    assert chunks[1].shape[-1] == rate                  # then 1 s chunks (50 frames of 640 samples)
    assert snr_db(ref, torch.cat(chunks, dim=-1)) > 100
    slow = list(model.stream(["ambient pads"], duration=3.0, chunk_seconds=1.0, first_chunk_seconds=1.0, seed=2))
    assert chunks[0].shape[-1] < slow[0].shape[-1] <= rate
    torch.testing.assert_close(torch.cat(slow, dim=-1), torch.cat(chunks, dim=-1), atol=1e-5, rtol=0)


def test_stream_rejects_bad_chunks(model):
    with pytest.raises(ValueError, match="chunk_seconds"):
        next(model.stream(["x"], duration=1.0, chunk_seconds=0))
    with pytest.raises(ValueError, match="first_chunk_seconds"):
        next(model.stream(["x"], duration=1.0, first_chunk_seconds=-1))
