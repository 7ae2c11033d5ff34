"""The MusicGen language model: a pre-norm transformer decoder over K parallel codebook streams.

Input: one token per codebook per position; the K embeddings are summed, sinusoidal positions added.
Each layer: causal self-attention (static KV cache), cross-attention to the projected text states,
GELU feed-forward. Output: one linear head per codebook.

Melody checkpoints (`cfg.prefix_conditioning`) have no cross-attention: the conditions (projected chroma,
then projected text) are prepended as the first positions of the sequence (`forward(..., prefix=...)`), so
they sit in the self-attention cache and code positions count on after them.

Decoding follows gpt-fast: the KV cache is preallocated once per generation (`KVCache`), cross-attention
keys/values are computed once (`cross_kv`), and a step writes into the cache at `pos` without allocating.
On x86 CPUs quantised models, and float32, bfloat16 and float16 ones where the AVX-512 kernel applies, run
those one-position steps through `fused` (musicgen/fused.py): the same layers in one native call, writing the
same caches.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

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
    (quant.quantize_per_channel: natively on x86 CPUs). The native decoder (kernels/decoder.cpp, write_kv)
    writes the same bytes."""
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
    """A span of cache positions as attention reads it: int8 rows dequantized to `attend_dtype`; float caches
    as they are."""
    return kv_dequantize(stored, attend_dtype) if stored.dtype == torch.int8 else stored


ROW_PRODUCT_ROWS = 8   # F.linear of at most this many rows becomes a multiply-and-sum under RowProducts


def row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a few rows written as a multiply-and-sum over the inner dimension, in
    float32, rounded to x's dtype at the end: inside a compiled graph inductor turns it into one reduction
    kernel of its own (Triton on a GPU) in place of a cuBLAS call, with the weight's widening (bfloat16, or
    an int8 layer's codes) done as it loads. Eagerly it would build the whole (out, rows, in) product:
    compiled steps only.

    The rows of x are stored before the reduction reads them (`_stored`): left to itself, inductor computes
    a cheap producer of x (a LayerNorm's scale and shift, the GELU before fc2) inside the consumer, once
    for every weight it multiplies, which for fc2 is 1536 erf evaluations per activation (medium)."""
    rows = x.numel() // x.shape[-1]
    x2 = _stored(x.reshape(rows, x.shape[-1]).float())
    y = (weight.float()[:, None, :] * x2[None]).sum(-1).t()                    # (rows, out); rows innermost
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _stored(x: torch.Tensor) -> torch.Tensor:
    """x, which a compiled graph computes into a buffer of its own instead of recomputing it where it is read
    (inductor's stride-order primitive: a no-op eagerly, a stored copy in inductor; the identity where this
    torch has no such primitive), once `prepare_row_products` has looked the primitive up."""
    return x if _FORCE_STRIDE_ORDER is None else _FORCE_STRIDE_ORDER(x, x.stride())


_FORCE_STRIDE_ORDER = None


def prepare_row_products() -> None:
    """Look up what `_stored` uses (outside a trace: it imports). MusicGen.compile(gemv=True) calls it."""
    global _FORCE_STRIDE_ORDER
    if _FORCE_STRIDE_ORDER is None:
        try:
            import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)

            _FORCE_STRIDE_ORDER = torch.ops.prims.inductor_force_stride_order
        except (ImportError, AttributeError, RuntimeError):
            pass


class RowProducts(TorchFunctionMode):
    """While active, F.linear of at most ROW_PRODUCT_ROWS rows runs as `row_linear`; every other call as it
    is. `MusicLM.step` traces under it when compiled with `MusicGen.compile(gemv=True)`."""

    def __init__(self):
        super().__init__()
        if not torch.compiler.is_compiling():
            prepare_row_products()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            named = dict(zip(("input", "weight", "bias"), args), **kwargs)
            x, weight, bias = named["input"], named["weight"], named.get("bias")
            if weight.dim() == 2 and x.dim() >= 1 and 0 < x.numel() // max(x.shape[-1], 1) <= ROW_PRODUCT_ROWS:
                return row_linear(x, weight, bias)
        return func(*args, **kwargs)


class KVCache(nn.Module):
    """Static self-attention cache of one layer: (B, H, max_len, hd) keys and values.

    dtype torch.int8 keeps each key and value vector as int8 codes with a float32 scale of its own, packed in
    one (B, H, max_len, hd + 4) int8 row (kv_quantize): half a bfloat16 cache's bytes, which attention reads in
    full every step. `update` then returns the dequantized keys and values in `attend_dtype`."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype, device,
                 attend_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.attend_dtype = attend_dtype
        shape = (batch, heads, max_len, head_dim + (KV_SCALE_BYTES if dtype == torch.int8 else 0))
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = pos + k.shape[2]
        self.k[:, :, pos:end] = kv_encode(k, self.k.dtype)
        self.v[:, :, pos:end] = kv_encode(v, self.v.dtype)
        return kv_read(self.k[:, :, :end], self.attend_dtype), kv_read(self.v[:, :, :end], self.attend_dtype)

    def write(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update for compiled steps: `pos` is a (1,) tensor; returns the first `window` cache positions."""
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k[:, :, :window], self.v[:, :, :window]


class SelfAttention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)     # q, k, v fused: one matmul per step
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, pos: int, cache: KVCache | None, window_bias=None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        if isinstance(pos, torch.Tensor):  # compiled step: a window of the static cache, masked past pos
            k, v = cache.write(pos, k, v, window_bias.shape[-1])              # (B, H, W, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=window_bias)
            return self.out(y.transpose(1, 2).reshape(B, T, D))
        if cache is not None:
            k, v = cache.update(pos, k, v)                                   # (B, H, pos+T, hd)
            if k.dtype != q.dtype:   # a lower-precision cache (quantised on CPU): attention runs in its dtype
                q = q.to(k.dtype)
        if T == 1:
            y = F.scaled_dot_product_attention(q, k, v)                      # one query sees every cached key
        elif k.shape[2] == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # a block of queries after a cached prefix: query i sees keys up to pos + i
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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
        y = F.scaled_dot_product_attention(q.to(kv[0].dtype), kv[0], kv[1], attn_mask=bias)
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

    def forward(self, x, pos, cache, cross_kv, cross_bias, window_bias=None):
        x = x + self.self_attn(self.norm1(x), pos, cache, window_bias)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), cross_kv, cross_bias)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class MusicLM(nn.Module):
    fused = None   # on CPU where it applies (fused.attach): musicgen.fused.FusedLayers runs the one-position steps
    row_products = False   # compiled steps trace their few-row products as row_linear (MusicGen.compile(gemv=True))

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

    def __getstate__(self):
        """Copies and pickles leave out the native decoder (it holds no state of its own) and build their own."""
        state = self.__dict__.copy()
        state["_fused"] = state.pop("fused", None) is not None
        return state

    def __setstate__(self, state):
        fused_on = state.pop("_fused", False)
        super().__setstate__(state)
        if fused_on:
            from .accel import fused
            fused.attach(self)

    # -- conditioning -----------------------------------------------------------------------------------
    def cross_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
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

    def new_caches(self, batch: int, max_len: int, dtype=None, device=None, attend_dtype=None) -> list[KVCache]:
        """One KVCache per layer; attend_dtype: what an int8 cache dequantizes to (default float32)."""
        p = self.norm.weight
        return [KVCache(batch, self.cfg.num_heads, max_len, self.cfg.head_dim, dtype or p.dtype, device or p.device,
                        attend_dtype or torch.float32) for _ in self.layers]

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, codes: torch.Tensor, cross_kv, cross_bias=None, pos: int = 0,
                caches: list[KVCache] | None = None, prefix: torch.Tensor | None = None,
                window_bias: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, K, T) ids at positions pos..pos+T-1 -> logits (B, K, T, V).

        prefix (B, P, D): condition embeddings placed before the codes (prefix-conditioned models, at pos 0);
        they take positions 0..P-1 and the codes P..P+T-1; logits are returned for the codes only.
        """
        B, K, T = codes.shape
        x = sum(self.embed[k](codes[:, k]) for k in range(K)) * self.embed_scale  # (B, T, D)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)                      # (B, P+T, D)
        T = x.shape[1]
        if isinstance(pos, torch.Tensor):   # one static-shape step (see `step`)
            x = x + self.positions[pos].to(x.dtype)
        elif pos + T > self.positions.shape[0]:
            raise ValueError(f"sequence of {pos + T} steps exceeds the model's {self.positions.shape[0]} positions")
        else:
            x = x + self.positions[pos:pos + T].to(x.dtype)
        if self.fused is not None and T == 1 and type(pos) is int and caches is not None and self.fused.takes(x):
            x = self.fused(x, pos, caches, cross_kv, cross_bias)   # every layer in one native call (fused.py)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, pos, caches[i] if caches is not None else None,
                          cross_kv[i] if cross_kv is not None else None, cross_bias, window_bias)
        x = self.norm(x[:, x.shape[1] - codes.shape[2]:])                       # drop the prefix positions
        return torch.stack([head(x) for head in self.heads], dim=1)             # (B, K, T, V)

    def step(self, codes: torch.Tensor, pos: torch.Tensor, cross_kv, cross_bias, caches: list[KVCache],
             window_bias: torch.Tensor) -> torch.Tensor:
        """One decoding step for torch.compile / CUDA graphs: codes (B, K, 1), pos (1,) long -> last-position
        logits (B, K, V). The step writes the cache at pos (a tensor: its value is data, not a shape), and
        self-attention reads the first W cache positions under `window_bias` (1, 1, 1, W): 0 up to pos, -inf
        after. W (see `window`) is the one size that changes between steps, so that attention reads about as
        much of the cache as eager decoding does instead of all of it."""
        if self.row_products and torch.compiler.is_compiling():
            with RowProducts():
                return self.forward(codes, cross_kv, cross_bias, pos, caches, window_bias=window_bias)[:, :, -1]
        return self.forward(codes, cross_kv, cross_bias, pos, caches, window_bias=window_bias)[:, :, -1]


def attention_backends(device: torch.device, compiled: bool = False):
    """Context for attention whose shapes change from call to call (decoding, the text encoder): on CUDA it
    keeps scaled_dot_product_attention off the cuDNN backend; elsewhere it does nothing.

    On Hopper-class cards (sm90/sm100 with a recent cuDNN) PyTorch tries cuDNN attention first for
    half-precision inputs. cuDNN builds an execution graph for every new problem shape, key length included,
    which reportedly takes tens of ms of host time. An eager decoding step has a new key length every step.
    On an H200, eager bfloat16 decoded 4x slower than float32 (20 against 78 steps/s; transformers 15 against
    35); these per-shape builds are the likely cause, not yet confirmed on a GPU. Flash and memory-efficient
    attention need no per-shape build. float32 never takes cuDNN, so the exact path is unchanged.

    Compiled steps (`compiled=True`) replay CUDA graphs recorded once per window bucket, so a build is paid
    once; they keep PyTorch's own choice. MUSICGEN_CUDNN_ATTENTION=1 allows cuDNN everywhere, =0 nowhere."""
    setting = os.environ.get("MUSICGEN_CUDNN_ATTENTION", "")
    if device.type != "cuda" or setting == "1" or (compiled and setting != "0"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


WINDOW_BUCKET = 128   # compiled steps attend over a multiple of this many cache positions


def window(filled: int, max_len: int) -> int:
    """Cache positions a compiled step reads when `filled` of them hold keys: rounded up to WINDOW_BUCKET, so
    that a CUDA graph is recorded once per bucket, not once per step."""
    return min(-(-filled // WINDOW_BUCKET) * WINDOW_BUCKET, max_len)
