"""Weight-only int8 quantisation: a pass that swaps `nn.Linear` for `Int8Linear` (the gpt-fast way).

Decoding one step reads every LM weight once, so it is bound by memory traffic; int8 weights halve the bytes
of bfloat16 and quarter those of float32. Each output channel gets its own scale (symmetric, max-abs / 127);
activations stay in the model's floating dtype. On CPU with bfloat16 activations the fused
`aten._weight_int8pack_mm` kernel does the matmul straight from int8; elsewhere the weight is widened
on the fly (which torch.compile fuses on CUDA).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
