"""The embedder ports against the packages they port: torchvggish directly (a test dependency); hear21passt
and laion_clap through the fixtures tests/data/eval_oracles.py recorded with them (random weights, the
packages' own classes), since neither installs next to torch 2.13's CPU wheel."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import eval_support as es
from eval_support import DATA


def waves(rate, seconds, seed=0):
    """The oracle script's signals (numpy's PCG64 stream is stable across versions)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_oracles", DATA / "eval_oracles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.waves(rate, seconds, seed)


def test_vggish_examples_are_googles_one_second_windows():
    """Google's FAD code (which audiocraft runs) cuts a clip into 1 s windows every 0.5 s and keeps the first
    96 log-mel frames of each window, computed from that window alone: a 10 s clip has 19 (windows starting at
    0, 0.5, ..., 9 s); the tail that fills no whole window is dropped."""
    from musicgen.eval import vggish

    clips = waves(16000, [1.0, 1.49, 1.5, 3.37, 10.0], seed=3)
    for w in clips:
        expected = es.google_fad_examples(w.double().numpy())
        mine = vggish.examples(w)
        assert mine.shape == expected.shape and torch.allclose(mine, expected, atol=1e-5)
    assert vggish.examples(clips[-1]).shape[0] == 19


def test_vggish_needs_one_second():
    """The shortest clip with an example is one whole window, 16000 samples; the second example needs 1.5 s."""
    from musicgen.eval import vggish

    x = waves(16000, [1.5], seed=4)[0]
    counts = [vggish.examples(x[:n]).shape[0] for n in (15999, 16000, 23999, 24000)]
    assert counts == [0, 1, 1, 2] and vggish.MIN_SAMPLES == 16000


def test_vggish_matches_torchvggish():
    """Embeddings equal torchvggish's (the model fadtk and frechet-audio-distance load, with the final ReLU
    removed as they do) on the same examples."""
    from torchvggish import torchvggish as tv

    from musicgen.eval import vggish

    torch.manual_seed(0)
    ref = tv.VGG(tv.make_layers(), postprocess=False).eval()
    ref.embeddings = torch.nn.Sequential(*list(ref.embeddings.children())[:-1])
    with torch.no_grad():
        for p in ref.embeddings.parameters():
            p.mul_(20)
    ours = vggish.VGGish().eval()
    ours.load_state_dict(ref.state_dict())
    feats = vggish.examples(waves(16000, [2.5])[0])
    with torch.no_grad():
        a, b = ref(feats[:, None]), ours(feats)
    assert a.abs().max() > 0.1 and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_passt_matches_hear21passt():
    from musicgen.eval import passt

    fx = torch.load(DATA / "eval_passt.pt", weights_only=False)
    model = passt.PaSST(passt.PasstConfig(**fx["config"])).eval()
    model.load_state_dict(fx["state"])   # hear21passt's names, unchanged
    with torch.no_grad():
        for w, logits in zip(waves(32000, fx["seconds"]), fx["logits"]):
            assert torch.allclose(model(w[None])[0], logits, rtol=1e-4, atol=1e-6)


def test_kaldi_and_slaney_mel_banks():
    """PaSST's Kaldi mel banks are covered by the fixture above; CLAP's Slaney filters equal transformers'
    (librosa's) filter bank."""
    from transformers.audio_utils import mel_filter_bank

    from musicgen.eval import htsat, passt

    ref = mel_filter_bank(num_frequency_bins=513, num_mel_filters=64, min_frequency=50, max_frequency=14000,
                          sampling_rate=48000, norm="slaney", mel_scale="slaney")
    assert np.allclose(htsat.slaney_mel().numpy(), ref, rtol=1e-5, atol=1e-8)
    banks = passt.kaldi_mel_banks()
    assert banks.shape == (128, 513) and float(banks[:, -1].abs().max()) == 0.0 and float(banks.max()) <= 1.0


def test_clap_matches_laion_clap(tmp_path):
    """HTSAT, RoBERTa, projections and the tokenizer against laion_clap 1.1.7 / transformers' RobertaTokenizer."""
    from musicgen.eval import clap
    from musicgen.eval.htsat import HtsatConfig

    fx = torch.load(DATA / "eval_clap.pt", weights_only=False)
    r = fx["roberta"]
    text = clap.RobertaConfig(**{k: r[k] for k in clap.RobertaConfig.__dataclass_fields__})
    hcfg = fx["htsat"]
    model = clap.CLAP(HtsatConfig(**{**hcfg, "depths": tuple(hcfg["depths"]), "heads": tuple(hcfg["heads"])}),
                      text, joint=fx["audio"].shape[-1]).eval()
    clap.load_state(model, {"state_dict": {f"module.{k}": v for k, v in fx["state"].items()}})
    (tmp_path / "vocab.json").write_text(fx["vocab"])
    (tmp_path / "merges.txt").write_text(fx["merges"])
    ids, mask = clap.Tokenizer(tmp_path)(fx["captions"])
    assert torch.equal(ids, fx["input_ids"]) and ids.shape[1] == clap.MAX_TOKENS
    with torch.no_grad():
        audio = model.audio_embedding(torch.stack([clap.audio_input(w) for w in waves(48000, fx["seconds"])]))
        txt = model.text_embedding(ids, mask)
    assert torch.allclose(audio, fx["audio"], atol=1e-5) and torch.allclose(txt, fx["text"], atol=1e-5)


def test_clap_audio_input_first_10s_or_repeatpad():
    from musicgen.eval.clap import audio_input

    long = torch.arange(600000, dtype=torch.float32)
    assert torch.equal(audio_input(long), long[:480000])
    short = torch.arange(1, 200001, dtype=torch.float32)   # repeated twice whole, then zeros
    x = audio_input(short)
    assert torch.equal(x[:400000], short.repeat(2)) and not x[400000:].any()


def test_clap_checkpoint_with_wrong_names_is_one_error():
    from musicgen.eval import clap
    from musicgen.eval.htsat import HtsatConfig

    model = clap.CLAP(HtsatConfig(embed_dim=4, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4)),
                      clap.RobertaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=8, max_position_embeddings=20), joint=4)
    with pytest.raises(ValueError, match="not a LAION-CLAP HTSAT-base checkpoint"):
        clap.load_state(model, {"state_dict": {"module.something": torch.zeros(1)}})
