"""HTS-AT (Chen et al. 2022), the audio tower of LAION-CLAP, as laion_clap builds it for `HTSAT-base` without
feature fusion; parameter names are laion_clap's, so its checkpoints load unchanged.

    48 kHz mono, 10 s (480000 samples) -> |STFT|² (n_fft 1024, hop 480, periodic Hann, centred, reflect)
      -> 64 Slaney mel bands 50-14000 Hz -> 10 log10(max(x, 1e-10))                      (B, 1, 1001, 64)
      -> BatchNorm over the mel bands -> bicubic resize of time to 1024 frames
      -> folded into a 256x256 image: 4 time quarters stacked along the mel axis
      -> 4x4 patches (64x64 tokens, 128-d) -> 4 Swin stages (depths 2, 2, 12, 2; windows of 8x8, every second
         block shifted by 4; patch merging between stages: 128 -> 1024 channels, 64x64 -> 8x8 tokens)
      -> LayerNorm -> mean over the tokens                                                    (B, 1024)

The classification head (tscam_conv, head) is not needed for the embedding and is not built.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 48000
CLIP_SAMPLES = 480000      # 10 s


@dataclass(frozen=True)
class HtsatConfig:
    embed_dim: int = 128                 # HTSAT-base (tiny: 96)
    depths: tuple = (2, 2, 12, 2)
    heads: tuple = (4, 8, 16, 32)
    window: int = 8
    spec_size: int = 256                 # the square image the spectrogram is folded into
    mels: int = 64
    n_fft: int = 1024
    hop: int = 480
    fmin: float = 50.0
    fmax: float = 14000.0

    @property
    def out_dim(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)


def _hz_to_mel(f):
    """Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep, f * 3.0 / 200.0)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), m * 200.0 / 3.0)


@functools.lru_cache(maxsize=2)
def slaney_mel(rate: int = SAMPLE_RATE, n_fft: int = 1024, mels: int = 64, fmin: float = 50.0,
               fmax: float = 14000.0) -> torch.Tensor:
    """(n_fft // 2 + 1, mels) librosa.filters.mel(htk=False, norm="slaney"), as torchlibrosa's melW."""
    fft_freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    points = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), mels + 2))
    ramps = points[:, None] - fft_freqs[None, :]
    fdiff = np.diff(points)[:, None]
    w = np.maximum(0.0, np.minimum(-ramps[:-2] / fdiff[:-1], ramps[2:] / fdiff[1:]))
    w *= (2.0 / (points[2:] - points[:-2]))[:, None]
    return torch.from_numpy(w.T.astype(np.float32))


def log_mel(wav: torch.Tensor, cfg: HtsatConfig) -> torch.Tensor:
    """(B, samples) -> (B, frames, mels) in dB, torchlibrosa's Spectrogram + LogmelFilterBank(top_db=None)."""
    window = torch.hann_window(cfg.n_fft, dtype=wav.dtype, device=wav.device)
    spec = torch.stft(wav, cfg.n_fft, cfg.hop, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = (spec.real ** 2 + spec.imag ** 2).transpose(1, 2)                   # (B, frames, 513)
    mel = power @ slaney_mel(SAMPLE_RATE, cfg.n_fft, cfg.mels, cfg.fmin, cfg.fmax).to(wav.device)
    return 10.0 * torch.log10(mel.clamp(min=1e-10))


def _windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, w * w, C), windows in row-major order."""
    B, H, W, C = x.shape
    return x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)


def _unwindows(x: torch.Tensor, w: int, H: int, W: int) -> torch.Tensor:
    C = x.shape[-1]
    return x.view(-1, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, heads: int, window: int, shift: int):
        super().__init__()
        if resolution <= window:   # one window covers the map: nothing to shift
            window, shift = resolution, 0
        self.resolution, self.window, self.shift, self.heads = resolution, window, shift, heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.attn.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = nn.Linear(4 * dim, dim)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)
        self.register_buffer("mask", self._shift_mask() if shift else None, persistent=False)

    def _shift_mask(self) -> torch.Tensor:
        """(nW, w², w²): -100 between tokens that the cyclic shift brought from different regions."""
        H, w, s = self.resolution, self.window, self.shift
        region = torch.zeros(1, H, H, 1)
        cuts = (slice(0, -w), slice(-w, -s), slice(-s, None))
        for i, (a, b) in enumerate((a, b) for a in cuts for b in cuts):
            region[:, a, b, :] = i
        r = _windows(region, w)[..., 0]                                             # (nW, w²)
        return (r[:, None, :] - r[:, :, None]).ne(0).float() * -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        H, w, s = self.resolution, self.window, self.shift
        y = self.norm1(x).view(B, H, H, C)
        if s:
            y = torch.roll(y, (-s, -s), (1, 2))
        y = _windows(y, w)                                                          # (B nW, w², C)
        q, k, v = self.attn.qkv(y).view(y.shape[0], w * w, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.attn.relative_position_bias_table[self.index].permute(2, 0, 1)  # (heads, w², w²)
        if self.mask is not None:   # windows are ordered clip by clip, so the window masks repeat per clip
            bias = (bias[None] + self.mask[:, None]).repeat(B, 1, 1, 1)             # (B nW, heads, w², w²)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)                 # (B nW, heads, w², hd)
        y = self.attn.proj(y.transpose(1, 2).reshape(-1, w * w, C))
        y = _unwindows(y, w, H, H)
        if s:
            y = torch.roll(y, (s, s), (1, 2))
        x = x + y.reshape(B, L, C)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        x = x.view(B, self.resolution, self.resolution, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class Stage(nn.Module):
    def __init__(self, dim: int, resolution: int, depth: int, heads: int, window: int, merge: bool):
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2)
                                    for i in range(depth))
        self.downsample = PatchMerging(dim, resolution) if merge else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class HTSAT(nn.Module):
    """laion_clap's HTSAT_Swin_Transformer (no fusion), up to the pooled embedding."""

    def __init__(self, cfg: HtsatConfig = HtsatConfig()):
        super().__init__()
        self.cfg = cfg
        self.freq_ratio = cfg.spec_size // cfg.mels
        self.bn0 = nn.BatchNorm2d(cfg.mels)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, cfg.embed_dim, 4, 4)
        self.patch_embed.norm = nn.LayerNorm(cfg.embed_dim)
        grid = cfg.spec_size // 4
        self.layers = nn.ModuleList(
            Stage(cfg.embed_dim * 2 ** i, grid // 2 ** i, d, h, cfg.window, i < len(cfg.depths) - 1)
            for i, (d, h) in enumerate(zip(cfg.depths, cfg.heads)))
        self.norm = nn.LayerNorm(cfg.out_dim)

    def image(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, frames, mels) log-mel -> (B, 1, 256, 256): laion_clap's bn0 and reshape_wav2img."""
        x = self.bn0(mel[:, None].transpose(1, 3)).transpose(1, 3)                  # (B, 1, frames, mels)
        target_t = self.cfg.spec_size * self.freq_ratio
        if x.shape[2] > target_t:
            raise ValueError(f"HTSAT takes at most {target_t} frames, got {x.shape[2]}")
        if x.shape[2] < target_t:
            x = F.interpolate(x, (target_t, x.shape[3]), mode="bicubic", align_corners=True)
        B, _, T, Fm = x.shape
        x = x.permute(0, 1, 3, 2).reshape(B, 1, Fm, self.freq_ratio, T // self.freq_ratio)
        return x.permute(0, 1, 3, 2, 4).reshape(B, 1, Fm * self.freq_ratio, T // self.freq_ratio)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, 480000) at 48 kHz -> (B, out_dim)."""
        x = self.patch_embed.proj(self.image(log_mel(wav, self.cfg)))                # (B, d, 64, 64)
        x = self.patch_embed.norm(x.flatten(2).transpose(1, 2))                     # (B, 4096, d)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x).mean(dim=1)
