"""Weight-only quantisation: passes that swap `nn.Linear` for `Int8Linear` or `Int4Linear` (the gpt-fast way).

Decoding one step reads every LM weight once, so it is bound by memory traffic: int8 weights halve the bytes
of bfloat16 and quarter those of float32; int4 (groups of 32 with a float16 scale) halve them again. The
layers keep the codes and scales; which kernel multiplies them depends on what the machine has:
- a few rows (decoding) on an x86 CPU with the kernels built: ours (musicgen/accel/kernels, float32
  activations), usually inside the fused step (fused.py);
- a few rows on any other CPU: PyTorch's packed weight-only kernels (`aten._weight_int8pack_mm`,
  `aten._weight_int4pack_mm_for_cpu`) with bfloat16 activations;
- many rows (prefill) and GPUs: the weight widened on the fly (which torch.compile fuses on CUDA), in
  bfloat16 where the CPU multiplies bfloat16 natively (`_prefill_in_bf16`).
"""
from __future__ import annotations

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
    musicgen/accel/kernels where it is built (inside a compiled graph: its custom op), else to PyTorch's packed
    weight-only kernel (`_packed_product`, bfloat16 activations): `few_rows` binds the one that applies.
    Everything else goes to the subclass's `_fallback`."""

    kernel_name = ""
    _few = None   # (dtype, kernel, weight, product): what few_rows made last

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
        m.pack()
        return m

    def pack(self) -> None:
        """Make what the few-row products need once the weights are in place (PyTorch's packed layout on a CPU
        without our kernels)."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._few = None   # made from the old tensors
        self.pack()   # a move or a copy of the weights: int4's aten layout follows (or goes, off the CPU)
        return self

    def __getstate__(self):
        # a copy makes its own products: those made here are bound to this layer's tensors
        state = super().__getstate__()
        state.pop("_few", None)
        return state

    def _eager_kernel(self):
        raise NotImplementedError

    def _kernel_args(self) -> tuple:
        """(scales, bias) as the kernel takes them: float32, except int4's float16 group scales."""
        return self.scales.float(), None if self.bias is None else self.bias.float()

    def _packed_product(self):
        """PyTorch's packed weight-only kernel bound to this layer's weights: x2 (M, K) bfloat16 -> (M, N)
        bfloat16; None where it does not apply."""
        return None

    def few_rows(self, rows: int, dtype: torch.dtype):
        """The product of `rows` rows whose activations are `dtype`, bound to this layer's tensors once: a
        callable x2 (rows, K) -> (rows, N) in `dtype` through our kernel or PyTorch's packed one; the module
        itself where neither applies (more than GEMV_ROWS rows, autograd, a GPU, no packed layout), which
        `forward` then computes with `_fallback`. Decoding steps call it directly (lm.decode_product)."""
        if rows > GEMV_ROWS or torch.is_grad_enabled() or self.weight.device.type != "cpu":
            return self
        if torch.compiler.is_compiling():   # a compiled step: our kernel as its opaque custom op, nothing kept
            return self._bind(dtype, kernels.OPS.get(self.kernel_name))
        kernel, weight, made = self._eager_kernel(), self.weight, self._few
        if made is not None and made[0] == dtype and made[1] is kernel and made[2] is weight:
            return made[3]
        product = self._bind(dtype, kernel)
        self._few = (dtype, kernel, weight, product)   # a copy of the layer (new weights) makes its own
        return product

    def _bind(self, dtype: torch.dtype, kernel):
        """`kernel` (ours, or None: PyTorch's packed one) bound to this layer's tensors for `dtype` activations."""
        if kernel is not None:
            weight, args = self.weight, self._kernel_args()
            if dtype == torch.float32:
                return lambda x2: kernel(x2, weight, *args)
            return lambda x2: kernel(x2.float(), weight, *args).to(dtype)
        product = self._packed_product()
        if product is None:
            return self
        if dtype == torch.bfloat16:
            return product
        return lambda x2: product(x2.to(torch.bfloat16)).to(dtype)

    def _fallback(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                          # (M, K)
        product = self.few_rows(x2.shape[0], x2.dtype) if x.device.type == "cpu" else self
        y = self._fallback(x2) if product is self else product(x2)
        return y.view(*shape[:-1], self.out_features)


class Int8Linear(QuantizedLinear):
    """Weight-only int8 linear layer: one float32 scale per output channel."""

    kernel_name = "int8_gemv"
    _quantize = staticmethod(quantize_per_channel)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.bfloat16, device=None):
        super().__init__()
        self._init_buffers(in_features, out_features,
                           torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                           torch.ones(out_features, dtype=torch.float32, device=device), bias, dtype)

    def _eager_kernel(self):
        return int8_gemv()

    def _packed_product(self):
        # aten's int8 weight-only kernel is fast with bfloat16 activations (and scales) on every CPU
        weight, scales, bias = self.weight, self.scales.to(torch.bfloat16), self.bias

        def product(x2: torch.Tensor) -> torch.Tensor:
            y = torch._weight_int8pack_mm(x2.contiguous(), weight, scales)
            return y if bias is None else y + bias.to(y.dtype)
        return product

    def _fallback(self, x2: torch.Tensor) -> torch.Tensor:
        if _prefill_in_bf16(x2):
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


def unpack_int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """(N, K / 2) packed uint8 -> (N, K) uint8 codes in 0..15 (the weight is (code - 8) * its group's scale)."""
    N = packed.shape[0]
    pairs = packed.reshape(N, -1, 1, INT4_GROUP)
    return torch.cat([pairs & 15, pairs >> 4], dim=2).reshape(N, -1)


def dequantize_int4_weight(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_int4_weight` up to rounding: -> float32 (N, K)."""
    N = packed.shape[0]
    codes = unpack_int4_codes(packed).reshape(N, -1, INT4_GROUP)                 # (N, G, 32)
    return ((codes.float() - 8.0) * scales.float()[..., None]).reshape(N, -1)


class Int4Linear(QuantizedLinear):
    """Weight-only 4-bit linear layer: groups of 32 weights with a float16 scale each (about 4.5 bits a weight).

    On x86 CPUs a few rows at a time (decoding) go to our kernel, which also quantises the activations to
    int8 per group of 32 so the group products run in integers (llama.cpp's Q4_0 x Q8_0 scheme); on other
    CPUs (or without a compiler) to PyTorch's int4 kernel (`_weight_int4pack_mm_for_cpu`, bfloat16
    activations) over the same codes and scales in its own packed layout, made at load (`pack`). Everything
    else (prefill, GPU) dequantises the weight on the fly (natively on x86) and multiplies in the activations'
    dtype, or in bfloat16 for prefill where `_prefill_in_bf16` says so.
    """

    kernel_name = "int4_gemv"
    _quantize = staticmethod(quantize_int4_weight)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32, device=None):
        super().__init__()
        self._init_buffers(in_features, out_features,
                           torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
                           torch.ones(out_features, in_features // INT4_GROUP, dtype=torch.float16, device=device),
                           bias, dtype)
        self.aten = None   # (packed weight, (groups, N, 2) scales and zeros) in aten's int4 layout, or None

    def pack(self) -> None:
        self.aten = self._few = None
        if self.weight.device.type != "cpu" or int4_gemv() is not None or self.out_features % 16:
            return
        codes = unpack_int4_codes(self.weight).to(torch.int32)                  # (N, K) in 1..15
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        scales = self.scales.float().t()                                       # (groups, N)
        self.aten = (packed, torch.stack([scales, torch.zeros_like(scales)], dim=-1).to(torch.bfloat16))

    def dequantized(self) -> torch.Tensor:
        return dequantize_int4_weight(self.weight, self.scales)

    def _eager_kernel(self):
        return int4_gemv()

    def _kernel_args(self) -> tuple:
        return self.scales, None if self.bias is None else self.bias.float()

    def _packed_product(self):
        if self.aten is None:
            return None
        (packed, scales_zeros), bias = self.aten, self.bias
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu

        def product(x2: torch.Tensor) -> torch.Tensor:
            y = mm(x2.contiguous(), packed, INT4_GROUP, scales_zeros)
            return y if bias is None else y + bias.to(y.dtype)
        return product

    def _fallback(self, x2: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x2.dtype)
        dequant = kernels.int4_dequant() if x2.device.type == "cpu" else None
        if dequant is None:
            weight = self.dequantized()
            if _prefill_in_bf16(x2):
                y = F.linear(x2.to(torch.bfloat16), weight.to(torch.bfloat16)).float()
                return y if bias is None else y + bias
            return F.linear(x2, weight.to(x2.dtype), bias)
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


def _prefill_in_bf16(x2: torch.Tensor) -> bool:
    """Whether a quantised layer's many-row float32 product (prefill: a continuation's prompt, a melody prefix,
    long-form context, the text encoder) runs as a bfloat16 matrix product: where the CPU multiplies bfloat16
    natively (AMX tiles or AVX-512 BF16), several times the float32 rate. Quantised modes are approximations
    of float32 already: rounding the activations and the output to bfloat16 adds far less error than the 4- or
    8-bit weights (tests hold both paths to the same tolerance)."""
    return x2.device.type == "cpu" and x2.dtype == torch.float32 and x2.shape[0] > GEMV_ROWS and bf16_native()


def bf16_native() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AMX tiles or AVX-512 BF16)."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
