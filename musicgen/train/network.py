"""What trains: the LM and the projections of its conditions, as one module with one forward, so that
DistributedDataParallel and FSDP wrap a single call (their hooks see every parameter used in it).

    text states (B, S, d_model) from the frozen T5 --text_proj--> (B, S, dim), padding zeroed
        text models:    cross-attention keys/values of every layer, additive mask from the text mask
        melody models:  prefix [chroma_proj(chroma) (B, L, dim), text (B, S, dim)] before the codes
    codes (B, K, T) ----------------------------------------------> MusicLM -> logits (B, K, T, V)

The same math as inference (MusicGen.encode_text, conditions.cross_attention / conditions.prefix), with one
difference only in where the T5 runs: `text_states` runs it under no_grad (MusicGen.encode_text runs under
inference_mode, whose tensors autograd cannot save), and the projection runs here, where it can train.
A null condition (classifier-free guidance dropout) is a row whose text mask is all zeros: its states are
zeroed like padding, which is the null text that inference uses (zero states under a zero mask).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class Network(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.lm = model.lm
        self.text_proj = model.text_proj
        self.chroma_proj = model.chroma_proj
        self.prefix_conditioning = model.cfg.lm.prefix_conditioning

    def forward(self, codes: torch.Tensor, states: torch.Tensor, mask: torch.Tensor,
                chroma: torch.Tensor | None = None, mask_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """codes (B, K, T), T5 states (B, S, d_model), mask (B, S), chroma (B, L, 12) one-hot (melody models)
        -> logits (B, K, T, V). mask_dtype: the dtype the attention runs in (autocast's), so that the masked
        positions get that dtype's most negative value (float32's would be -inf in float16)."""
        if self.text_proj is not None:
            states = self.text_proj(states)                                     # (B, S, dim)
        states = states * mask[..., None].to(states.dtype)
        if self.prefix_conditioning:
            tokens = self.chroma_proj(chroma) if self.chroma_proj is not None else chroma   # (B, L, dim)
            prefix = torch.cat([tokens.to(states.dtype), states], dim=1)        # (B, L + S, dim)
            return self.lm(codes, None, None, prefix=prefix)
        return self.lm(codes, self.lm.cross_kv(states), self.lm.cross_bias(mask, mask_dtype))


@torch.no_grad()
def text_states(model, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> frozen T5 states (B, S, d_model) float32 and mask (B, S); an empty caption is the null
    condition: its mask is all zeros (audiocraft tokenizes a missing description as "" and masks it out)."""
    ids, mask = model.tokenizer(list(captions))
    ids, mask = ids.to(model.device), mask.to(model.device)
    empty = torch.tensor([not c for c in captions], device=mask.device)
    mask = mask.masked_fill(empty[:, None], 0)
    with torch.autocast(model.device.type, enabled=False):
        states = model.text_encoder(ids, mask)
    return states.float(), mask
