"""EnCodec pieces on their own: weight-norm folding, padding rules, quantiser round trips, odd lengths."""
from __future__ import annotations

import pytest
import torch

from musicgen.codec import EnCodec, fold_weight_norm
from musicgen.config import CodecConfig


def test_fold_weight_norm_equals_torch_weight_norm():
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.ConvTranspose1d(6, 4, 5))
    state = {f"x.{k}": v for k, v in conv.state_dict().items()}
    folded = fold_weight_norm(state)
    assert set(folded) == {"x.weight", "x.bias"}
    torch.testing.assert_close(folded["x.weight"], conv.weight)


def test_fold_weight_norm_drops_codebook_statistics_and_names_half_pairs():
    state = {"q.codebook.embed": torch.zeros(2), "q.codebook.embed_avg": torch.zeros(2),
             "q.codebook.cluster_size": torch.zeros(2), "q.codebook.inited": torch.ones(1)}
    assert list(fold_weight_norm(state)) == ["q.codebook.embed"]
    with pytest.raises(ValueError, match="conv lacks its weight_v"):
        fold_weight_norm({"conv.weight_g": torch.ones(3, 1, 1)})


@pytest.mark.parametrize("samples", [1, 639, 640, 641, 5000, 16000 + 77])
def test_codes_and_audio_lengths(model, hf_model, samples):
    """Any length encodes to ceil(samples / hop) frames, exactly as transformers (reflect padding of tiny inputs)."""
    audio = torch.randn(1, 1, samples, generator=torch.Generator().manual_seed(samples)) * 0.2
    codes = model.encode(audio)
    assert codes.shape == (1, 4, -(-samples // 640))
    with torch.no_grad():
        ref = hf_model.audio_encoder.encode(audio).audio_codes[0]
    assert torch.equal(codes, ref)
    assert model.decode(codes).shape == (1, 1, codes.shape[-1] * 640)


def test_quantiser_picks_nearest_and_decode_sums():
    cfg = CodecConfig(num_filters=4, hidden_size=8, codebook_size=16, num_codebooks=2)
    codec = EnCodec(cfg)
    for layer in codec.quantizer.layers:
        layer.codebook.embed.normal_(generator=torch.Generator().manual_seed(1))
    first = codec.quantizer.layers[0].codebook.embed
    latent = first[[3, 7, 11]].t()[None] + 1e-4                    # (1, 8, 3) right next to entries 3, 7, 11
    codes = codec.quantizer.encode(latent)
    assert codes[0, 0].tolist() == [3, 7, 11]
    recon = codec.quantizer.decode(codes)
    second = codec.quantizer.layers[1].codebook.embed
    torch.testing.assert_close(recon[0].t(), first[[3, 7, 11]] + second[codes[0, 1]])


def test_stereo_codec_per_channel():
    """The config validation ties decoder codebooks to codec codebooks per channel."""
    from musicgen.config import preset
    cfg = preset("stereo-small")
    assert cfg.lm.num_codebooks == 2 * cfg.codec.num_codebooks


def test_pad_modes_that_window_safely_only():
    """Circular padding would read the far end of the signal, which the windowed fast codec and the streaming
    decoder never see: refused (a config.json or xp.cfg naming it gets a clear error, not other audio)."""
    with pytest.raises(ValueError, match="pad_mode 'circular' is not supported: choose constant, reflect, replicate"):
        EnCodec(CodecConfig(num_filters=4, hidden_size=8, codebook_size=16, pad_mode="circular"))
