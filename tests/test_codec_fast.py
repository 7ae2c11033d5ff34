"""The channels-last, windowed codec (codec_fast) against the layer-by-layer modules."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import kernel_or_skip
from musicgen.accel import codec as codec_fast
from musicgen.codec import EnCodec
from musicgen.config import CodecConfig, preset


def random_codec(cfg: CodecConfig, seed: int = 0) -> EnCodec:
    torch.manual_seed(seed)
    codec = EnCodec(cfg).eval()
    for m in codec.modules():
        if isinstance(m, torch.nn.Conv1d | torch.nn.ConvTranspose1d):
            m.weight.data.mul_(0.5)               # keep random activations in a sane range through the scales
            m.bias.data.normal_(std=0.1)
    for layer in codec.quantizer.layers:
        layer.codebook.embed.normal_()
    return codec


def relative_error(codec: EnCodec, codes: torch.Tensor) -> float:
    with torch.inference_mode():
        latent = codec.quantizer.decode(codes)
        reference = codec.decoder.reference(latent)
        fast = codec.decoder(latent)
    assert fast.shape == reference.shape
    return ((fast - reference).abs().max() / reference.abs().max()).item()


def encoder_error(codec: EnCodec, audio: torch.Tensor) -> float:
    with torch.inference_mode():
        reference = codec.encoder.reference(audio)
        fast = codec.encoder(audio)
    assert fast.shape == reference.shape
    return ((fast - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def small_codec():
    return random_codec(preset("small").codec)


@pytest.mark.parametrize("batch,frames", [(1, 1), (1, 3), (1, 237), (3, 61)])
def test_fast_decode_equals_the_modules_at_the_real_shape(small_codec, batch, frames):
    """musicgen-small's codec (64 filters, ratios 8 5 4 4, LSTM 2 x 1024): float rounding only.
    237 frames cross two window seams at batch 1; batch 3 uses 33-frame windows. Measured: about 2e-6."""
    codes = torch.randint(0, 2048, (batch, 4, frames), generator=torch.Generator().manual_seed(frames))
    assert relative_error(small_codec, codes) < 2e-5


@pytest.mark.parametrize("batch,samples", [(1, 100), (1, 640), (1, 151_001), (3, 20_000)])
def test_fast_encode_equals_the_modules_at_the_real_shape(small_codec, batch, samples):
    """Lengths shorter than a frame, exactly one frame, crossing window seams mid-frame; 3 rows.
    Measured: under 1e-6 of the latent's range, and the same codes."""
    audio = 0.3 * torch.randn(batch, 1, samples, generator=torch.Generator().manual_seed(samples))
    assert encoder_error(small_codec, audio) < 2e-5
    with torch.inference_mode():
        codes = small_codec.quantizer.encode(small_codec.encoder(audio))
        reference = small_codec.quantizer.encode(small_codec.encoder.reference(audio))
    assert (codes == reference).float().mean() > 0.99            # only a near-tie could flip a code


def test_many_small_windows(small_codec, monkeypatch):
    """Windows of 8 frames: every seam's context must come from the neighbours, not from padding."""
    monkeypatch.setattr(codec_fast, "WINDOW", 8)
    codes = torch.randint(0, 2048, (1, 4, 45), generator=torch.Generator().manual_seed(1))
    assert relative_error(small_codec, codes) < 2e-5
    audio = 0.3 * torch.randn(2, 1, 45 * 640 - 17, generator=torch.Generator().manual_seed(1))
    assert encoder_error(small_codec, audio) < 2e-5


@pytest.mark.parametrize("variant", [
    dict(causal=True, trim_right_ratio=1.0),
    dict(causal=True, trim_right_ratio=0.5, pad_mode="constant"),
    dict(use_conv_shortcut=True, residual_kernel_size=5, num_residual_layers=2, last_kernel_size=3),
    dict(ratios=(3, 2), kernel_size=5, compress=4, num_lstm_layers=1),
])
def test_fast_decode_other_codec_shapes(variant):
    """Causal trims, zero padding, conv shortcuts, dilated residual stacks, odd strides."""
    cfg = dataclasses.replace(CodecConfig(num_filters=8, hidden_size=16, codebook_size=32), **variant)
    codec = random_codec(cfg)
    codes = torch.randint(0, 32, (2, 4, 130), generator=torch.Generator().manual_seed(2))
    assert relative_error(codec, codes) < 2e-5
    audio = 0.3 * torch.randn(2, 1, 130 * cfg.hop_length - 5, generator=torch.Generator().manual_seed(2))
    assert encoder_error(codec, audio) < 2e-5


def test_window_context_covers_the_receptive_field(small_codec):
    """A change at one frame must not reach audio (decoder) or latent frames (encoder) further away than the
    context the windows keep."""
    start = codec_fast.split(small_codec.decoder)
    stage = list(small_codec.decoder.layers)[start:]
    margin = codec_fast.context_frames(stage, small_codec.hop_length)
    hidden = torch.randn(1, 1024, 40)
    moved = hidden.clone()
    moved[..., 20] += 1.0
    with torch.inference_mode():
        a = codec_fast.decoder_reference(small_codec.decoder, hidden)
        b = codec_fast.decoder_reference(small_codec.decoder, moved)
    changed = ((a - b).abs()[0, 0] > 0).nonzero()[:, 0]
    first, last = changed.min().item() // 640, changed.max().item() // 640
    assert 20 - margin < first and last < 20 + margin
    assert 1 <= margin <= 4                       # the 32 kHz codec looks about 2 frames either way

    encoder = small_codec.encoder
    margin = codec_fast.context_frames(list(encoder.layers)[:codec_fast.split(encoder)], 1)
    audio = 0.3 * torch.randn(1, 1, 40 * 640)
    moved = audio.clone()
    moved[..., 20 * 640 + 320] += 1.0
    with torch.inference_mode():
        a = codec_fast.reference(list(encoder.layers)[:codec_fast.split(encoder)], audio)
        b = codec_fast.reference(list(encoder.layers)[:codec_fast.split(encoder)], moved)
    changed = ((a - b).abs().amax(1)[0] > 0).nonzero()[:, 0]
    assert 20 - margin < changed.min().item() and changed.max().item() < 20 + margin
    assert 1 <= margin <= 4


def test_changed_weights_are_used(small_codec):
    """Weight matrices are cached per weight version: changing a weight in place changes the output."""
    codec = random_codec(preset("small").codec, seed=3)
    codes = torch.randint(0, 2048, (1, 4, 20), generator=torch.Generator().manual_seed(3))
    assert relative_error(codec, codes) < 2e-5
    with torch.no_grad():
        codec.decoder.layers[-1].conv.weight.mul_(-2.0)
        codec.decoder.layers[3].conv.bias.add_(0.5)
    assert relative_error(codec, codes) < 2e-5


def test_reference_path_with_autograd(small_codec, monkeypatch):
    latent, audio = torch.randn(1, 128, 4), torch.randn(1, 1, 2000)
    calls = []
    for name in ("decode", "encode"):
        real = getattr(codec_fast, name)
        monkeypatch.setattr(codec_fast, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    with torch.inference_mode():
        small_codec.decoder(latent)
        small_codec.encoder(audio)
    assert calls == ["decode", "encode"]
    small_codec.decoder(latent.requires_grad_())                  # autograd on: the modules
    small_codec.encoder(audio.requires_grad_())
    assert calls == ["decode", "encode"]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch,with_state", [(1, False), (3, True), (2, False)])
def test_native_lstm_equals_torch(bias, batch, with_state):
    """The native recurrence (kernels/decoder.cpp lstm_layer) against nn.LSTM: outputs and the last (h, c), from
    zeros or a given state (the streaming decoder's), with and without biases, to float32 rounding (over 37 steps)."""
    torch.manual_seed(batch)
    lstm = torch.nn.LSTM(64, 64, 2, bias=bias).eval()
    with torch.no_grad():
        for p in lstm.parameters():
            p.mul_(6.0)                     # the default init (about ±0.12) barely drives the gates
    x = torch.randn(37, batch, 64)
    state = (torch.randn(2, batch, 64), torch.randn(2, batch, 64)) if with_state else None
    with torch.inference_mode():
        out = codec_fast.lstm(lstm, x, state)
        if out is None:
            kernel_or_skip("lstm_layer")   # no kernels here: the codec keeps torch's LSTM
        y, (h, c) = lstm(x, state)
    assert out[0].shape == y.shape and out[1][0].shape == h.shape
    for ours, ref in ((out[0], y), (out[1][0], h), (out[1][1], c)):
        torch.testing.assert_close(ours, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)   # measured up to 2e-6


def test_codec_lstm_goes_native_where_the_fast_codec_applies(small_codec, monkeypatch):
    """Decoding (one-shot and streamed) runs the bottleneck LSTM through codec_fast.lstm; with autograd it stays
    torch's."""
    from musicgen.streaming import StreamingDecoder

    calls = []
    real = codec_fast.lstm
    monkeypatch.setattr(codec_fast, "lstm", lambda *a: calls.append(1) or real(*a))
    codes = torch.randint(0, 2048, (1, 4, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        one_shot = small_codec.decode(codes)
        stream = StreamingDecoder(small_codec)
        streamed = torch.cat([stream.push(codes[..., :5]), stream.push(codes[..., 5:], final=True)], dim=-1)
    assert len(calls) >= 3
    torch.testing.assert_close(streamed, one_shot, atol=1e-5 * one_shot.abs().max().item(), rtol=0)
    calls.clear()
    small_codec.decode(codes.clone())   # outside inference mode: autograd is on
    assert not calls
