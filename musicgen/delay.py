"""The delay pattern: how K parallel codebook streams become one autoregressive sequence.

Codebook k is shifted right by k steps, so at step s the LM predicts frame s-k of codebook k: a coarse code
is always sampled one step before the finer codes of the same frame that depend on it. With K=4 codebooks
and T=5 frames (S = special token, i.e. id `vocab_size`, used both as BOS and as padding; digits = frame):

    position:    0  1  2  3  4  5  6  7  8
    codebook 0:  S  0  1  2  3  4  S  S  S
    codebook 1:  S  S  0  1  2  3  4  S  S
    codebook 2:  S  S  S  0  1  2  3  4  S
    codebook 3:  S  S  S  S  0  1  2  3  4

Generating T frames therefore takes T + K - 1 decoding steps (position 0 is the all-special start token).
Stereo checkpoints interleave left and right (L0 R0 L1 R1 ...): both codebooks of one residual level share
its delay, so 8 codebooks carry delays 0 0 1 1 2 2 3 3.
"""
from __future__ import annotations

import torch


def codebook_delays(num_codebooks: int, audio_channels: int = 1) -> list[int]:
    """Delay of each codebook row, e.g. [0, 1, 2, 3] mono or [0, 0, 1, 1, 2, 2, 3, 3] stereo."""
    return [k // audio_channels for k in range(num_codebooks)]


def pattern_length(frames: int, num_codebooks: int, audio_channels: int = 1) -> int:
    """Length of the delayed sequence (start token included) that holds `frames` frames."""
    return frames + max(codebook_delays(num_codebooks, audio_channels)) + 1


def build_pattern(codes: torch.Tensor, frames: int, special: int, audio_channels: int = 1) -> torch.Tensor:
    """Lay known codes out on the delayed grid; positions still to generate hold -1.

    codes: (B, K, P) frames already known (P may be 0: nothing known, as in text-to-music).
    Returns (B, K, L) with L = pattern_length(frames): special where the pattern has no frame, codes[.., f] at
    position f + delay + 1, and -1 at every frame position not covered by `codes`.
    """
    B, K, P = codes.shape
    L = pattern_length(frames, K, audio_channels)
    seq = torch.full((B, K, L), special, dtype=torch.long, device=codes.device)
    for k, d in enumerate(codebook_delays(K, audio_channels)):
        seq[:, k, d + 1:d + 1 + frames] = -1
        seq[:, k, d + 1:d + 1 + P] = codes[:, k, :frames]
    return seq


def valid_mask(num_codebooks: int, frames: int, audio_channels: int = 1, device=None) -> torch.Tensor:
    """(K, L) bool: True where the delayed grid carries a real frame (False: special token)."""
    L = pattern_length(frames, num_codebooks, audio_channels)
    pos = torch.arange(L, device=device)
    d = torch.tensor(codebook_delays(num_codebooks, audio_channels), device=device)[:, None]
    return (pos > d) & (pos <= d + frames)


def revert_pattern(seq: torch.Tensor, frames: int, audio_channels: int = 1) -> torch.Tensor:
    """Undo the delay: (B, K, L) delayed grid -> (B, K, frames) codes."""
    K = seq.shape[1]
    rows = [seq[:, k, d + 1:d + 1 + frames] for k, d in enumerate(codebook_delays(K, audio_channels))]
    return torch.stack(rows, dim=1)
