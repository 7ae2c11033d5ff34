"""The MusicGen language model: a pre-norm transformer decoder over K parallel codebook streams.

Input: one token per codebook per position; the K embeddings are summed, sinusoidal positions added.
Each layer: causal self-attention, cross-attention to the projected text states, GELU feed-forward.
Output: one linear head per codebook.

Melody checkpoints (`cfg.prefix_conditioning`) have no cross-attention: the conditions (projected chroma,
then projected text) are prepended as the first positions of the sequence (`forward(..., prefix=...)`), so
they sit in the self-attention cache and code positions count on after them.

Two entry points, both exact float32 PyTorch (the reference every faster path is measured against):
- `forward`: a whole sequence from position 0 (training, teacher forcing, and the prefill of a generation,
  which also stores its keys and values in a cache);
- `step`: one position per row, each row at its own position, over a static cache (musicgen/engine.py); the
  layer loop `step_layers` is the reference backend of a decoding step.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import building_on_meta, embedding
from .config import LMConfig


def sinusoids(length: int, dim: int) -> torch.Tensor:
    """(length, dim) table, cos half then sin half (audiocraft / transformers convention)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -(math.log(10000) / (half - 1)))
    angles = torch.arange(length, dtype=torch.int64).float()[:, None] * freq[None]
    table = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        table = F.pad(table, (0, 1))
    return table


KV_SCALE_BYTES = 4   # an int8 cache row: head_dim int8 codes, then its float32 scale (see kv_quantize)


def kv_quantize(x: torch.Tensor) -> torch.Tensor:
    """(..., hd) float keys or values -> (..., hd + 4) int8 rows: the codes round(x / s) (nearest even) and the
    float32 scale s = max(max|x|, 1e-12) / 127 in the last 4 bytes, as int8 weights are quantised per row
    (accel.quant.quantize_per_channel). The native decoder writes the same bytes."""
    from .accel.quant import quantize_per_channel

    hd = x.shape[-1]
    codes, scale = quantize_per_channel(x.reshape(-1, hd))
    return torch.cat([codes, scale[:, None].view(torch.int8)], dim=1).view(*x.shape[:-1], hd + KV_SCALE_BYTES)


def kv_dequantize(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., hd + 4) int8 rows (kv_quantize) -> (..., hd) codes * scale, computed in float32, in `dtype`."""
    hd = rows.shape[-1] - KV_SCALE_BYTES
    return (rows[..., :hd].float() * rows[..., hd:].contiguous().view(torch.float32)).to(dtype)


def kv_encode(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values as a cache of `dtype` stores them: int8 rows (kv_quantize) or x in that dtype."""
    return kv_quantize(x) if dtype == torch.int8 else x.to(dtype)


def kv_read(stored: torch.Tensor, attend_dtype: torch.dtype) -> torch.Tensor:
    """Cache positions as attention reads them: int8 rows dequantized to `attend_dtype`, float caches as
    they are."""
    return kv_dequantize(stored, attend_dtype) if stored.dtype == torch.int8 else stored


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention over whole sequences; under CPU autocast (mixed-precision training) in
    float32. Autocast would run it in 16 bits, and PyTorch's 16-bit flash attention on CPU is several times slower
    than its float32 one, its backward most of all (docs/training.md); float32 is also the more accurate."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal,
                                                  attn_mask=None if mask is None else mask.float())
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """What norm(x) computes, without the module call."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def decode_product(linear: nn.Module, rows: int, dtype: torch.dtype):
    """How a decoding step multiplies x2 (rows, in) of `dtype` by `linear`: a quantised layer's few-row kernel
    bound to its weights (accel/quant.py `few_rows`), F.linear for a plain nn.Linear, and the module itself
    for anything else (a fine-tuning adapter)."""
    few_rows = getattr(linear, "few_rows", None)
    if few_rows is not None:
        return few_rows(rows, dtype)
    if type(linear) is nn.Linear:
        return functools.partial(F.linear, weight=linear.weight, bias=linear.bias)
    return linear


class SelfAttention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)     # q, k, v fused: one product per step
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, store=None) -> torch.Tensor:
        """Causal attention over x (B, T, D) from position 0. store (keys, values, attend dtype), each (B, H,
        >= T, hd) rows of a cache: this sequence's keys and values are kept there and attention reads them as
        stored (as the decoding steps that follow will)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        if store is not None:
            keys, values, attend = store
            keys[:, :, :T] = kv_encode(k, keys.dtype)
            values[:, :, :T] = kv_encode(v, values.dtype)
            k, v = kv_read(keys[:, :, :T], attend), kv_read(values[:, :, :T], attend)
            q = q.to(k.dtype)
        y = attention(q, k, v, causal=T > 1)                                   # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, D).to(x.dtype))


class CrossAttention(nn.Module):
    def __init__(self, cfg: LMConfig, context_dim: int):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def project(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = context.shape
        k, v = self.kv(context).view(B, S, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v                                                           # 2 x (B, H, S, hd)

    def forward(self, x, kv: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        y = attention(q.to(kv[0].dtype), kv[0], kv[1], bias)
        return self.out(y.transpose(1, 2).reshape(B, T, D).to(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.self_attn = SelfAttention(cfg)
        prefix = cfg.prefix_conditioning   # conditions are prepended tokens: no cross-attention sub-layer
        self.norm_cross = None if prefix else nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.cross_attn = None if prefix else CrossAttention(cfg, context_dim)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        if cfg.activation not in ("gelu", "relu"):
            raise ValueError(f"unsupported decoder activation {cfg.activation!r}")
        self.act = F.gelu if cfg.activation == "gelu" else F.relu

    def forward(self, x, cross_kv, cross_bias, store=None):
        x = x + self.self_attn(self.norm1(x), store)
        return self._rest(x, cross_kv, cross_bias)

    def step(self, x, rows, pos, keys, values, attend, mask, cross_kv, cross_bias):
        """One decoding step of this layer: x (R, D), row r at position pos[r] (an int: every row there; rows:
        arange(R) otherwise). Each row's key and value go to its own position of the cache (keys, values:
        (>= R, H, W, hd) views of the first W positions); attention reads the first W under `mask` (R, 1, 1, W)
        (None: every row sees all W). The same operations as `forward` on one position, called directly
        (F.layer_norm, `decode_product`) rather than through the modules: a step is dozens of small calls, and
        module dispatch was a large share of it."""
        R, D = x.shape
        attn = self.self_attn
        H, hd = attn.heads, attn.head_dim
        qkv = decode_product(attn.qkv, R, x.dtype)(layer_norm(self.norm1, x))
        q, k, v = qkv.view(R, 3, H, 1, hd).unbind(1)                           # 3 x (R, H, 1, hd)
        k, v = k[:, :, 0], v[:, :, 0]                                           # (R, H, hd)
        if keys.dtype != k.dtype:
            k, v = kv_encode(k, keys.dtype), kv_encode(v, values.dtype)
        if rows is None:
            keys[:R, :, pos], values[:R, :, pos] = k, v
        else:
            keys[rows, :, pos], values[rows, :, pos] = k, v                     # at (r, :, pos[r])
        keys, values = kv_read(keys[:R], attend), kv_read(values[:R], attend)  # (R, H, W, hd)
        y = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask)
        x = x + decode_product(attn.out, R, x.dtype)(y.transpose(1, 2).reshape(R, D).to(x.dtype))
        if self.cross_attn is not None:
            cross = self.cross_attn
            q = decode_product(cross.q, R, x.dtype)(layer_norm(self.norm_cross, x)).view(R, H, 1, hd)
            y = F.scaled_dot_product_attention(q.to(cross_kv[0].dtype), cross_kv[0], cross_kv[1],
                                               attn_mask=cross_bias)
            x = x + decode_product(cross.out, R, x.dtype)(y.transpose(1, 2).reshape(R, D).to(x.dtype))
        h = decode_product(self.fc1, R, x.dtype)(layer_norm(self.norm2, x))
        return x + decode_product(self.fc2, R, x.dtype)(self.act(h))

    def _rest(self, x, cross_kv, cross_bias):
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), cross_kv, cross_bias)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class MusicLM(nn.Module):
    def __init__(self, cfg: LMConfig, context_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        context_dim = context_dim or cfg.dim
        K, V, D = cfg.num_codebooks, cfg.vocab_size, cfg.dim
        self.embed = nn.ModuleList([embedding(V + 1, D) for _ in range(K)])      # +1: the special token
        self.layers = nn.ModuleList([DecoderLayer(cfg, context_dim) for _ in range(cfg.num_layers)])
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.heads = nn.ModuleList([nn.Linear(D, V, bias=False) for _ in range(K)])
        # on the meta device (load) the table stays empty until load computes it: computing it there would
        # import torch._dynamo (see checkpoint.embedding)
        positions = torch.empty(cfg.max_position_embeddings, D) if building_on_meta() else \
            sinusoids(cfg.max_position_embeddings, D)
        self.register_buffer("positions", positions, persistent=False)
        self.embed_scale = math.sqrt(D) if cfg.scale_embedding else 1.0

    # -- conditioning -----------------------------------------------------------------------------------
    def cross_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer cross-attention keys/values for (B, S, C) context: computed once per generation."""
        if self.cfg.prefix_conditioning:
            return None
        return [layer.cross_attn.project(context) for layer in self.layers]

    @staticmethod
    def cross_bias(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
        """(B, S) 0/1 text mask -> additive (B, 1, 1, S) bias; a fully masked row attends uniformly to zeros."""
        if mask is None:
            return None
        return ((1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min).to(dtype)

    # -- whole sequences --------------------------------------------------------------------------------
    def forward(self, codes: torch.Tensor, cross_kv=None, cross_bias=None, prefix: torch.Tensor | None = None,
                stores: list | None = None) -> torch.Tensor:
        """codes (B, K, T) ids at positions 0..T-1 -> logits (B, K, T, V).

        prefix (B, P, D): condition embeddings placed before the codes (prefix-conditioned models); they take
        positions 0..P-1 and the codes P..P+T-1; logits are returned for the codes only.
        stores: per layer (keys, values, attend dtype) cache rows that keep this sequence's keys and values
        (the prefill of a generation, see SelfAttention.forward)."""
        B, K, T = codes.shape
        x = sum(self.embed[k](codes[:, k]) for k in range(K)) * self.embed_scale  # (B, T, D)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)                      # (B, P+T, D)
        if x.shape[1] > self.positions.shape[0]:
            raise ValueError(f"sequence of {x.shape[1]} steps exceeds the model's {self.positions.shape[0]} positions")
        x = x + self.positions[:x.shape[1]].to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cross_kv[i] if cross_kv is not None else None, cross_bias,
                      stores[i] if stores is not None else None)
        return self.logits(x[:, x.shape[1] - T:])                               # drop the prefix positions

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) after the last layer -> (B, K, T, V)."""
        x = self.norm(x)
        return torch.stack([head(x) for head in self.heads], dim=1)

    # -- one position per row -----------------------------------------------------------------------------
    def embed_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (R, K) at positions pos (R,) -> (R, 1, D)."""
        x = sum(self.embed[k](tokens[:, k]) for k in range(tokens.shape[1])) * self.embed_scale    # (R, D)
        return (x + self.positions[pos].to(x.dtype))[:, None]

    def step_layers(self, x: torch.Tensor, pos: torch.Tensor | int, cache, window: int,
                    mask: torch.Tensor | None) -> torch.Tensor:
        """The decoder layers for rows x (R, 1, D) at positions pos (R,) (an int: every row at that position)
        over `cache` (engine.Cache): every row's key and value written at its own position, attention over the
        first `window` positions under `mask` (R, 1, 1, window) or, with None, all of them. The reference
        backend of a decoding step."""
        R, _, D = x.shape
        x = x.view(R, D)
        rows = None if isinstance(pos, int) else torch.arange(R, device=x.device)
        bias = None if cache.bias is None else cache.bias[:R]
        for i, layer in enumerate(self.layers):
            cross = None if layer.cross_attn is None else (cache.ck[i][:R], cache.cv[i][:R])
            x = layer.step(x, rows, pos, cache.k[i][:, :, :window], cache.v[i][:, :, :window], cache.attend,
                           mask, cross, bias)
        return x.view(R, 1, D)


def attention_backends(device: torch.device):
    """Context for eager attention whose key length changes from call to call (decoding, the text encoder):
    on CUDA it keeps scaled_dot_product_attention off the cuDNN backend, which builds an execution graph for
    every new shape (see docs/performance.md); elsewhere it does nothing. float32 never takes cuDNN."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
