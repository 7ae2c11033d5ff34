"""Acceleration: everything that makes the model faster without changing what it computes.

    quant.py      weight-only int8 / int4 layers (passes that swap nn.Linear): our kernels on x86 CPUs,
                  PyTorch's packed weight-only kernels elsewhere
    fused.py      the native CPU decoding step: every decoder layer of a step in one call
    compiled.py   the decoding step's layer loop under torch.compile (CUDA graphs on a GPU)
    codec.py      EnCodec's convolutions and LSTM on CPU as windowed matrix products
    kernels/      the C++ kernels those use, built on first use

`choose_backend` picks how a model's decoding steps run, by what the machine can do (device, whether the
kernels built) and what the caller asked for (compile), never by a timing:

    CPU, kernels built (x86-64 with AVX2, FMA, F16C and a C++ compiler)  -> fused native step
    compile=True (a GPU, or a CPU without the kernels)                   -> compiled layer loop
    otherwise                                                            -> the PyTorch layer loop (reference)

Every backend computes what the reference computes (tests/test_backends.py holds them together).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, fields


@dataclass
class Settings:
    """Choices the tests force to run every path this machine can run; users leave them alone.

    backend: "auto", or one of "reference", "fused", "compiled" (a model that cannot take the fused step
    still gets the reference). kernels: False behaves as a machine without the native kernels
    (MUSICGEN_NO_KERNELS=1 is the user's switch for the same)."""
    backend: str = "auto"
    kernels: bool = True


settings = Settings()


@contextlib.contextmanager
def override(**changes):
    """Change `settings` for a block (tests): `with accel.override(backend="reference"): load(...)`."""
    old = {f.name: getattr(settings, f.name) for f in fields(settings)}
    for name, value in changes.items():
        if name not in old:
            raise TypeError(f"no setting {name!r}")
        setattr(settings, name, value)
    try:
        yield settings
    finally:
        for name, value in old.items():
            setattr(settings, name, value)


def choose_backend(lm, device, compile: bool = False, mode: str | None = None):
    """The backend that runs `lm`'s decoding steps (see the module docstring)."""
    from ..engine import Reference
    from . import fused

    wanted = settings.backend
    if wanted not in ("auto", "reference", "fused", "compiled"):
        raise ValueError(f"unknown backend {wanted!r}")
    if wanted in ("auto", "fused") and device.type == "cpu":
        step = fused.build(lm)
        if step is not None:
            if compile:
                print("musicgen: compile skipped: the fused CPU step runs this model's decoding", file=sys.stderr)
            return step
    if wanted == "compiled" or (wanted == "auto" and compile):
        from .compiled import Compiled

        return Compiled(mode)
    return Reference()
