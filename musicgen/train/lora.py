"""Low-rank adapters (LoRA, Hu et al. 2021) on the LM's linears, and merging them back for export.

    y = x W^T + (x A^T) B^T * alpha / r      W (out, in) frozen; A (r, in) and B (out, r) train; B starts at 0

A small layer of our own rather than peft: peft needs transformers and accelerate at run time (here transformers
is only a test oracle), and it finds layers by transformers' module names, while our q/k/v and cross k/v
projections are fused into one linear each (`self_attn.qkv`, `cross_attn.kv`): here one adapter sits on each
fused product. `merge` turns every LoRALinear back into the plain nn.Linear it wrapped, holding W + B A alpha/r,
so the state dict has the checkpoint's names and shapes again.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# the attention and feed-forward linears of a decoder layer (cross-attention ones only where the layer has them)
TARGETS = ("self_attn.qkv", "self_attn.out", "cross_attn.q", "cross_attn.kv", "cross_attn.out", "fc1", "fc2")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))   # nn.Linear's own init, as peft's
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear, not self.base(x): a subclass of nn.Linear may route inference-only fast paths
        y = F.linear(x, self.base.weight, self.base.bias)                        # (..., out)
        h = F.linear(x, self.lora_a) * self.scale                                # (..., r): the scale where it is small
        # y + h B^T as one product that accumulates into y (addmm), not a product and a sum over (..., out)
        return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_b.t()).view(y.shape)

    def merged(self) -> nn.Linear:
        """The plain linear with the adapter folded into its weight (computed in float32)."""
        base = self.base
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
            linear.weight.copy_(base.weight.float() + delta)
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"rank={self.lora_a.shape[0]}, scale={self.scale:g}"


def add_lora(lm: nn.Module, rank: int, alpha: float | None = None) -> list[nn.Parameter]:
    """Freeze `lm` and wrap each TARGETS linear of each decoder layer in a LoRALinear; returns the adapters'
    parameters (the only ones that train). alpha defaults to the rank (scale 1)."""
    if rank < 1:
        raise ValueError(f"--lora-rank must be at least 1, got {rank}")
    lm.requires_grad_(False)
    alpha = float(rank if alpha is None else alpha)
    params = []
    for layer in lm.layers:
        for path in TARGETS:
            parent_path, _, name = path.rpartition(".")
            parent = getattr(layer, parent_path) if parent_path else layer
            if parent is None or not isinstance(getattr(parent, name, None), nn.Linear):
                continue   # melody checkpoints have no cross-attention
            adapter = LoRALinear(getattr(parent, name), rank, alpha)
            setattr(parent, name, adapter)
            params += [adapter.lora_a, adapter.lora_b]
    return params


def merge_lora(module: nn.Module) -> int:
    """Replace every LoRALinear under `module` by its merged nn.Linear, in place; returns how many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
                count += 1
    return count
