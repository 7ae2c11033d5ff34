"""The training objective: cross-entropy per codebook over the positions the delay pattern makes valid.

A batch of codes (B, K, T), row b real for its first n_b frames, is laid out on the delayed grid (musicgen/
delay.py; D = the largest delay), and the LM reads the grid without its last position:

    grid     (B, K, T + D + 1)   S at position 0, frame f of codebook k at position f + delay_k + 1
    inputs = grid[..., :-1]      what the LM sees (frames past n_b are the special token S)
    targets= grid[..., 1:]       logits at position p predict the grid at p + 1
    valid    targets that hold frame f < n_b - delay_k of their row

    loss = mean over k of  (sum of CE over the valid targets of codebook k) / (valid targets of codebook k)

as audiocraft's MusicGen solver computes it: its LM reads the pattern only up to the last step at which every
codebook is defined (`keep_only_valid_steps`), so codebook k is never asked for the last delay_k frames of a
segment. Here a row ends its segment at n_b (audiocraft pads a short file with zeros and trains on their
codes; padding is never a target here). Codebook k thus has sum_b max(0, n_b - delay_k) valid targets
(`target_counts`): the denominators of a global batch are known before any forward pass, which lets
micro-batches and ranks each add their share of the sums (`codebook_sums`) and reach the loss of the whole
batch exactly. transformers' MusicgenForConditionalGeneration computes the same loss from these targets as
labels (pads ignored).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..delay import build_pattern, codebook_delays

IGNORE = -100


def delayed_batch(codes: torch.Tensor, lengths: torch.Tensor, special: int, audio_channels: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (B, K, T) long, lengths (B,) real frames per row -> (inputs (B, K, L), targets (B, K, L)) with
    L = T + D; targets hold IGNORE where nothing is to be predicted (delay pads, padding, and the last delay_k
    frames of codebook k)."""
    B, K, T = codes.shape
    frame = torch.arange(T, device=codes.device)
    real = frame[None, :] < lengths[:, None].to(codes.device)                  # (B, T)
    codes = torch.where(real[:, None, :], codes, torch.full_like(codes, special))
    grid = build_pattern(codes, T, special, audio_channels)                     # (B, K, T + D + 1)
    targets = grid[..., 1:].clone()
    # target position q of codebook k holds frame q - delay_k: valid when that frame exists, is real, and is
    # not among the codebook's last delay_k frames of the row
    delays = torch.tensor(codebook_delays(K, audio_channels), device=codes.device)
    f = torch.arange(targets.shape[-1], device=codes.device)[None, :] - delays[:, None]   # (K, L)
    end = lengths.to(codes.device)[:, None, None] - delays[None, :, None]                 # (B, K, 1)
    valid = (f[None] >= 0) & (f[None] < end)                                              # (B, K, L)
    targets[~valid] = IGNORE
    return grid[..., :-1], targets


def target_counts(frames, num_codebooks: int, audio_channels: int = 1) -> torch.Tensor:
    """(K,) float32 valid targets per codebook of rows of `frames` real frames each (delayed_batch's rule)."""
    delays = codebook_delays(num_codebooks, audio_channels)
    return torch.tensor([sum(max(0, int(n) - d) for n in frames) for d in delays], dtype=torch.float32)


def codebook_sums(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, K, L, V), targets (B, K, L) -> (K,) float32 sums of cross-entropy over the valid targets.
    One codebook at a time, so that a float32 copy of 16-bit logits is never made for all of them at once."""
    K, V = logits.shape[1], logits.shape[-1]
    return torch.stack([F.cross_entropy(logits[:, k].float().reshape(-1, V), targets[:, k].reshape(-1),
                                        ignore_index=IGNORE, reduction="sum") for k in range(K)])


def batch_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one whole batch and its per-codebook values (K,)."""
    count = (targets != IGNORE).sum(dim=(0, 2)).clamp(min=1)                  # (K,)
    per_codebook = codebook_sums(logits, targets) / count
    return per_codebook.mean(), per_codebook.detach()
