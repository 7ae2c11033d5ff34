"""EnCodec, the audio tokenizer of MusicGen: SEANet encoder/decoder around a residual vector quantiser.

    audio (B, 1, samples) --encoder--> latent (B, 128, frames) --RVQ--> codes (B, K, frames)
    codes --sum of codebook vectors--> latent --decoder--> audio (B, 1, frames * hop)

The 32 kHz music codec: non-causal convolutions padded as its config says (reflect in the Hugging Face
configs, zeros in audiocraft's, which changes the audio near the ends), downsampling ratios 4,4,5,8
(hop 640 samples, 50 frames/s), one residual block per scale, a 2-layer LSTM at the bottleneck, 4 codebooks
of 2048 entries. Weight norm is folded into plain weights at load time (`fold_weight_norm`), so inference is
ordinary convolutions. Parameter names match transformers' `EncodecModel` after folding, e.g.
`encoder.layers.0.conv.weight`, `decoder.layers.1.lstm.weight_ih_l0`, `quantizer.layers.0.codebook.embed`.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .accel import codec as codec_fast
from .config import PAD_MODES, CodecConfig


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace weight-norm pairs by the weight they define; drop quantiser training statistics.

    Both spellings are accepted: `X.weight_g` / `X.weight_v` (torch.nn.utils.weight_norm) and
    `X.parametrizations.weight.original0` / `.original1` (torch.nn.utils.parametrizations.weight_norm).
    Norms are taken over every dimension but 0, as both of those do by default.
    """
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        m = re.match(r"^(.*)\.(?:weight_(g|v)|parametrizations\.weight\.original(0|1))$", name)
        if m:
            part = m.group(2) or ("g" if m.group(3) == "0" else "v")
            pairs.setdefault(m.group(1), {})[part] = tensor
        elif re.search(r"\.codebook\.(inited|cluster_size|embed_avg)$", name):
            continue   # EMA statistics of codebook training; inference needs `embed` only
        else:
            out[name] = tensor
    for prefix, pair in pairs.items():
        if set(pair) != {"g", "v"}:
            missing = "weight_g" if "g" not in pair else "weight_v"
            raise ValueError(f"weight norm of {prefix} lacks its {missing} part")
        g, v = pair["g"], pair["v"]
        out[f"{prefix}.weight"] = torch._weight_norm(v.float(), g.float(), 0).to(v.dtype)
    return out


class Conv(nn.Module):
    """Conv1d that pads its input like EnCodec: total padding kernel-stride, plus what a whole last frame needs."""

    def __init__(self, cfg: CodecConfig, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, stride, dilation=dilation)
        self.causal, self.pad_mode = cfg.causal, cfg.pad_mode
        self.stride = stride
        self.effective_kernel = (kernel - 1) * dilation + 1
        self.padding_total = self.effective_kernel - stride

    def padding(self, length: int) -> tuple[int, int]:
        """(left, right) padding of an input of `length` samples."""
        # with padding_total = kernel - stride, a whole last frame needs the length rounded up to the stride
        extra = -length % self.stride
        if self.causal:
            return self.padding_total, extra
        right = self.padding_total // 2
        return self.padding_total - right, right + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_pad1d(x, *self.padding(x.shape[-1]), self.pad_mode))


def _pad1d(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """F.pad, but reflect padding also works on inputs shorter than the pad (zeros are appended first)."""
    if mode != "reflect":
        return F.pad(x, (left, right), mode=mode)
    length = x.shape[-1]
    extra = max(left, right) - length + 1 if length <= max(left, right) else 0
    if extra:
        x = F.pad(x, (0, extra))
    x = F.pad(x, (left, right), mode="reflect")
    return x[..., :x.shape[-1] - extra]


class ConvTranspose(nn.Module):
    def __init__(self, cfg: CodecConfig, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(cin, cout, kernel, stride)
        total = kernel - stride
        right = math.ceil(total * cfg.trim_right_ratio) if cfg.causal else total // 2
        self.trim = (total - right, right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        left, right = self.trim
        return y[..., left:y.shape[-1] - right]


class LSTMBlock(nn.Module):
    """Multi-layer LSTM over time with a residual connection; (B, C, T) in and out."""

    def __init__(self, cfg: CodecConfig, dim: int):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, cfg.num_lstm_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(2, 0, 1)                 # (T, B, C)
        return (self.run(x)[0] + x).permute(1, 2, 0)

    def run(self, x: torch.Tensor, state=None):
        """The LSTM alone, as nn.LSTM: (T, B, C) and optional (h, c) -> (y, (h, c)); on CPU in float32 without
        autograd through codec_fast's native recurrence (equal to float rounding)."""
        if codec_fast.enabled(x):
            out = codec_fast.lstm(self.lstm, x, state)
            if out is not None:
                return out
        return self.lstm(x, state)


class ResBlock(nn.Module):
    """ELU, conv k=3 (dim -> dim/compress), ELU, conv k=1 (back to dim); plus the input."""

    def __init__(self, cfg: CodecConfig, dim: int, dilation: int):
        super().__init__()
        hidden = dim // cfg.compress
        self.block = nn.ModuleList([nn.ELU(), Conv(cfg, dim, hidden, cfg.residual_kernel_size, dilation=dilation),
                                    nn.ELU(), Conv(cfg, hidden, dim, 1)])
        self.shortcut = Conv(cfg, dim, dim, 1) if cfg.use_conv_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.block:
            y = layer(y)
        return self.shortcut(x) + y


class Encoder(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        layers: list[nn.Module] = [Conv(cfg, cfg.channels, cfg.num_filters, cfg.kernel_size)]
        scale = 1
        for ratio in reversed(cfg.ratios):
            width = scale * cfg.num_filters
            layers += [ResBlock(cfg, width, cfg.dilation_growth_rate ** j) for j in range(cfg.num_residual_layers)]
            layers += [nn.ELU(), Conv(cfg, width, 2 * width, 2 * ratio, stride=ratio)]
            scale *= 2
        layers += [LSTMBlock(cfg, scale * cfg.num_filters), nn.ELU(),
                   Conv(cfg, scale * cfg.num_filters, cfg.hidden_size, cfg.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = codec_fast.split(self) if codec_fast.enabled(x) else -1
        return codec_fast.encode(self, x, start) if start >= 0 else self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Layer by layer through torch's convolutions (training, other devices, and the tests' yardstick)."""
        for layer in self.layers:
            x = layer(x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        scale = 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [Conv(cfg, cfg.hidden_size, scale * cfg.num_filters, cfg.kernel_size),
                                   LSTMBlock(cfg, scale * cfg.num_filters)]
        for ratio in cfg.ratios:
            width = scale * cfg.num_filters
            layers += [nn.ELU(), ConvTranspose(cfg, width, width // 2, 2 * ratio, ratio)]
            layers += [ResBlock(cfg, width // 2, cfg.dilation_growth_rate ** j) for j in range(cfg.num_residual_layers)]
            scale //= 2
        layers += [nn.ELU(), Conv(cfg, cfg.num_filters, cfg.channels, cfg.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = codec_fast.split(self) if codec_fast.enabled(x) else -1
        return codec_fast.decode(self, x, start) if start >= 0 else self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Layer by layer through torch's convolutions (training, other devices, and the tests' yardstick)."""
        for layer in self.layers:
            x = layer(x)
        return x


class Codebook(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("embed", torch.zeros(size, dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) index of the nearest codebook vector (the reference's exact distance expression)."""
        embed = self.embed.t()
        dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ embed + embed.pow(2).sum(0, keepdim=True))
        return dist.max(dim=-1).indices


class VectorQuantizer(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.codebook = Codebook(size, dim)


class ResidualVQ(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        dim = cfg.codebook_dim or cfg.hidden_size
        self.layers = nn.ModuleList([VectorQuantizer(cfg.codebook_size, dim) for _ in range(cfg.quantizer_layers)])
        self.num_codebooks = cfg.num_codebooks

    def encode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, D, F) -> codes (B, K, F): each codebook quantises what the previous ones left."""
        B, D, Fr = latent.shape
        residual = latent.transpose(1, 2).reshape(B * Fr, D)
        codes = []
        for layer in self.layers[:self.num_codebooks]:
            idx = layer.codebook.encode(residual)
            residual = residual - F.embedding(idx, layer.codebook.embed)
            codes.append(idx.view(B, Fr))
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, K, F) -> latent (B, D, F), the sum of the chosen vectors."""
        out = torch.zeros((), device=codes.device)
        for k in range(codes.shape[1]):
            out = out + F.embedding(codes[:, k], self.layers[k].codebook.embed)
        return out.transpose(1, 2)


class EnCodec(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        if cfg.normalize:
            raise ValueError("EnCodec with input normalisation (normalize=true) is not a MusicGen codec")
        if cfg.pad_mode not in PAD_MODES:
            raise ValueError(f"EnCodec pad_mode {cfg.pad_mode!r} is not supported: choose {', '.join(PAD_MODES)}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = ResidualVQ(cfg)

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def frame_rate(self) -> int:
        return self.cfg.frame_rate

    @property
    def hop_length(self) -> int:
        return self.cfg.hop_length

    @property
    def num_codebooks(self) -> int:
        return self.cfg.num_codebooks

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, channels, samples) -> codes (B, K, ceil(samples / hop))."""
        return self.quantizer.encode(self.encoder(audio))

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, K, F) -> audio (B, channels, F * hop)."""
        if codes.shape[1] > len(self.quantizer.layers):
            raise ValueError(f"codes have {codes.shape[1]} codebooks, the codec {len(self.quantizer.layers)}")
        return self.decoder(self.quantizer.decode(codes))
