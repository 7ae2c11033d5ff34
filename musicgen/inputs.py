"""Checking and shaping the inputs of a generation: prompts, batch size, audio rows, sample rates, device.

Every error is a ValueError whose message names the argument, so the command line and the service can pass
it on as it is.
"""
from __future__ import annotations

import operator
import os

import torch


def resolve_device(name: str | torch.device | None) -> str:
    """A device name, checked: None -> cuda where there is one, else cpu; an unknown name, or CUDA or MPS asked
    for where there is none, is a ValueError naming it."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = str(name)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA device is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available")
    return name


def check_batch(prompts, batch_size: int | None, rows: list[int | None]) -> tuple[list[str] | None, int]:
    """Validate prompts and settle the batch size from prompts, batch_size, melody or prompt audio rows."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    sizes = {n for n in rows if n is not None}
    if prompts is not None:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, (list, tuple)):
            prompts = list(prompts)
        else:
            raise ValueError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("give at least one prompt, or prompts=None for generation without text")
        for i, p in enumerate(prompts):
            if p is not None and not isinstance(p, str):
                raise ValueError(f"prompt {i} must be a string (or None for no text), got {type(p).__name__}")
        sizes.add(len(prompts))
    if batch_size is not None:
        sizes.add(batch_size)
    if len(sizes) > 1:
        raise ValueError(f"inconsistent batch: prompts, batch_size, melody and prompt_audio give {sorted(sizes)} rows")
    return prompts, (sizes.pop() if sizes else 1)


def rows_of(audio, what: str = "audio") -> int | None:
    """Rows an audio argument fixes: a list's length or a 3-d tensor's batch; None for one shared signal."""
    if isinstance(audio, (list, tuple)) and audio and all(isinstance(a, (int, float)) for a in audio):
        raise ValueError(f"{what} is a list of numbers: pass a tensor or array (samples,), or a list of one per row")
    if isinstance(audio, (list, tuple)):
        return len(audio)
    if isinstance(audio, torch.Tensor) and audio.dim() == 3:
        return audio.shape[0]
    return None


MAX_CHANNELS = 32


def per_row(audio, batch: int, what: str, allow_none: bool = False) -> list[torch.Tensor | None]:
    """(samples,), (channels, samples) for every row, (B, channels, samples) or a list of rows -> B tensors;
    with allow_none, a list may hold None for a row without this input."""
    if isinstance(audio, (str, os.PathLike)):
        raise ValueError(f"{what} takes samples, not a file name: read {str(audio)!r} with musicgen.load_audio "
                         f"and pass its samples and rate")
    rows_of(audio, what)
    if isinstance(audio, (list, tuple)):
        if not allow_none and any(a is None for a in audio):
            raise ValueError(f"{what} holds None rows: give every row its audio")
        items = [None if a is None else torch.as_tensor(a, dtype=torch.float32) for a in audio]
    else:
        audio = torch.as_tensor(audio, dtype=torch.float32)
        if audio.dim() == 3:
            items = list(audio)
        elif audio.dim() in (1, 2):
            items = [audio] * batch
        else:
            raise ValueError(f"{what} must be (samples,), (channels, samples) or (batch, channels, samples), "
                             f"got shape {tuple(audio.shape)}")
    out = []
    for a in items:
        if a is None:
            out.append(None)
            continue
        a = a.detach().float().cpu()
        a = a[None] if a.dim() == 1 else a
        if a.dim() != 2:
            raise ValueError(f"each {what} must be (channels, samples), got shape {tuple(a.shape)}")
        # more channels than a model takes keep the first ones (audiocraft's convert_audio_channels); a count
        # beyond any surround layout is samples and channels the other way round (soundfile reads them so)
        if a.shape[0] > MAX_CHANNELS:
            raise ValueError(f"{what} has {a.shape[0]} channels: pass (channels, samples), not (samples, channels)")
        if not torch.isfinite(a).all():
            raise ValueError(f"{what} holds NaN or infinite samples")
        out.append(a)
    if len(out) != batch:
        raise ValueError(f"{len(out)} {what} rows for a batch of {batch}")
    return out


def integer(value) -> int | None:
    """An int or a NumPy integer as an int; None for anything else (bools and floats included: a float would
    be truncated)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def rate(value, what: str) -> int:
    hz = integer(value)
    if hz is None or hz <= 0:
        raise ValueError(f"{what} must be a positive integer (Hz), got {value!r}")
    return hz


def check_seed(seed) -> int | None:
    """None, or an integer in 0 .. 2**63 - 1 (what torch.Generator takes, and the service's range)."""
    if seed is None:
        return None
    value = integer(seed)
    if value is None:
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not 0 <= value < 2 ** 63:
        raise ValueError(f"seed must be in 0 .. 2**63 - 1, got {value}")
    return value
