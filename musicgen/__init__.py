"""musicgen: fast, faithful MusicGen text-to-music in plain PyTorch.

    import musicgen
    model = musicgen.load("facebook/musicgen-small")
    audio = model.generate(["80s pop track with bassy drums and synth"], duration=8.0)
    musicgen.save_audio("pop.wav", audio[0], model.sample_rate)

The names below are imported on first use, so that `musicgen --help` and the command line's input errors
answer without importing torch (about a second).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {"load": "loading", "MusicGen": "model", "save_audio": "audio", "load_audio": "audio",
            "CheckpointError": "checkpoint", "MusicGenConfig": "config", "CodecConfig": "config",
            "LMConfig": "config", "T5Config": "config", "preset": "config", "SamplingParams": "sampling"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'musicgen' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value   # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
