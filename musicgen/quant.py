"""Weight-only int8 quantisation: a pass that swaps `nn.Linear` for `Int8Linear` (the gpt-fast way).

Decoding one step reads every LM weight once, so it is bound by memory traffic; int8 weights halve the bytes
of bfloat16 and quarter those of float32. Each output channel gets its own scale (symmetric, max-abs / 127);
activations stay in the model's floating dtype. On x86 CPUs the decoding steps (a few rows) go to our AVX2
kernel (musicgen/kernels, float32 activations, built on first use); failing that, with bfloat16 activations,
to PyTorch's fused `aten._weight_int8pack_mm`; everywhere else (prefill, GPU) the weight is widened on the
fly (which torch.compile fuses on CUDA).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import int8_gemv

GEMV_ROWS = 16   # up to this many rows per call the int8 kernel beats widening the weight


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), float32 scales (N,)) with weight ~= int8 * scale[:, None]."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0                   # (N,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> "Int8Linear":
        q, scales = quantize_per_channel(linear.weight)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, linear.weight.device)
        m.weight.copy_(q)
        m.scales.copy_(scales.to(dtype))
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().to(dtype))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                          # (M, K)
        kernel = int8_gemv() if x.device.type == "cpu" and x2.shape[0] <= GEMV_ROWS else None
        if kernel is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            if getattr(self, "_f32", None) is None:   # float32 copies of the small vectors, made once
                self._f32 = (self.scales.float(), None if self.bias is None else self.bias.float())
            y = kernel(x2.float(), self.weight, *self._f32)
            return y.to(x.dtype).view(*shape[:-1], self.out_features)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.scales.dtype == torch.bfloat16:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales)
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(module: nn.Module, dtype: torch.dtype) -> int:
    """Replace every nn.Linear under `module` in place; returns how many were swapped."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child, dtype))
            count += 1
        else:
            count += quantize_int8(child, dtype)
    return count


class SkinnyLinear(nn.Linear):
    """nn.Linear that computes few-row float32 products on CPU as W @ x^T.

    Decoding multiplies a handful of rows by each weight. PyTorch's `linear` (x @ W^T) reaches about 5 GB/s of
    weight traffic there on a 2-core x86 machine, while the same product as W @ x^T (then transposed back)
    reaches about 10-12 GB/s: a different BLAS kernel. Same weights, same state dict; summation order differs
    only at float rounding (the conformance tests run through it). Anything else takes `F.linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (x.device.type != "cpu" or x.dtype != torch.float32 or not 0 < rows <= GEMV_ROWS
                or torch.is_grad_enabled() or torch.compiler.is_compiling()):
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(rows, x.shape[-1]).t()                                  # (K, M)
        y = torch.addmm(self.bias[:, None], self.weight, x2) if self.bias is not None else self.weight @ x2
        return y.t().reshape(*x.shape[:-1], self.out_features)


def use_skinny_linear(module: nn.Module) -> int:
    """Turn every plain nn.Linear under `module` into a SkinnyLinear in place (parameters untouched)."""
    count = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = SkinnyLinear
            count += 1
    return count
