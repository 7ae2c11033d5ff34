"""PaSST (Koutini et al. 2021), the AudioSet classifier behind the KL metric: a port of hear21passt's 20 s
model (`base20sec.get_basic_model(mode="logits")`) that loads its released weight file unchanged.

    32 kHz mono (up to 20 s) -> pre-emphasis (x[n+1] - 0.97 x[n])
      -> |STFT|² (n_fft 1024, window: symmetric Hann of 800, hop 320, centred, reflect padding)
      -> 128 Kaldi mel bands 0-15000 Hz -> log(mel + 1e-5) -> (x + 4.5) / 5              (B, 1, 128, frames)
      -> 16x16 patches every 10x10 -> + frequency and time position tables (time cut to the input's length)
      -> [cls + dist tokens, patches] -> 12 ViT blocks (768-d, 12 heads) -> LayerNorm
      -> mean of the cls and dist outputs -> LayerNorm -> Linear -> 527 AudioSet logits

In evaluation PaSST drops no patches and augments nothing, so inputs of any length up to 20 s give the
logits the package gives them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 32000
WEIGHTS = "passt-s-f128-20sec-p16-s10-ap.474-swa.pt"


@dataclass(frozen=True)
class PasstConfig:
    embed_dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    classes: int = 527             # AudioSet
    mels: int = 128
    time_patches: int = 200        # the time position table: 2000 frames (20 s) at stride 10
    patch: int = 16
    stride: int = 10


@functools.lru_cache(maxsize=2)
def kaldi_mel_banks(bins: int = 128, n_fft: int = 1024, rate: int = SAMPLE_RATE, fmin: float = 0.0,
                    fmax: float = 15000.0) -> torch.Tensor:
    """(bins, n_fft // 2 + 1) triangles on Kaldi's mel scale: torchaudio.compliance.kaldi.get_mel_banks
    (without VTLN warping) with the zero column hear21passt appends for the Nyquist bin."""
    def mel(f):
        return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)
    lo, hi = mel(fmin), mel(fmax)
    delta = (hi - lo) / (bins + 1)
    left = lo + np.arange(bins)[:, None] * delta
    center, right = left + delta, left + 2 * delta
    freqs = mel(rate / n_fft * np.arange(n_fft // 2))[None, :]
    w = np.maximum(0.0, np.minimum((freqs - left) / (center - left), (right - freqs) / (right - center)))
    return torch.from_numpy(np.pad(w, ((0, 0), (0, 1)))).float()


def log_mel(wav: torch.Tensor) -> torch.Tensor:
    """(B, samples) at 32 kHz -> hear21passt's normalised log-mel (B, 128, frames)."""
    x = wav[:, 1:] - 0.97 * wav[:, :-1]
    window = torch.hann_window(800, periodic=False, dtype=x.dtype, device=x.device)
    spec = torch.stft(x, 1024, hop_length=320, win_length=800, window=window, center=True, return_complex=True)
    power = spec.real ** 2 + spec.imag ** 2                                   # (B, 513, frames)
    mel = kaldi_mel_banks().to(x.device) @ power
    return (torch.log(mel + 1e-5) + 4.5) / 5.0


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)                                # (B, heads, N, hd)
        x = x + self.attn.proj(y.transpose(1, 2).reshape(B, N, C))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class PaSST(nn.Module):
    """hear21passt's PaSST (distilled: cls and dist tokens) with its parameter names."""

    def __init__(self, cfg: PasstConfig = PasstConfig()):
        super().__init__()
        d, freq_patches = cfg.embed_dim, (cfg.mels - cfg.patch) // cfg.stride + 1
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, d, cfg.patch, cfg.stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d))
        self.new_pos_embed = nn.Parameter(torch.zeros(1, 2, d))
        self.freq_new_pos_embed = nn.Parameter(torch.zeros(1, d, freq_patches, 1))
        self.time_new_pos_embed = nn.Parameter(torch.zeros(1, d, 1, cfg.time_patches))
        self.blocks = nn.Sequential(*[Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.classes))
        self.head_dist = nn.Linear(d, cfg.classes)   # trained by distillation; the logits use `head` alone

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, samples) mono at 32 kHz, at most 20 s -> (B, 527) logits."""
        x = self.patch_embed.proj(log_mel(wav)[:, None])                          # (B, d, 12, t)
        if x.shape[-1] > self.time_new_pos_embed.shape[-1]:
            raise ValueError(f"PaSST takes at most {self.time_new_pos_embed.shape[-1]} time patches (20 s)")
        x = x + self.time_new_pos_embed[..., :x.shape[-1]] + self.freq_new_pos_embed
        x = x.flatten(2).transpose(1, 2)                                           # (B, 12 t, d)
        tokens = torch.cat([self.cls_token, self.dist_token], 1) + self.new_pos_embed
        x = self.norm(self.blocks(torch.cat([tokens.expand(x.shape[0], -1, -1), x], 1)))
        return self.head((x[:, 0] + x[:, 1]) / 2)


class PasstEmbedder:
    """Chunks (mono at 32 kHz, each at most 20 s) -> AudioSet class probabilities (1, 527) each. Chunks of one
    length run as one batch: padding a shorter one would change what the model hears."""
    name = "passt"
    sample_rate = SAMPLE_RATE
    dim = 527

    def __init__(self, model: PaSST, fingerprint: str, device: str = "cpu", batch_size: int = 8):
        self.model, self.fingerprint = model.eval().to(device), fingerprint
        self.device, self.batch_size = device, batch_size

    @torch.inference_mode()
    def embed(self, chunks: list[torch.Tensor]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(chunks)
        by_length: dict[int, list[int]] = {}
        for i, c in enumerate(chunks):
            by_length.setdefault(c.shape[-1], []).append(i)
        for idx in by_length.values():
            for s in range(0, len(idx), self.batch_size):
                part = idx[s:s + self.batch_size]
                logits = self.model(torch.stack([chunks[i] for i in part]).float().to(self.device))
                for i, p in zip(part, torch.softmax(logits.float(), -1).cpu().numpy()):
                    out[i] = p[None]                                          # (1, 527)
        return out


def load(path, device: str = "cpu", fingerprint: str = "") -> PasstEmbedder:
    """The embedder with the released `passt-s-f128-20sec-p16-s10-ap.474-swa.pt`."""
    from .weights import read_state

    state = read_state(path)
    model = PaSST()
    try:
        model.load_state_dict(state.get("model", state))
    except (RuntimeError, AttributeError) as e:
        raise ValueError(f"{path} is not hear21passt's 20 s PaSST: {str(e).splitlines()[0]}") from None
    return PasstEmbedder(model, fingerprint, device)


def chunks(wav: torch.Tensor, seconds: float = 20.0, min_seconds: float = 0.15) -> list[torch.Tensor]:
    """audiocraft's PaSST input: the clip split into 20 s chunks, not padded, chunks of 0.15 s or less dropped."""
    size, least = int(seconds * SAMPLE_RATE), int(min_seconds * SAMPLE_RATE)
    return [c for c in torch.split(wav, size, dim=-1) if c.shape[-1] > least]


