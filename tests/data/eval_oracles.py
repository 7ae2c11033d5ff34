"""Check musicgen.eval's embedder ports against the packages they port, and save what the tests replay.

The packages do not install next to torch 2.13's CPU wheel (hear21passt and laion_clap import torchaudio and
torchvision, whose PyPI wheels are CUDA builds; laion_clap also pins numpy < 2), so this runs once, by hand,
in scratch virtualenvs where their compiled extensions are switched off (neither port uses them):

    python tests/data/eval_oracles.py vggish    # torchvggish: compared here (it is also a test dependency)
    python tests/data/eval_oracles.py passt     # hear21passt 0.0.26 -> tests/data/eval_passt.pt
    python tests/data/eval_oracles.py clap      # laion_clap 1.1.7 + transformers -> tests/data/eval_clap.pt

Each writes small random-weight models built with the package's own classes, the inputs' seeds and the
package's outputs; tests/test_eval_embedders.py loads the weights into our ports and compares.
"""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))


def waves(rate: int, seconds: list[float], seed: int = 0) -> list[torch.Tensor]:
    """Deterministic test signals (numpy's PCG64 is stable across versions): tones plus noise."""
    rng = np.random.default_rng(seed)
    out = []
    for s in seconds:
        t = np.arange(int(s * rate)) / rate
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(t.shape)
        out.append(torch.from_numpy(x.astype(np.float32)))
    return out


def vggish() -> None:
    import torchvggish
    from torchvggish import vggish_input

    from musicgen.eval import vggish as ours

    torch.manual_seed(0)
    ref = torchvggish.torchvggish.VGG(torchvggish.torchvggish.make_layers(), postprocess=False).eval()
    ref.embeddings = torch.nn.Sequential(*list(ref.embeddings.children())[:-1])   # fadtk: no final ReLU
    model = ours.VGGish().eval()
    model.load_state_dict(ref.state_dict())
    for w in waves(16000, [1.0, 3.5, 10.0]):
        x = w.double().numpy()   # Google's FAD windows: 1 s every 0.5 s, each one's log-mel alone (one example)
        wins = [vggish_input.waveform_to_examples(x[i:i + 16000], 16000) for i in range(0, len(x) - 15999, 8000)]
        a = torch.cat(wins)
        b = ours.examples(w)
        print("vggish features", tuple(b.shape), float((a[:, 0] - b).abs().max()))
        with torch.no_grad():
            print("vggish embeddings", float((ref(a) - model(b)).abs().max()), float(ref(a).abs().max()))


def passt() -> None:
    from hear21passt.models.passt import PaSST as Ref
    from hear21passt.models.preprocess import AugmentMelSTFT
    from hear21passt.wrapper import PasstBasicWrapper

    from musicgen.eval import passt as ours

    torch.manual_seed(0)
    cfg = ours.PasstConfig(embed_dim=16, depth=2, heads=2)
    with contextlib.redirect_stdout(io.StringIO()):
        net = Ref(img_size=(128, 2000), stride=10, patch_size=16, embed_dim=16, depth=2, num_heads=2, distilled=True)
        mel = AugmentMelSTFT(n_mels=128, sr=32000, win_length=800, hopsize=320, n_fft=1024, freqm=48, timem=192,
                             htk=False, fmin=0.0, fmax=None, norm=1, fmin_aug_range=10, fmax_aug_range=2000)
        ref = PasstBasicWrapper(mel=mel, net=net, max_model_window=20000, mode="logits").eval()
    seconds = [0.2, 1.0, 3.3]
    logits = []
    stft, torch.stft = torch.stft, lambda *a, **k: stft(*a, **{**k, "return_complex": False})  # audiocraft's patch
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            logits = [ref(w[None])[0] for w in waves(32000, seconds)]
    finally:
        torch.stft = stft
    model = ours.PaSST(cfg).eval()
    model.load_state_dict(net.state_dict())
    with torch.no_grad():
        for w, a in zip(waves(32000, seconds), logits):
            print("passt logits", float((model(w[None])[0] - a).abs().max()), float(a.abs().max()))
    torch.save({"config": cfg.__dict__, "state": net.state_dict(), "seconds": seconds, "logits": logits},
               HERE / "eval_passt.pt")


def clap() -> None:
    import tempfile

    from laion_clap.clap_module.htsat import HTSAT_Swin_Transformer
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    from musicgen.eval import clap as ours
    from musicgen.eval.htsat import HtsatConfig

    class AudioCfg:   # what laion_clap reads from its model config
        window_size, hop_size, sample_rate, mel_bins, fmin, fmax = 1024, 480, 48000, 64, 50, 14000

    torch.manual_seed(0)
    hcfg = HtsatConfig(embed_dim=4, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4))
    audio = HTSAT_Swin_Transformer(spec_size=256, patch_size=4, patch_stride=(4, 4), num_classes=4, embed_dim=4,
                                   depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=8,
                                   config=AudioCfg()).eval()
    with torch.no_grad():   # non-trivial batch-norm statistics
        audio.bn0.running_mean.normal_()
        audio.bn0.running_var.uniform_(0.5, 2.0)
    folder = Path(tempfile.mkdtemp())
    corpus = ["80s pop track with bassy drums and synth", "lofi hip hop beat, mellow piano & vinyl crackle",
              "épique orchestral soundtrack; strings, brass and choir!"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    rcfg = RobertaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=80, type_vocab_size=1, pad_token_id=1)
    text = RobertaModel(rcfg).eval()
    proj_a = ours._projection(hcfg.out_dim, 12)
    proj_t = ours._projection(16, 12)
    tok = RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    captions = corpus[:3] + ["a much longer caption " * 30, "unseen wörds ☃"]
    # laion_clap's CLAP.get_audio_embedding / get_text_embedding for the roberta branch, step by step
    seconds = [2.5, 10.0, 12.0]
    with torch.no_grad():
        batch = []
        for w in waves(48000, seconds):
            if w.shape[0] > 480000:
                w = w[:480000]   # laion_clap crops at random here; the metric takes the first 10 s
            d = {}
            from laion_clap.training.data import get_audio_features
            get_audio_features(d, w, 480000, data_truncating="rand_trunc", data_filling="repeatpad",
                               audio_cfg={"sample_rate": 48000})
            batch.append(d["waveform"])
        a = audio({"waveform": torch.stack(batch)}, device="cpu")["embedding"]
        a = torch.nn.functional.normalize(proj_a(a), dim=-1)
        enc = tok(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        t = text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])["pooler_output"]
        t = torch.nn.functional.normalize(proj_t(t), dim=-1)
    state = {**{f"audio_branch.{k}": v for k, v in audio.state_dict().items()},
             **{f"text_branch.{k}": v for k, v in text.state_dict().items()},
             **{f"audio_projection.{k}": v for k, v in proj_a.state_dict().items()},
             **{f"text_projection.{k}": v for k, v in proj_t.state_dict().items()}}
    model = ours.CLAP(hcfg, ours.RobertaConfig(vocab_size=rcfg.vocab_size, hidden_size=16, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=32,
                                               max_position_embeddings=80), joint=12)
    ours.load_state(model, {"state_dict": {f"module.{k}": v for k, v in state.items()}})
    model.eval()
    mine_tok = ours.Tokenizer(folder)
    ids, mask = mine_tok(captions)
    print("clap token ids equal", bool((ids == enc["input_ids"]).all()), bool((mask == enc["attention_mask"]).all()))
    with torch.no_grad():
        x = torch.stack([ours.audio_input(w) for w in waves(48000, seconds)])
        print("clap audio", float((model.audio_embedding(x) - a).abs().max()))
        print("clap text", float((model.text_embedding(ids, mask) - t).abs().max()))
    # the fixture keeps what the port loads (the full state, with laion_clap's fixed STFT matrices and rebuilt
    # buffers, loaded above; they are 6 MB)
    state = {k: v for k, v in state.items() if not any(u in k for u in ours.UNUSED)}
    torch.save({"htsat": hcfg.__dict__, "roberta": rcfg.to_dict(), "state": state, "seconds": seconds,
                "captions": captions, "audio": a, "text": t, "input_ids": enc["input_ids"],
                "vocab": (folder / "vocab.json").read_text(), "merges": (folder / "merges.txt").read_text()},
               HERE / "eval_clap.pt")


if __name__ == "__main__":
    {"vggish": vggish, "passt": passt, "clap": clap}[sys.argv[1]]()
