"""Helpers for the tests/test_eval*.py files: tiny random-weight embedders built from musicgen.eval's own
classes (the released weights cannot be downloaded here), test signals, and audio folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch

DATA = Path(__file__).parent / "data"


def tone(seconds: float, rate: int = 32000, freq: float = 440.0, noise: float = 0.05, seed: int = 0,
         channels: int = 1) -> np.ndarray:
    """(samples, channels) float32: a sine plus noise, deterministic."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t)[:, None] + noise * rng.standard_normal((t.shape[0], channels))
    return x.astype(np.float32)


def write(folder: Path, name: str, audio: np.ndarray, rate: int = 32000, subtype: str = "FLOAT") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate, subtype=subtype)
    return path


def make_set(folder: Path, n: int, seconds: float = 2.0, rate: int = 32000, seed: int = 0, noise: float = 0.05,
             prefix: str = "clip") -> list[Path]:
    rng = np.random.default_rng(seed)
    return [write(folder, f"{prefix}{i}.wav", tone(seconds, rate, float(rng.uniform(110, 880)), noise, seed * 100 + i),
                  rate) for i in range(n)]


def google_fad_examples(x: np.ndarray) -> torch.Tensor:
    """(samples,) float64 at 16 kHz -> (n, 96, 64): Google's FAD framing spelled out (AudioSetModel.extract_features
    with create_embeddings_main's step of 8000 samples): a 1 s window (16000 samples) at every multiple of 0.5 s
    where a whole one fits, the log-mel of each window computed alone by torchvggish (98 frames: one example)."""
    from torchvggish import vggish_input

    windows = [x[i:i + 16000] for i in range(0, len(x) - 16000 + 1, 8000)]
    feats = [vggish_input.waveform_to_examples(w, 16000).detach()[:, 0] for w in windows]
    assert all(f.shape[0] == 1 for f in feats)
    return torch.cat(feats) if feats else torch.zeros(0, 96, 64)


def vggish_embedder():
    from musicgen.eval.vggish import VGGish, VGGishEmbedder

    torch.manual_seed(0)
    model = VGGish()
    with torch.no_grad():   # default init leaves outputs near zero; larger weights make the tests sensitive
        for p in model.embeddings.parameters():
            p.mul_(20)
    return VGGishEmbedder(model, "random-vggish")


def passt_embedder(seed: int = 0):
    from musicgen.eval.passt import PaSST, PasstConfig, PasstEmbedder

    torch.manual_seed(seed)
    model = PaSST(PasstConfig(embed_dim=16, depth=1, heads=2))
    with torch.no_grad():
        model.head[1].weight.mul_(50)   # spread the label distributions
    return PasstEmbedder(model, f"random-passt-{seed}")


def clap_embedder(folder: Path):
    """A tiny CLAP (HTSAT 4-d, RoBERTa 16-d) with a byte-level BPE trained on a toy corpus."""
    from tokenizers import ByteLevelBPETokenizer

    from musicgen.eval.clap import CLAP, ClapEmbedder, RobertaConfig, Tokenizer
    from musicgen.eval.htsat import HtsatConfig

    corpus = ["80s pop track with bassy drums and synth", "lofi hip hop beat with mellow piano",
              "epic orchestral soundtrack with strings", "a calm acoustic guitar melody"] * 10
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(folder))
    torch.manual_seed(0)
    text = RobertaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=80)
    model = CLAP(HtsatConfig(embed_dim=4, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4)), text, joint=12)
    return ClapEmbedder(model, Tokenizer(folder), "random-clap")
