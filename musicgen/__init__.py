"""musicgen: fast, faithful MusicGen text-to-music in plain PyTorch.

    import musicgen
    model = musicgen.load("facebook/musicgen-small")
    audio = model.generate(["80s pop track with bassy drums and synth"], duration=8.0)
    musicgen.save_audio("pop.wav", audio[0], model.sample_rate)
"""
from .audio import load_audio, save_audio
from .checkpoint import CheckpointError
from .config import CodecConfig, LMConfig, MusicGenConfig, T5Config, preset
from .model import MusicGen, load
from .sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["load", "MusicGen", "save_audio", "load_audio", "CheckpointError", "MusicGenConfig", "CodecConfig",
           "LMConfig", "T5Config", "SamplingParams", "preset", "__version__"]
