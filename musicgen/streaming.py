"""Streaming: audio out while the codes are still being generated.

    for chunk in model.stream(["lofi beat"], duration=30, chunk_seconds=1.0, seed=0):
        play(chunk)                                          # (B, channels, samples), about 1 s each

Two parts. `StreamingDecoder` turns codes that arrive a few frames at a time into audio equal to the one-shot
`EnCodec.decode` of all of them. The 32 kHz EnCodec decoder is not causal, but only one part of it has a long
memory, so it streams almost exactly:

    latent --conv k7--> --LSTM--> --(ELU, ConvTranspose, ResBlock) x 4, ELU, conv k7--> audio
            A: +-3 frames  B: causal,   C: about +-2 frames
               of context     unbounded memory

A and C only look a few frames either way: they are recomputed on a window around the new frames with
`MARGIN` frames of real context on each side, and the window's edges (where padding differs from the one-shot
run) are dropped. B carries its (h, c) state from chunk to chunk, so it is exact. Audio therefore lags the
newest complete frame by 2 * MARGIN frames (160 ms at 50 Hz), and the joined stream matches the one-shot
decode to float rounding (tests/test_streaming.py measures the SNR; > 100 dB).

`stream_codes` runs the decoding loop of `MusicGen.generate_codes` (the same engine, the same random draws),
paused whenever `chunk` more frames are complete; with the delay pattern frame f is complete once codebook
K-1 has been sampled for it, K-1 steps after codebook 0.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .accel import codec as codec_fast

MARGIN = 4   # frames of real context kept on each side of a recomputed window (A needs 3, C about 2)
FIRST_CHUNK_SECONDS = 0.25   # the first chunk of a stream, when chunk_seconds is longer: audio starts sooner


class StreamingDecoder:
    """Codes in, a few frames at a time; audio out, equal to the one-shot decode of all codes joined."""

    def __init__(self, codec, margin: int = MARGIN):
        layers = codec.decoder.layers
        # at least what A and C reach: a causal codec pads on the left only, and so looks twice as far back
        reach = max(codec_fast.context_frames(layers[:1], 1), codec_fast.context_frames(layers[2:], codec.hop_length))
        self.codec, self.margin = codec, max(margin, reach)
        self.stage_a, self.lstm_block, self.stage_c = layers[0], layers[1], layers[2:]
        self.latent: torch.Tensor | None = None      # (B, D, frames pushed)
        self.hidden: torch.Tensor | None = None      # (B, C, frames through the LSTM)
        self.state = None                            # LSTM (h, c)
        self.emitted = 0                             # frames already returned as audio

    @torch.inference_mode()
    def push(self, codes: torch.Tensor, final: bool = False) -> torch.Tensor:
        """codes (B, K, n) that follow the ones pushed before -> the audio (B, 1, m * hop) now certain."""
        latent = self.codec.quantizer.decode(codes.to(next(self.codec.parameters()).device))   # (B, D, n)
        self.latent = latent if self.latent is None else torch.cat([self.latent, latent], dim=-1)
        done_b = 0 if self.hidden is None else self.hidden.shape[-1]
        ready_b = self._ready(self.latent.shape[-1], final)
        if ready_b > done_b:
            x = _window(self.stage_a, self.latent, done_b, ready_b, self.margin)             # (B, C, new)
            x = x.permute(2, 0, 1)                                                           # (new, B, C)
            y, self.state = self.lstm_block.run(x, self.state)
            y = (y + x).permute(1, 2, 0)                                                     # LSTMBlock's residual
            self.hidden = y if self.hidden is None else torch.cat([self.hidden, y], dim=-1)
        total = 0 if self.hidden is None else self.hidden.shape[-1]
        ready_c = self._ready(total, final)
        if ready_c <= self.emitted:
            return self.latent.new_zeros(self.latent.shape[0], self.codec.cfg.channels, 0)
        audio = _window(self._run_c, self.hidden, self.emitted, ready_c, self.margin, self.codec.hop_length)
        self.emitted = ready_c
        return audio

    def _ready(self, available: int, final: bool) -> int:
        return available if final else max(0, available - self.margin)

    def _run_c(self, x: torch.Tensor) -> torch.Tensor:
        if codec_fast.enabled(x) and codec_fast.split(self.codec.decoder) == 2:
            return codec_fast.run(self.stage_c, x.transpose(1, 2).contiguous()).transpose(1, 2)
        for layer in self.stage_c:
            x = layer(x)
        return x


def _window(fn, x: torch.Tensor, start: int, end: int, margin: int, scale: int = 1) -> torch.Tensor:
    """fn's output for frames [start, end) of x, computed on x[lo:hi] with up to `margin` frames each side.

    fn maps n frames to n * scale samples and only looks `margin` frames either way, so the kept middle equals
    what fn over the whole of x gives; at x's true edges the window edge is the true edge.
    """
    lo, hi = max(0, start - margin), min(x.shape[-1], end + margin)
    y = fn(x[..., lo:hi])
    return y[..., (start - lo) * scale:(end - lo) * scale]


class MultiChannelDecoder:
    """Stereo MusicGen interleaves codebooks L0 R0 L1 R1 ...; each channel is its own EnCodec stream."""

    def __init__(self, codec, audio_channels: int, margin: int = MARGIN):
        self.channels = audio_channels
        self.decoders = [StreamingDecoder(codec, margin) for _ in range(audio_channels)]

    def push(self, codes: torch.Tensor, final: bool = False) -> torch.Tensor:
        """codes (B, K, n) -> audio (B, channels, m * hop)."""
        c = self.channels
        return torch.cat([d.push(codes[:, i::c], final) for i, d in enumerate(self.decoders)], dim=1)


@torch.inference_mode()
def stream_codes(model, prompts: Sequence[str] | str | None, duration: float, chunk_frames: int, *,
                 first_chunk_frames: int | None = None, **options) -> Iterator[tuple[torch.Tensor, bool]]:
    """Yield (codes (B, K, n), last) for every `chunk_frames` newly complete frames (`first_chunk_frames` for the
    first yield, default the same); the codes joined equal `model.generate_codes` with the same arguments
    (every mode of one 30 s window; a continuation's prompt frames come first)."""
    first_chunk_frames = chunk_frames if first_chunk_frames is None else first_chunk_frames
    if chunk_frames < 1 or first_chunk_frames < 1:
        raise ValueError(f"chunks must hold at least one frame, got {min(chunk_frames, first_chunk_frames)}")
    req = model.new_request(prompts, duration, **options)
    sent = 0
    for _ in model.decode_steps(req):
        complete = req.complete_frames
        if complete - sent >= (chunk_frames if sent else first_chunk_frames) or req.finished:
            yield req.codes_between(sent, complete), req.finished
            sent = complete


def stream(model, prompts: Sequence[str] | str | None, duration: float = 8.0, chunk_seconds: float = 1.0,
           first_chunk_seconds: float | None = None, **sampling) -> Iterator[torch.Tensor]:
    """Yield float32 audio (B, channels, samples) as it is decoded; joined, it is `model.generate(...)`'s audio
    up to float rounding. The first chunk is `first_chunk_seconds` long (default: chunk_seconds, at most
    FIRST_CHUNK_SECONDS), so that playback can start after a few decoding steps; the others chunk_seconds."""
    if not chunk_seconds > 0:
        raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds!r}")
    if first_chunk_seconds is None:
        first_chunk_seconds = min(chunk_seconds, FIRST_CHUNK_SECONDS)
    if not first_chunk_seconds > 0:
        raise ValueError(f"first_chunk_seconds must be positive, got {first_chunk_seconds!r}")
    chunk_frames = max(1, round(chunk_seconds * model.frame_rate))
    first_frames = max(1, round(first_chunk_seconds * model.frame_rate))
    decoder = MultiChannelDecoder(model.codec, model.audio_channels)
    for codes, last in stream_codes(model, prompts, duration, chunk_frames, first_chunk_frames=first_frames,
                                    **sampling):
        audio = decoder.push(codes, final=last)
        if audio.shape[-1] or last:
            yield audio
