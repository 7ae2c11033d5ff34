"""Weight-only quantisation: passes that swap `nn.Linear` for `Int8Linear` or `Int4Linear` (the gpt-fast way).

Decoding one step reads every LM weight once, so it is bound by memory traffic; int8 weights halve the bytes
of bfloat16 and quarter those of float32. Each output channel gets its own scale (symmetric, max-abs / 127);
activations stay in the model's floating dtype. On x86 CPUs the decoding steps (a few rows) go to our AVX2
kernel (musicgen/kernels, float32 activations, built on first use); failing that, with bfloat16 activations,
to PyTorch's fused `aten._weight_int8pack_mm`; everywhere else (prefill, GPU) the weight is widened on the
fly (which torch.compile fuses on CUDA). Prefill on a CPU that multiplies bfloat16 fast (AMX) widens to
bfloat16 and runs the product there (`_prefill_in_bf16`).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from ..checkpoint import release
from .kernels import int4_gemv, int8_gemv

GEMV_ROWS = 16   # up to this many rows per call the int8 kernel beats widening the weight


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), float32 scales (N,)) with weight ~= int8 * scale[:, None].
    On x86 CPUs natively (kernels.int8_quantize, bitwise the same result, about 15x faster)."""
    native = kernels.int8_quantize() if weight.device.type == "cpu" else None
    if native is not None:
        q, scales = native(weight.detach().float())
        return q, scales
    return quantize_per_channel_reference(weight)


def quantize_per_channel_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0                   # (N,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class QuantizedLinear(nn.Module):
    """What the int8 and int4 layers share. A few rows on CPU without autograd (decoding) go to a kernel of
    musicgen.kernels: eagerly the function itself, inside a compiled graph its custom op (if built); everything
    else to the subclass's `_fallback`. Subclasses give the quantiser, the kernel and the fallback."""

    kernel_name = ""
    _f32 = None   # eager mode: (scales, bias) as the kernel takes them, made once

    def _init_buffers(self, in_features: int, out_features: int, weight: torch.Tensor, scales: torch.Tensor,
                      bias: bool, dtype) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=weight.device) if bias else None)

    @staticmethod
    def _quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype):
        weight, scales = cls._quantize(linear.weight)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, linear.weight.device)
        m.weight.copy_(weight)
        m.scales.copy_(scales.to(m.scales.dtype))
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().to(dtype))
        return m

    def _eager_kernel(self):
        raise NotImplementedError

    def _kernel_args(self) -> tuple:
        """(scales, bias) as the kernel takes them: float32, except int4's float16 group scales."""
        return self.scales.float(), None if self.bias is None else self.bias.float()

    def _fallback(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                          # (M, K)
        if x.device.type == "cpu" and x2.shape[0] <= GEMV_ROWS and not torch.is_grad_enabled():
            if torch.compiler.is_compiling():   # compiled step: the kernel as an opaque custom op
                kernel, args = kernels.OPS.get(self.kernel_name), self._kernel_args()
            else:
                kernel = self._eager_kernel()
                if kernel is not None and self._f32 is None:
                    self._f32 = self._kernel_args()
                args = self._f32
            if kernel is not None:
                y = kernel(x2.float(), self.weight, *args)
                return y.to(x.dtype).view(*shape[:-1], self.out_features)
        return self._fallback(x2).view(*shape[:-1], self.out_features)


class Int8Linear(QuantizedLinear):
    kernel_name = "int8_gemv"
    _quantize = staticmethod(quantize_per_channel)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.bfloat16, device=None):
        super().__init__()
        self._init_buffers(in_features, out_features,
                           torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                           torch.ones(out_features, dtype=dtype, device=device), bias, dtype)

    def _eager_kernel(self):
        return int8_gemv()

    def _fallback(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device.type == "cpu" and x2.dtype == torch.bfloat16 and self.scales.dtype == torch.bfloat16:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales)
        elif _prefill_in_bf16(x2):
            # int8 codes are exact in bfloat16; the activations and the product's output are rounded to it
            y = F.linear(x2.to(torch.bfloat16), self.weight.to(torch.bfloat16)).float() * self.scales.float()
        else:
            y = F.linear(x2, self.weight.to(x2.dtype)) * self.scales.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


INT4_GROUP = 32     # weights per float16 scale
INT4_BLOCK = 64     # in_features must be a multiple of this (two groups share 32 bytes)


def quantize_int4_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (packed uint8 (N, K / 2), float16 scales (N, K / 32)).

    Symmetric per group of 32: scale = max|w| / 7 (rounded to float16 first, so the codes use the stored scale),
    codes round(w / scale) in -7..7 stored as code + 8. Two groups share 32 bytes: byte j holds weight j of the
    first group in its low nibble and weight j of the second in its high nibble (the layout the kernel reads).
    """
    N, K = weight.shape
    if K % INT4_BLOCK:
        raise ValueError(f"int4 needs in_features divisible by {INT4_BLOCK}, got {K}")
    native = kernels.int4_quantize() if weight.device.type == "cpu" else None
    if native is not None:                  # bitwise the code below, about 15x faster
        packed, scales = native(weight.detach().float())
        return packed, scales
    return quantize_int4_weight_reference(weight)


def quantize_int4_weight_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    N, K = weight.shape
    g = weight.detach().float().reshape(N, K // INT4_GROUP, INT4_GROUP)
    scales = (g.abs().amax(dim=-1) / 7.0).to(torch.float16)
    s = scales.float().clamp(min=torch.finfo(torch.float16).tiny)
    codes = (torch.round(g / s[..., None]).clamp(-7, 7) + 8).to(torch.uint8)      # (N, G, 32) in 1..15
    pairs = codes.reshape(N, K // (2 * INT4_GROUP), 2, INT4_GROUP)
    packed = pairs[:, :, 0] | (pairs[:, :, 1] << 4)
    return packed.reshape(N, K // 2).contiguous(), scales


def dequantize_int4_weight(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_int4_weight` up to rounding: -> float32 (N, K)."""
    N = packed.shape[0]
    pairs = packed.reshape(N, -1, 1, INT4_GROUP)
    codes = torch.cat([pairs & 15, pairs >> 4], dim=2).reshape(N, -1, INT4_GROUP)   # (N, G, 32)
    return ((codes.float() - 8.0) * scales.float()[..., None]).reshape(N, -1)


class Int4Linear(QuantizedLinear):
    """Weight-only 4-bit linear layer: groups of 32 weights with a float16 scale each (about 4.5 bits a weight).

    On x86 CPUs a few rows at a time (decoding) go to our kernel, which also quantises the activations to
    int8 per group of 32 so the group products run in integers (llama.cpp's Q4_0 x Q8_0 scheme); elsewhere
    (prefill, GPU, no kernel) the weight is dequantised on the fly (natively on x86) and the product runs in
    the activations' dtype, or in bfloat16 for prefill where `_prefill_in_bf16` says so.
    """

    kernel_name = "int4_gemv"
    _quantize = staticmethod(quantize_int4_weight)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32, device=None):
        super().__init__()
        self._init_buffers(in_features, out_features,
                           torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
                           torch.ones(out_features, in_features // INT4_GROUP, dtype=torch.float16, device=device),
                           bias, dtype)

    def dequantized(self) -> torch.Tensor:
        return dequantize_int4_weight(self.weight, self.scales)

    def _eager_kernel(self):
        return int4_gemv()

    def _kernel_args(self) -> tuple:
        return self.scales, None if self.bias is None else self.bias.float()

    def _fallback(self, x2: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x2.dtype)
        dequant = kernels.int4_dequant() if x2.device.type == "cpu" else None
        if dequant is None:
            return F.linear(x2, self.dequantized().to(x2.dtype), bias)
        if _prefill_in_bf16(x2):
            y = F.linear(x2.to(torch.bfloat16), dequant(self.weight, self.scales, True)).float()
            return y if bias is None else y + bias
        return F.linear(x2, dequant(self.weight, self.scales, x2.dtype == torch.bfloat16).to(x2.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {INT4_GROUP}"


def quantize_int4(module: nn.Module, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> int:
    """Replace every nn.Linear under `module` whose in_features fit the int4 layout by an Int4Linear (the others,
    and children named in `skip`, by Int8Linear); returns how many became int4."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            if name in skip or child.in_features % INT4_BLOCK:
                setattr(module, name, Int8Linear.from_linear(child, dtype))
            else:
                setattr(module, name, Int4Linear.from_linear(child, dtype))
                count += 1
            release(child.weight)   # the float weight is done with: its file pages may go (checkpoint.release)
        elif name in skip:
            quantize_int8(child, dtype)
        else:
            count += quantize_int4(child, dtype, skip)
    return count


def quantize_int8(module: nn.Module, dtype: torch.dtype) -> int:
    """Replace every nn.Linear under `module` in place; returns how many were swapped."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child, dtype))
            release(child.weight)
            count += 1
        else:
            count += quantize_int8(child, dtype)
    return count


def parameter_count(module: nn.Module) -> int:
    """Weights of `module` as the float model had them: quantised layers count their in x out weights (and bias),
    which are buffers rather than parameters."""
    count = sum(p.numel() for p in module.parameters())
    for m in module.modules():
        if isinstance(m, QuantizedLinear):
            count += m.in_features * m.out_features + (0 if m.bias is None else m.out_features)
    return count


_BF16_PREFILL: bool | None = None


def _prefill_in_bf16(x2: torch.Tensor) -> bool:
    """Whether a quantised layer's many-row float32 product (prefill: a continuation's prompt, a melody prefix,
    long-form context) runs as a bfloat16 matrix product. Quantised modes are approximations of float32
    already: rounding the activations and the output to bfloat16 adds far less error than the 4- or 8-bit
    weights (tests/test_fast.py holds both paths to the same tolerance). Where the CPU multiplies bfloat16
    fast (AMX, AVX-512 BF16) that is several times the float32 rate; elsewhere it is slower, so
    `bf16_gemm_wins()` times both once per process. MUSICGEN_PREFILL_BF16=1/0 forces the choice."""
    global _BF16_PREFILL
    if x2.device.type != "cpu" or x2.dtype != torch.float32 or x2.shape[0] <= GEMV_ROWS:
        return False
    if _BF16_PREFILL is None:
        forced = os.environ.get("MUSICGEN_PREFILL_BF16", "")
        _BF16_PREFILL = forced == "1" if forced in ("0", "1") else bf16_gemm_wins()
    return _BF16_PREFILL


def bf16_gemm_wins() -> bool:
    """Whether this CPU multiplies 256-row bfloat16 matrices at least twice as fast as float32 ones (about
    0.05 s to find out)."""
    with torch.inference_mode():
        x, w = torch.full((256, 1024), 0.5), torch.full((2048, 1024), 0.01)
        wb = w.bfloat16()
        f32 = _best_time(lambda: F.linear(x, w))
        bf16 = _best_time(lambda: F.linear(x.to(torch.bfloat16), wb).float())   # with the conversions
    return 2 * bf16 < f32


def _best_time(fn, repeats: int = 3) -> float:
    """Fastest of `repeats` timed calls of fn, after one untimed call."""
    import time

    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class SkinnyLinear(nn.Linear):
    """nn.Linear that computes few-row products on CPU (decoding) with whichever kernel reads the weights fastest.

    Decoding multiplies a handful of rows by each weight, so the speed is the kernel's weight bandwidth, and
    which formulation gets the better kernel depends on the CPU and the row count:
    - float32, 1-3 rows: `linear` (x @ W^T) or W @ x^T. On a 2-core AMD EPYC (AVX2) `linear` read weights at
      about 5 GB/s and W @ x^T at 10-12 GB/s; on a 2-core Intel Xeon (AVX-512) `linear` reached 24 GB/s and
      W @ x^T 13. `skinny_wins()` times both once per process and picks.
    - float32, 4-16 rows, and bfloat16 or float16, 1-8 rows: our AVX-512 kernel (kernels.dense_gemv: the
      weights widened exactly to float32, float32 activations and sums) where `dense_policy()` times it faster.
      On the Xeon, for the musicgen-small layer set, float32 at 8 rows took 81 ms against `linear`'s 139,
      bfloat16 at 2 rows 32 ms against 52 (BLAS read bfloat16 weights at 13 GB/s), float16 at 2 rows 33 ms
      against 97 (7 GB/s).
    Same weights, same state dict; the sums differ only at float rounding (16-bit outputs are rounded to their
    dtype as `linear`'s are). Anything else takes `F.linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (x.device.type != "cpu" or not 0 < rows <= GEMV_ROWS or x.dtype != self.weight.dtype
                or torch.is_grad_enabled() or torch.compiler.is_compiling()):
            return F.linear(x, self.weight, self.bias)
        if x.dtype == torch.float32:
            if rows >= 4 and dense_policy()[0] and (native := kernels.dense_gemv()) is not None:
                return self._native(native, x, rows)
            if skinny_wins():
                x2 = x.reshape(rows, x.shape[-1]).t()                              # (K, M)
                y = torch.addmm(self.bias[:, None], self.weight, x2) if self.bias is not None else self.weight @ x2
                return y.t().reshape(*x.shape[:-1], self.out_features)
        elif rows <= 8 and dense_picked(x.dtype) and (native := kernels.dense_gemv()) is not None:
            return self._native(native, x.float(), rows).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def _native(self, native, x: torch.Tensor, rows: int) -> torch.Tensor:
        y = native(x.reshape(rows, x.shape[-1]), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


_STEP = {torch.float32: 3, torch.bfloat16: 1, torch.float16: 2}   # dtypes: their decoding-step entry in dense_policy()
_SKINNY: bool | None = None
_DENSE: tuple[bool, bool, bool, bool] | None = None


def skinny_wins() -> bool:
    """Whether W @ x^T beats F.linear for 2-row float32 products on this CPU (timed once, about 0.1 s;
    MUSICGEN_SKINNY=1/0 forces the choice)."""
    global _SKINNY
    if _SKINNY is None:
        forced = os.environ.get("MUSICGEN_SKINNY", "")
        if forced in ("0", "1"):
            _SKINNY = forced == "1"
        else:
            _SKINNY = _time_skinny()
    return _SKINNY


def _time_skinny() -> bool:
    with torch.inference_mode():
        weights = [torch.full((2048, 1024), 0.01) for _ in range(8)]       # 64 MB: more than most L2/L3 slices
        x = torch.full((2, 1024), 0.5)
        linear = _best_time(lambda: [F.linear(x, w) for w in weights])
        skinny = _best_time(lambda: [w @ x.t() for w in weights])
    return skinny < 0.9 * linear


def dense_policy() -> tuple[bool, bool, bool, bool]:
    """(float32 at 4-16 rows, bfloat16 at 1-8 rows, float16 at 1-8 rows, float32 decoding steps): where
    kernels.dense_gemv beats F.linear on this CPU (timed once, about 0.2 s, at 8, 2, 2 and 2 rows; False without
    the kernel; MUSICGEN_DENSE=1/0 forces all four).

    The last entry decides whether a float32 model's one-position steps run in the fused decoder
    (musicgen/fused.py), whose products are all ours. Its bar is lower than the others' (within 10 % of
    F.linear rather than 10 % faster): the fused step also drops the layer loop's dispatch of some 30 small
    operations per layer, about 10 ms of a 71 ms musicgen-small step on the Xeon of the README."""
    global _DENSE
    if _DENSE is None:
        forced = os.environ.get("MUSICGEN_DENSE", "")
        native = kernels.dense_gemv()
        if native is None:
            _DENSE = (False, False, False, False)
        elif forced in ("0", "1"):
            _DENSE = (forced == "1",) * 4
        else:
            _DENSE = _time_dense(native)
    return _DENSE


def _time_dense(native) -> tuple[bool, bool, bool, bool]:
    ratios = []
    with torch.inference_mode():
        for dtype, rows in ((torch.float32, 8), (torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 2)):
            weights = [torch.full((2048, 1024), 0.01, dtype=dtype) for _ in range(8)]
            x = torch.full((rows, 1024), 0.5)
            xd = x.to(dtype)
            linear = _best_time(lambda: [F.linear(xd, w) for w in weights])
            ours = _best_time(lambda: [native(x, w, None) for w in weights])
            ratios.append(ours / linear)
    return ratios[0] < 0.9, ratios[1] < 0.9, ratios[2] < 0.9, ratios[3] < 1.1


def dense_picked(dtype: torch.dtype) -> bool:
    """Whether a decoding step's products with weights of `dtype` go to kernels.dense_gemv (dense_policy): for
    16-bit weights at 1-8 rows, for float32 the fused decoder's steps; False for other dtypes."""
    return dtype in _STEP and dense_policy()[_STEP[dtype]]


def use_skinny_linear(module: nn.Module) -> int:
    """Turn every plain nn.Linear under `module` into a SkinnyLinear in place (parameters untouched)."""
    count = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = SkinnyLinear
            count += 1
    return count
