"""`musicgen.load(...)` and the `MusicGen` model object: text -> codes -> audio.

    model = musicgen.load("facebook/musicgen-small")
    audio = model.generate(["lofi beat"], duration=8.0)        # (B, channels, samples) at model.sample_rate

Generation is split the gpt-fast way: text states and cross-attention keys/values once, a prefill over the
known prefix of the delayed grid, then one cached step per position.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .codec import EnCodec
from .config import MusicGenConfig
from .delay import build_pattern, pattern_length, revert_pattern
from .lm import MusicLM, sinusoids
from .sampling import SamplingParams, apply_cfg, sample
from .t5 import T5Encoder
from .tokenizer import TextTokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
MAX_DURATION = 30.0   # seconds: the context MusicGen was trained on


class MusicGen(nn.Module):
    def __init__(self, cfg: MusicGenConfig, tokenizer: TextTokenizer | None = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.text_encoder = T5Encoder(cfg.text)
        # transformers projects T5 states to the LM width unless cross-attention is declared at T5 width
        needs_proj = cfg.text.d_model != cfg.lm.dim and cfg.lm.cross_attention_dim is None
        self.text_proj = nn.Linear(cfg.text.d_model, cfg.lm.dim) if needs_proj else None
        self.lm = MusicLM(cfg.lm, context_dim=cfg.lm.dim if needs_proj or cfg.lm.cross_attention_dim is None
                          else cfg.text.d_model)
        self.codec = EnCodec(cfg.codec)

    # -- facts ------------------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def frame_rate(self) -> int:
        return self.cfg.frame_rate

    @property
    def audio_channels(self) -> int:
        return self.cfg.audio_channels

    @property
    def device(self) -> torch.device:
        return self.lm.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.norm.weight.dtype

    # -- text -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (states (B, S, C), mask (B, S)); padded positions are zeroed as in transformers."""
        if self.tokenizer is None:
            raise RuntimeError("this model was built without a tokenizer; load it from a checkpoint folder")
        ids, mask = self.tokenizer(list(prompts))
        ids, mask = ids.to(self.device), mask.to(self.device)
        states = self.text_encoder(ids, mask)                                  # (B, S, d_model)
        if self.text_proj is not None:
            states = self.text_proj(states)                                    # (B, S, dim)
        return states * mask[..., None].to(states.dtype), mask

    # -- codec ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, channels, samples) at model.sample_rate -> codes (B, K, frames); stereo codebooks interleaved."""
        if audio.dim() != 3:
            raise ValueError(f"audio must be (batch, channels, samples), got shape {tuple(audio.shape)}")
        if audio.shape[1] != self.audio_channels:
            raise ValueError(f"this model takes {self.audio_channels}-channel audio, got {audio.shape[1]} channels")
        audio = audio.to(self.codec_device, torch.float32)
        if self.audio_channels == 1:
            return self.codec.encode(audio)
        left, right = self.codec.encode(audio[:, :1]), self.codec.encode(audio[:, 1:])
        return torch.stack([left, right], dim=2).flatten(1, 2)                 # L0 R0 L1 R1 ...

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, K, frames) -> float32 audio (B, channels, frames * hop)."""
        K = self.cfg.lm.num_codebooks
        if codes.dim() != 3 or codes.shape[1] != K:
            raise ValueError(f"codes must be (batch, {K}, frames), got shape {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.cfg.codec.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.cfg.codec.codebook_size})")
        codes = codes.to(self.codec_device)
        if self.audio_channels == 1:
            return self.codec.decode(codes)
        return torch.cat([self.codec.decode(codes[:, 0::2]), self.codec.decode(codes[:, 1::2])], dim=1)

    @property
    def codec_device(self) -> torch.device:
        return next(self.codec.parameters()).device

    # -- generation -------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | str, duration: float = 8.0, *, top_k: int = 250, top_p: float = 0.0,
                 temperature: float = 1.0, guidance_scale: float = 3.0, seed: int | None = None,
                 progress: bool = False) -> torch.Tensor:
        """Text prompts -> float32 audio (B, channels, samples) at model.sample_rate."""
        codes = self.generate_codes(prompts, duration, top_k=top_k, top_p=top_p, temperature=temperature,
                                    guidance_scale=guidance_scale, seed=seed, progress=progress)
        return self.decode(codes)

    @torch.inference_mode()
    def generate_codes(self, prompts: Sequence[str] | str, duration: float = 8.0, *, top_k: int = 250,
                       top_p: float = 0.0, temperature: float = 1.0, guidance_scale: float = 3.0,
                       seed: int | None = None, progress: bool = False) -> torch.Tensor:
        """Text prompts -> codes (B, K, frames) with frames = round(duration * frame_rate)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("give at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty")
        frames = self.frames_for(duration)
        params = SamplingParams(top_k=top_k, top_p=top_p, temperature=temperature, guidance_scale=guidance_scale)
        params.validate()
        states, mask = self.encode_text(prompts)
        if params.uses_cfg:  # unconditional rows: zero text states, fully masked (transformers / audiocraft null text)
            states = torch.cat([states, torch.zeros_like(states)], dim=0)
            mask = torch.cat([mask, torch.zeros_like(mask)], dim=0)
        K = self.cfg.lm.num_codebooks
        known = torch.zeros(len(prompts), K, 0, dtype=torch.long, device=self.device)
        seq = build_pattern(known, frames, self.cfg.lm.special_token, self.audio_channels)
        seq = self._decode_grid(seq, states, mask, params, seed, progress)
        return revert_pattern(seq, frames, self.audio_channels)

    def stream(self, prompts: Sequence[str] | str, duration: float = 8.0, chunk_seconds: float = 1.0, **sampling):
        """Yield float32 audio (B, channels, samples) while it is generated, about `chunk_seconds` at a time;
        joined, it equals `generate` with the same arguments up to float rounding (see musicgen.streaming)."""
        from .streaming import stream
        return stream(self, prompts, duration, chunk_seconds, **sampling)

    def frames_for(self, duration: float) -> int:
        if not isinstance(duration, (int, float)) or not duration > 0:
            raise ValueError(f"duration must be a positive number of seconds, got {duration!r}")
        if duration > MAX_DURATION:
            raise ValueError(f"duration {duration:g} s is longer than the model's {MAX_DURATION:g} s context")
        return max(1, round(duration * self.frame_rate))

    def _decode_grid(self, seq: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, params: SamplingParams,
                     seed: int | None, progress: bool) -> torch.Tensor:
        """Fill every -1 of the delayed grid (B, K, L), left to right, with sampled codes."""
        B, K, L = seq.shape
        seq = seq.clone()
        rows = 2 * B if params.uses_cfg else B
        dtype = self.dtype
        cross_kv = self.lm.cross_kv(states.to(dtype))
        cross_bias = self.lm.cross_bias(mask, dtype)
        caches = self.lm.new_caches(rows, L)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        open_ = (seq == -1).any(dim=1).any(dim=0)                              # (L,) positions with work left
        start = int(open_.nonzero()[0]) if open_.any() else L                  # first position to generate
        step_inputs = lambda x: torch.cat([x, x], dim=0) if params.uses_cfg else x  # noqa: E731
        bar = _progress(L - start, progress)
        logits = self.lm(step_inputs(seq[:, :, :start]), cross_kv, cross_bias, 0, caches)[:, :, -1]  # prefill
        for pos in range(start, L):
            if params.uses_cfg:
                logits = apply_cfg(logits.float(), params.guidance_scale)      # (B, K, V)
            token = sample(logits, params, generator)                          # (B, K)
            seq[:, :, pos] = torch.where(seq[:, :, pos] == -1, token, seq[:, :, pos])
            bar.update(1)
            if pos + 1 < L:
                logits = self.lm(step_inputs(seq[:, :, pos:pos + 1]), cross_kv, cross_bias, pos, caches)[:, :, -1]
        bar.close()
        return seq


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="step", desc="decoding", file=sys.stderr, disable=not enabled, leave=False,
                dynamic_ncols=True)


# -- loading ----------------------------------------------------------------------------------------------
def load(name_or_path: str | os.PathLike = "facebook/musicgen-small", device: str | torch.device = "cpu",
         dtype: str | torch.dtype = "float32") -> MusicGen:
    """Load a MusicGen checkpoint (hub id or local folder in the Hugging Face format)."""
    torch_dtype = _dtype(dtype)
    device = torch.device(device)
    folder = ckpt.resolve(name_or_path)
    cfg, _ = ckpt.read_config(folder)
    tokenizer = TextTokenizer.from_dir(folder)
    state = ckpt.map_hf_state(ckpt.read_weights(folder))
    with torch.device("meta"):
        model = MusicGen(cfg, tokenizer)
    ckpt.load_into(model, state, str(folder))
    _rebuild_buffers(model)
    model.eval().requires_grad_(False)
    model.to(device)
    # the LM and text encoder run in the chosen precision; the codec stays float32 (cheap, and its LSTM
    # and residual sums are where half precision audibly hurts)
    model.lm.to(torch_dtype)
    model.text_encoder.to(torch_dtype)
    if model.text_proj is not None:
        model.text_proj.to(torch_dtype)
    return model


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose float32, bfloat16 or float16")
    return DTYPES[dtype]


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
