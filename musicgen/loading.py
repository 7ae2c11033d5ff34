"""`musicgen.load(...)`: a checkpoint (hub id or folder, Hugging Face or audiocraft format) -> a MusicGen.

    model = musicgen.load("facebook/musicgen-small")                          # float32: the exact path
    model = musicgen.load("facebook/musicgen-small", quantize="int4")         # the fastest on CPU
    model = musicgen.load("facebook/musicgen-medium", device="cuda", dtype="bfloat16", compile=True)

The model is built on the meta device and the checkpoint's tensors are assigned into it (no second copy, no
random init), then converted to the chosen precision (musicgen/precision.py) and given the backend that
runs its decoding steps (musicgen/accel/__init__.py).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn

from . import audiocraft_format
from . import checkpoint as ckpt
from .accel import choose_backend, kernels
from .accel.quant import Int8Linear, quantize_int4, quantize_int8
from .inputs import resolve_device
from .lm import sinusoids
from .model import MusicGen
from .precision import Precision
from .tokenizer import TextTokenizer


def load(name_or_path: str | os.PathLike = "facebook/musicgen-small", device: str | torch.device = "cpu",
         dtype: str | torch.dtype = "float32", quantize: str | None = None, compile: bool = False) -> MusicGen:
    """Load a MusicGen checkpoint: a hub id (downloaded to the Hugging Face cache) or a local folder.

    dtype       the LM's and text encoder's precision: "float32" (the exact reference path), "bfloat16",
                "float16"; the codec stays float32
    quantize    None, "int8" (weight-only, per output channel: the LM and the text encoder) or "int4" (the
                LM's layers in 4 bits, groups of 32; its output heads and the text encoder in int8): faster
                on CPU, further from float32 (README, Precision and speed). On a CPU without our kernels a
                quantised model computes in bfloat16 (musicgen/precision.py).
    compile     torch.compile the decoding step's layers (CUDA graphs on a GPU); the first generation of each
                batch size pays the compile time. On a CPU with the native kernels the fused step runs instead.
    """
    device = torch.device(resolve_device(device))   # an unknown or missing device: one ValueError line
    built = device.type == "cpu" and kernels.int8_gemv() is not None   # our CPU kernels (accel/kernels)
    compute = Precision.choose(dtype, quantize, device, kernels=built).compute
    folder = ckpt.resolve(name_or_path)
    if audiocraft_format.is_audiocraft(folder):   # state_dict.bin + compression_state_dict.bin (+ t5/)
        cfg, state, text_folder = audiocraft_format.read(folder)
    else:
        cfg, _ = ckpt.read_config(folder)
        state, text_folder = ckpt.map_hf_state(ckpt.read_weights(folder)), folder
    tokenizer = TextTokenizer.from_dir(text_folder)
    with torch.device("meta"):
        model = MusicGen(cfg, tokenizer)
    ckpt.load_into(model, state, str(folder))
    del state   # the model holds the tensors now; precision changes below free each old copy as they go
    _rebuild_buffers(model)
    model.eval().requires_grad_(False)
    model.to(device)
    # the codec runs in float32 whatever the file stores (a checkpoint saved in float16 or bfloat16)
    model.codec._apply(functools.partial(_convert, dtype=torch.float32))
    for part in (model.lm, model.text_encoder, model.text_proj, model.chroma_proj):
        if part is not None:
            part._apply(functools.partial(_convert, dtype=compute))   # part.to(dtype), releasing as it goes
    if quantize == "int4":
        quantize_int4(model.lm, compute, skip=("heads",))
    elif quantize == "int8":
        quantize_int8(model.lm, compute)
    if quantize is not None:
        quantize_int8(model.text_encoder, compute)
        if model.text_proj is not None:
            model.text_proj = Int8Linear.from_linear(model.text_proj, compute)
    model.backend = choose_backend(model.lm, device, compile)
    model.backend.choice = (compile,)
    model.precision = Precision.choose(dtype, quantize, device, fused=model.backend.name == "fused", kernels=built)
    return model


def _convert(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What Module.to(dtype) does to one tensor, and the original's pages released once copied
    (checkpoint.release: a float32 checkpoint loaded as bfloat16 then peaks near the bfloat16 model)."""
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    converted = tensor.to(dtype)
    ckpt.release(tensor)
    return converted


def _rebuild_buffers(model: MusicGen) -> None:
    """Non-persistent buffers are not in checkpoints; the meta-device build left them empty."""
    lm = model.lm
    lm.positions = sinusoids(lm.cfg.max_position_embeddings, lm.cfg.dim)
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()   # rebinding LSTM parameters on load leaves its flat list stale
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"tensors left uninitialised after loading: {leftovers[:3]}")
