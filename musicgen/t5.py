"""The T5 encoder that turns a text description into the states the LM cross-attends to.

MusicGen uses the encoder half of t5-base, frozen: 12 pre-norm blocks of (RMS norm, self-attention with a
learned relative-position bias shared by all layers, residual) and (RMS norm, ReLU feed-forward, residual),
then a final RMS norm. T5 does not scale its attention logits by 1/sqrt(d). Parameter names are those of
transformers' `T5EncoderModel` (`shared.weight`, `encoder.block.0.layer.0.SelfAttention.q.weight`, ...), so a
checkpoint's `text_encoder.*` tensors load unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import embedding
from .config import T5Config


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, statistics in float32 whatever the weights' precision."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(self.weight.dtype)


def relative_buckets(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucketing: half the buckets per direction; exact up to num_buckets/4, then log-spaced."""
    num_buckets //= 2
    buckets = (relative > 0).long() * num_buckets
    distance = relative.abs()
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class Attention(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        if relative_bias:
            self.relative_attention_bias = embedding(self.num_buckets, cfg.num_heads)

    def position_bias(self, length: int, device) -> torch.Tensor:
        pos = torch.arange(length, device=device)
        buckets = relative_buckets(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]       # (1, H, L, L)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.heads, self.d_kv).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.clamp(min=torch.finfo(q.dtype).min).to(q.dtype),
                                           scale=1.0)
        return self.o(y.transpose(1, 2).reshape(B, L, -1))


class SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        self.SelfAttention = Attention(cfg, relative_bias)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class DenseReluDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated = cfg.feed_forward_proj.startswith("gated-")
        act = cfg.feed_forward_proj.removeprefix("gated-")
        if act not in ("relu", "gelu", "gelu_new", "silu"):
            raise ValueError(f"unsupported T5 feed_forward_proj {cfg.feed_forward_proj!r}")
        # transformers maps "gated-gelu" to the tanh approximation ("gelu_new")
        self.act = {"relu": F.relu, "silu": F.silu, "gelu": (lambda t: F.gelu(t, approximate="tanh")) if self.gated
                    else F.gelu, "gelu_new": lambda t: F.gelu(t, approximate="tanh")}[act]
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = DenseReluDense(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([SelfAttentionLayer(cfg, relative_bias), FeedForwardLayer(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.layer[1](self.layer[0](x, bias))
        if x.dtype == torch.float16:   # as transformers: keep fp16 activations finite
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-limit, limit)
        return x


class Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList([Block(cfg, relative_bias=i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Encoder(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, L) and mask (B, L) with 1 for real tokens -> states (B, L, d_model)."""
        x = self.shared(ids)
        B, L = ids.shape
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(L, ids.device).float()  # (1, H, L, L)
        if mask is not None:   # padded keys get the most negative float: they take no attention
            bias = bias + (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
