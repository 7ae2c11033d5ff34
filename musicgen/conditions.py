"""What the LM is conditioned on, in the form each checkpoint family consumes it.

Text models cross-attend to the projected T5 states. Melody models (`cfg.lm.prefix_conditioning`) instead
see one sequence of prepended condition tokens:

    position:  0 ........ 234 | 235 ........ 235+S-1 | 235+S ...
    token:     chroma frames  | text states          | the delayed code grid

Classifier-free guidance runs conditional and unconditional rows as one batch, interleaved (c0 u0 c1 u1 ...:
each item's two rows side by side, the layout of the decoding engine's cache). The unconditional rows
hold zero text states under an all-zero mask (cross-attention), or zero text states and the "no melody"
chroma (prefix), exactly as transformers builds them. Unconditional generation (no text, no melody) gives
both halves the same null conditions, so guidance is an identity and is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditions:
    """Per-generation conditioning, per decoding row (with guidance each item's unconditional row follows it)."""
    cross_kv: list | None = None           # per layer (k, v), each (rows, H, S, hd): text models
    cross_bias: torch.Tensor | None = None  # (rows, 1, 1, S) additive mask: text models
    prefix: torch.Tensor | None = None      # (rows, P, D) prepended tokens: melody models

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[1]


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, ...) and (B, ...) -> (2B, ...) rows a0 b0 a1 b1 ..."""
    return torch.stack([a, b], dim=1).flatten(0, 1)


def null_text(batch: int, dim: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """No description: one zero state under a zero mask (audiocraft tokenizes None as "" and masks it out)."""
    return torch.zeros(batch, 1, dim, device=device, dtype=dtype), torch.zeros(batch, 1, dtype=torch.long,
                                                                                device=device)


def cross_attention(lm, states: torch.Tensor, mask: torch.Tensor, cfg_rows: bool) -> Conditions:
    """Text states (B, S, D), mask (B, S) -> cross-attention keys/values, with null rows for guidance."""
    if cfg_rows:
        states, mask = interleave(states, torch.zeros_like(states)), interleave(mask, torch.zeros_like(mask))
    dtype = lm.norm.weight.dtype
    return Conditions(cross_kv=lm.cross_kv(states.to(dtype)), cross_bias=lm.cross_bias(mask, dtype))


def prefix(chroma_proj, states: torch.Tensor, chroma: torch.Tensor, null_chroma: torch.Tensor,
           cfg_rows: bool) -> Conditions:
    """Text states (B, S, D) (padding zeroed), chroma (B, L, 12), null chroma (B, L, 12) -> prepended tokens
    [projected chroma, text] per row; the guidance rows get the null chroma and zero text."""
    if cfg_rows:
        states, chroma = interleave(states, torch.zeros_like(states)), interleave(chroma, null_chroma)
    chroma = chroma.to(states.device, states.dtype)
    tokens = chroma_proj(chroma) if chroma_proj is not None else chroma       # (rows, L, D)
    return Conditions(prefix=torch.cat([tokens, states], dim=1))              # (rows, L + S, D)
