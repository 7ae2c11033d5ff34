"""Audio into and out of the service: uploads read with their length bounded before decoding, and the WAV
stream of a job sent while it is generated."""
from __future__ import annotations

import asyncio
import io

import numpy as np
import torch
from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool

from ..audio import pcm16, wav_header
from ..engine import Request
from ..streaming import MultiChannelDecoder

MAX_UPLOAD = 20 * 2 ** 20           # bytes of audio (or request JSON) accepted per multipart part


async def upload_bytes(part, what: str) -> bytes:
    """A multipart file part's bytes, at most MAX_UPLOAD of them."""
    if isinstance(part, str):
        raise HTTPException(422, f"{what}: send the audio as a file part (curl -F '{what}=@song.wav'), not as text")
    data = await part.read(MAX_UPLOAD + 1)
    if len(data) > MAX_UPLOAD:
        raise HTTPException(413, f"{what} audio is larger than {MAX_UPLOAD // 2 ** 20} MiB")
    return data


def read_upload(data: bytes, what: str, max_seconds: float, cut: bool = False):
    """Decode uploaded audio -> (float32 (samples, channels), rate), reading no more than `max_seconds` of it:
    a few KB of compressed silence can hold hours, so the length is bounded before decoding, not after. Longer
    audio is cut there (`cut`) or refused."""
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr = f.samplerate
            limit = int(max_seconds * sr) + 1
            wav = f.read(limit, dtype="float32", always_2d=True)
    except Exception:
        raise HTTPException(422, f"{what}: not an audio file this server can read") from None
    if wav.shape[0] >= limit:
        if not cut:
            raise HTTPException(422, f"{what} audio is longer than {max_seconds:g} s (the requested duration)")
        wav = wav[:limit - 1]
    if wav.shape[0] == 0:
        raise HTTPException(422, f"{what}: the audio file is empty")
    if not np.isfinite(wav).all():
        raise HTTPException(422, f"{what}: the audio holds NaN or infinite samples")
    return wav, sr


async def wav_stream(service, live: Request | None, codes: torch.Tensor | None, cancel_on_leave: bool):
    """A WAV header of unknown length, then 16-bit PCM as frames complete; leaving early cancels the job
    unless `cancel_on_leave` is False."""
    model = service.model
    yield wav_header(model.sample_rate, model.audio_channels)
    decoder = MultiChannelDecoder(model.codec, model.audio_channels)
    finished = False
    try:
        if codes is not None:                                        # already done: stream the stored codes
            audio = await run_in_threadpool(decoder.push, codes[None], True)
            yield pcm16(audio[0])
            finished = True
            return
        sent = 0
        while True:
            done = live.done.is_set()
            ready = live.complete_frames
            if live.status in ("cancelled", "failed"):
                return
            if ready > sent or (done and not finished):
                last = done and ready >= live.frames
                chunk = live.codes_between(sent, ready)
                audio = await run_in_threadpool(decoder.push, chunk, last)
                sent = ready
                if audio.shape[-1]:
                    yield pcm16(audio[0])
                if last:
                    finished = True
                    return
            else:
                await asyncio.sleep(0.05)
    finally:
        if cancel_on_leave and not finished and live is not None and not live.done.is_set():
            service.scheduler.cancel(live)                           # the listener left: stop the work
