"""Next-token choice: classifier-free guidance, temperature, top-k, top-p.

Semantics follow audiocraft's LMModel: guidance mixes conditional and unconditional logits as
`uncond + (cond - uncond) * scale`; then top_p > 0 selects nucleus sampling, otherwise top_k > 0 selects
top-k sampling, otherwise the full distribution is sampled. `top_k=1` or `temperature=0` is plain argmax.

Sampling uses the exponential-race trick (argmax of p / Exp(1) noise is an exact draw from p) so that
nothing waits on the host, and a torch.Generator so a seed reproduces a run on the same device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    top_k: int = 250             # keep the k most likely codes (0: off)
    top_p: float = 0.0           # nucleus mass; > 0 takes precedence over top_k, as in audiocraft
    temperature: float = 1.0     # 0 means greedy
    guidance_scale: float = 3.0  # classifier-free guidance; 1.0 disables the unconditional rows

    def validate(self) -> None:
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not self.guidance_scale >= 0.0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale!r}")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0.0

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale != 1.0


def apply_cfg(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """(2B, ...) logits, conditional and unconditional rows interleaved (c0 u0 c1 u1 ...) -> (B, ...) guided."""
    cond, uncond = logits[0::2], logits[1::2]
    return uncond + (cond - uncond) * scale


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """(..., V) float logits -> (...) long token ids."""
    logits = logits.float()
    if p.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p > 0.0:
        probs = _top_p(probs, p.top_p)
    elif p.top_k > 0:
        probs = _top_k(probs, p.top_k)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


def _top_k(probs: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, probs.shape[-1])
    kth = torch.topk(probs, k, dim=-1).values[..., -1:]
    return probs * (probs >= kth)           # renormalising is unnecessary for the exponential race


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    # drop a token when the mass before it already exceeds top_p (the most likely token always stays)
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample_groups(logits: torch.Tensor, p: SamplingParams, generators: list, sizes: list[int]) -> torch.Tensor:
    """`sample` for consecutive groups of rows that each have their own generator: (R, ..., V) -> (R, ...).

    Group i (sizes[i] rows) gets exactly what `sample` of its rows with generators[i] gives it (each group's
    noise is drawn from its own generator, in the same order); the rest runs once for all rows. For batched
    decoding of independent requests."""
    if len(sizes) == 1:
        return sample(logits, p, generators[0])
    logits = logits.float()
    if p.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p > 0.0:
        probs = _top_p(probs, p.top_p)
    elif p.top_k > 0:
        probs = _top_k(probs, p.top_k)
    noise = torch.empty_like(probs)
    for chunk, g in zip(noise.split(sizes), generators):
        chunk.exponential_(1.0, generator=g)
    return (probs / noise).argmax(dim=-1)
