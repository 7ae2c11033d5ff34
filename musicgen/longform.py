"""Long-form generation: any duration, by sliding the model's window (audiocraft's extend_stride; drawn here for
the published models' 30 s window and the default 18 s stride).

    total:    |=================================== frames ====================================|
    window 1: |-------------- 30 s --------------|
    window 2:               |-- 12 s prompt --|----- 18 s new -----|
    window 3:                                 |-- 12 s prompt --|----- 18 s new -----|   ...

Each window after the first is a continuation: its first `window - stride` frames are the last frames
generated so far, fed back as known codes, so the music carries on across the join instead of restarting.
Text conditioning is the same in every window; a melody is read from the window's own start time (looped
when shorter than the music), so it stays aligned. Only one window's caches exist at a time: memory does not
grow with the duration, only the (B, K, frames) codes do.
"""
from __future__ import annotations

from typing import Callable

import torch


def generate_long(window: Callable, known: torch.Tensor, frames: int, window_frames: int, stride: int,
                  melodies: list[torch.Tensor] | None, samples_per_frame: float,
                  melody_window: int) -> torch.Tensor:
    """Codes (B, K, frames) from windows of at most `window_frames`, advanced by `stride` frames.

    window(known (B, K, P), frames, melodies) -> (B, K, frames) generates one window;
    known: a continuation prompt (P may be 0); melodies: mono waves sampled `samples_per_frame` per frame.
    """
    pieces = [known]
    prompt = known
    for offset, length, _ in window_plan(known.shape[2], frames, window_frames, stride):
        window_melodies = None
        if melodies is not None:                 # the melody under this window, looped (audiocraft's positions % len)
            start = int(offset * samples_per_frame)
            window_melodies = [None if m is None else m[torch.arange(start, start + melody_window) % m.shape[-1]]
                               for m in melodies]
        codes = window(prompt, length, window_melodies)                 # (B, K, length)
        pieces.append(codes[:, :, prompt.shape[2]:])
        prompt = codes[:, :, stride:]
    return torch.cat(pieces, dim=2)[:, :, :frames]


def window_plan(known: int, frames: int, window_frames: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of a generation of `frames` frames whose first `known` are given: (first frame, frames,
    frames of prompt) each, as generate_long runs them (one window when it all fits)."""
    if frames <= window_frames:
        return [(0, frames, known)]
    if not 0 < stride < window_frames:
        raise ValueError(f"the stride ({stride} frames) must be shorter than the window ({window_frames} frames)")
    plan, offset, prompt = [], 0, known
    while offset + prompt < frames:
        length = min(frames - offset, window_frames)
        plan.append((offset, length, prompt))
        prompt, offset = length - stride, offset + stride
    return plan
