"""LAION-CLAP (Wu et al. 2023) for the CLAP score: `music_audioset_epoch_15_esc_90.14.pt` (HTSAT-base audio
tower, RoBERTa-base text tower, no fusion) loaded unchanged, as audiocraft's CLAPTextConsistencyMetric runs it.

    audio: 48 kHz mono; the first 10 s, or a shorter clip repeated whole and zero-padded to 10 s (laion_clap's
           "repeatpad"; laion_clap would crop a longer clip at a random offset) -> HTSAT (htsat.py)
           -> Linear-ReLU-Linear -> L2-normalised 512-d
    text:  RoBERTa BPE, <s> ... </s>, truncated and padded to 77 tokens -> RoBERTa -> pooler (tanh of the
           first token) -> Linear-ReLU-Linear -> L2-normalised 512-d

RoBERTa's own weights are part of the CLAP checkpoint; the `roberta-base/` folder gives its config and the
tokenizer files (vocab.json, merges.txt).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .htsat import CLIP_SAMPLES, HTSAT, SAMPLE_RATE, HtsatConfig

WEIGHTS = "music_audioset_epoch_15_esc_90.14.pt"
TEXT_FOLDER = "roberta-base"
TEXT_FILES = ("config.json", "vocab.json", "merges.txt")
MAX_TOKENS = 77
# checkpoint entries the embeddings do not use: the classifier head, training-time MLPs and temperatures,
# torchlibrosa's fixed STFT/mel matrices (recomputed in htsat.py), and buffers rebuilt at construction
UNUSED = ("audio_branch.tscam_conv.", "audio_branch.head.", "audio_transform.", "text_transform.", "logit_scale",
          "audio_branch.spectrogram_extractor.", "audio_branch.logmel_extractor.", "relative_position_index",
          "attn_mask", "text_branch.embeddings.position_ids")


@dataclass(frozen=True)
class RobertaConfig:
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1

    @classmethod
    def from_file(cls, path) -> "RobertaConfig":
        d = json.loads(Path(path).read_text())
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _linear(parent: nn.Module, name: str, n_in: int, n_out: int) -> None:
    layer = nn.Module()
    layer.dense = nn.Linear(n_in, n_out)
    setattr(parent, name, layer)


class RobertaLayer(nn.Module):
    def __init__(self, c: RobertaConfig):
        super().__init__()
        d = c.hidden_size
        self.heads = c.num_attention_heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(d, d))
        _linear(self.attention, "output", d, d)
        self.attention.output.LayerNorm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        _linear(self, "intermediate", d, c.intermediate_size)
        _linear(self, "output", c.intermediate_size, d)
        self.output.LayerNorm = nn.LayerNorm(d, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        att = self.attention.self

        def heads(t):
            return t.view(B, T, self.heads, C // self.heads).transpose(1, 2)          # (B, h, T, hd)
        y = F.scaled_dot_product_attention(heads(att.query(x)), heads(att.key(x)), heads(att.value(x)), attn_mask=mask)
        y = self.attention.output.dense(y.transpose(1, 2).reshape(B, T, C))
        x = self.attention.output.LayerNorm(y + x)
        y = self.output.dense(F.gelu(self.intermediate.dense(x)))
        return self.output.LayerNorm(y + x)


class Roberta(nn.Module):
    """transformers' RobertaModel (post-norm BERT with RoBERTa's position numbering), up to the pooler."""

    def __init__(self, c: RobertaConfig):
        super().__init__()
        self.cfg = c
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embeddings.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.embeddings.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embeddings.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(RobertaLayer(c) for _ in range(c.num_hidden_layers))
        _linear(self, "pooler", c.hidden_size, c.hidden_size)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids and 0/1 mask -> (B, hidden) pooled output."""
        e = self.embeddings
        real = ids.ne(self.cfg.pad_token_id).long()
        positions = torch.cumsum(real, 1) * real + self.cfg.pad_token_id             # padding keeps pad_token_id
        x = e.word_embeddings(ids) + e.position_embeddings(positions) + e.token_type_embeddings(torch.zeros_like(ids))
        x = e.LayerNorm(x)
        mask = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(attention_mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]   # (B, 1, 1, T)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return torch.tanh(self.pooler.dense(x[:, 0]))


def _projection(n_in: int, n_out: int = 512) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.ReLU(), nn.Linear(n_out, n_out))


class CLAP(nn.Module):
    """laion_clap's CLAP model (names as in its checkpoints): audio_branch, text_branch and two projections."""

    def __init__(self, audio: HtsatConfig = HtsatConfig(), text: RobertaConfig = RobertaConfig(), joint: int = 512):
        super().__init__()
        self.audio_branch = HTSAT(audio)
        self.text_branch = Roberta(text)
        self.audio_projection = _projection(audio.out_dim, joint)
        self.text_projection = _projection(text.hidden_size, joint)

    def audio_embedding(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, 480000) at 48 kHz -> (B, joint), unit length."""
        return F.normalize(self.audio_projection(self.audio_branch(wav)), dim=-1)

    def text_embedding(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text_branch(ids, attention_mask)), dim=-1)


class Tokenizer:
    """RoBERTa's byte-level BPE from vocab.json and merges.txt (what transformers' RobertaTokenizer reads),
    with its `<s> ... </s>` template, truncation and padding to 77 tokens."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

        vocab, merges = models.BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        tok = HFTokenizer(models.BPE(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]))
        tok.enable_truncation(MAX_TOKENS)
        tok.enable_padding(length=MAX_TOKENS, pad_id=vocab["<pad>"], pad_token="<pad>")
        self.tok = tok

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tok.encode_batch(texts)
        return (torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc]))


def audio_input(wav: torch.Tensor) -> torch.Tensor:
    """Mono (samples,) at 48 kHz -> (480000,): the first 10 s, or a shorter clip repeated and zero-padded."""
    if wav.shape[-1] >= CLIP_SAMPLES:
        return wav[:CLIP_SAMPLES]
    wav = wav.repeat(CLIP_SAMPLES // wav.shape[-1])
    return F.pad(wav, (0, CLIP_SAMPLES - wav.shape[-1]))


class ClapEmbedder:
    """Clips (mono at 48 kHz) -> (1, 512) each; captions -> (512,) each."""
    name = "clap"
    sample_rate = SAMPLE_RATE
    dim = 512

    def __init__(self, model: CLAP, tokenizer: Tokenizer, fingerprint: str, device: str = "cpu",
                 batch_size: int = 8):
        self.model, self.tokenizer, self.fingerprint = model.eval().to(device), tokenizer, fingerprint
        self.device, self.batch_size = device, batch_size

    @torch.inference_mode()
    def embed(self, clips: list[torch.Tensor]) -> list[np.ndarray]:
        out = []
        for i in range(0, len(clips), self.batch_size):
            x = torch.stack([audio_input(c.float()) for c in clips[i:i + self.batch_size]]).to(self.device)
            out += [e[None] for e in self.model.audio_embedding(x).float().cpu().numpy()]
        return out

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), 64):
            ids, mask = self.tokenizer(texts[i:i + 64])
            out.append(self.model.text_embedding(ids.to(self.device), mask.to(self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def load_state(model: CLAP, state: dict) -> None:
    """Load a laion_clap checkpoint ({"state_dict": ...} or plain, names with or without "module.")."""
    state = state.get("state_dict", state)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not any(u in k for u in UNUSED)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"not a LAION-CLAP HTSAT-base checkpoint: missing {missing[:3]}, unexpected {unexpected[:3]}")


def load(path, text_folder, device: str = "cpu", fingerprint: str = "") -> ClapEmbedder:
    text_folder = Path(text_folder)
    from .weights import read_state

    state = read_state(path)   # first: a file that is refused costs no model; laion_clap's NumPy numbers load
    model = CLAP(text=RobertaConfig.from_file(text_folder / "config.json"))
    load_state(model, state)
    return ClapEmbedder(model, Tokenizer(text_folder), fingerprint, device)
