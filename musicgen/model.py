"""The `MusicGen` model object: text -> codes -> audio.

    model = musicgen.load("facebook/musicgen-small")
    audio = model.generate(["lofi beat"], duration=8.0)        # (B, channels, samples) at model.sample_rate

Every mode of the original goes through one path: its inputs become a `Request` (the delayed grid with
the known codes laid out, the conditions of every decoding row, sampling parameters, a generator), which
the decoding engine (musicgen/engine.py) fills in: text, melody (chroma prefix, melody checkpoints),
continuation (`prompt_audio`: its codes are the known prefix of the grid), unconditional (`prompts=None`),
stereo (8 interleaved codebooks) and long-form (duration beyond the window, 30 s for the published models:
windows slid by `extend_stride`,
musicgen/longform.py). `stream` runs the same loop and decodes audio as frames complete.
"""
from __future__ import annotations

import math
import numbers
import sys
from typing import Sequence

import torch
import torch.nn as nn

from . import chroma as chroma_mod
from . import conditions
from . import lm as lm_mod
from .audio import convert_channels, resample
from .codec import EnCodec
from .config import MusicGenConfig
from .delay import build_pattern, codebook_delays
from .engine import Engine, Reference, Request
from .inputs import check_batch, check_seed, per_row, rate, rows_of
from .lm import MusicLM
from .longform import generate_long, window_plan
from .precision import Precision
from .sampling import SamplingParams
from .t5 import T5Encoder
from .tokenizer import TextTokenizer

EXTEND_STRIDE = 18.0  # seconds the window advances in long-form generation (audiocraft's extend_stride)


class MusicGen(nn.Module):
    # set by `load`: how the model stores and computes, and what runs its decoding steps (musicgen/accel)
    precision = Precision("float32", torch.float32, torch.float32, torch.float32)
    backend = Reference()

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
        # melody checkpoints project 12 chroma bins to the LM width (transformers' audio_enc_to_dec_proj)
        self.chroma_proj = None
        if cfg.melody is not None and cfg.melody.num_chroma != cfg.lm.dim:
            self.chroma_proj = nn.Linear(cfg.melody.num_chroma, cfg.lm.dim)

    def __getstate__(self):
        """Copies and pickles leave the backend out (a native decoder holds this model's tensors) and choose
        their own."""
        state = self.__dict__.copy()
        backend = state.pop("backend", None)
        state["_backend_choice"] = getattr(backend, "choice", None)
        return state

    def __setstate__(self, state):
        choice = state.pop("_backend_choice", None)
        super().__setstate__(state)
        if choice is not None:
            from .accel import choose_backend

            self.backend = choose_backend(self.lm, self.device, *choice)
            self.backend.choice = choice

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
    def supports_melody(self) -> bool:
        return self.cfg.melody is not None

    @property
    def device(self) -> torch.device:
        return self.lm.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.norm.weight.dtype

    # -- text -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, prompts: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (states (B, S, C), mask (B, S)); padded positions are zeroed as in transformers. A prompt
        that is None or "" is the null condition: its mask is all zeros (audiocraft's T5Conditioner)."""
        if self.tokenizer is None:
            raise RuntimeError("this model was built without a tokenizer; load it from a checkpoint folder")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("give at least one prompt")
        ids, mask = self.tokenizer(["" if p is None else p for p in prompts])
        empty = torch.tensor([not p for p in prompts])
        ids, mask = ids.to(self.device), mask.masked_fill(empty[:, None], 0).to(self.device)
        with lm_mod.attention_backends(self.device):                           # a new text length per request
            states = self.text_encoder(ids, mask)                              # (B, S, d_model)
        if self.text_proj is not None:
            states = self.text_proj(states)                                    # (B, S, dim)
        return states * mask[..., None].to(states.dtype), mask

    # -- codec ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, channels, samples) at model.sample_rate -> codes (B, K, frames); stereo codebooks interleaved."""
        audio = torch.as_tensor(audio)
        if not audio.is_floating_point():
            raise ValueError(f"audio must hold float samples (in [-1, 1]), got {audio.dtype}")
        if audio.dim() != 3:
            raise ValueError(f"audio must be (batch, channels, samples), got shape {tuple(audio.shape)}")
        if audio.shape[1] != self.audio_channels:
            raise ValueError(f"this model takes {self.audio_channels}-channel audio, got {audio.shape[1]} channels")
        if audio.shape[-1] == 0:
            return torch.zeros(audio.shape[0], self.cfg.lm.num_codebooks, 0, dtype=torch.long, device=self.device)
        audio = audio.to(self.codec_device, torch.float32)
        if self.audio_channels == 1:
            return self.codec.encode(audio)
        left, right = self.codec.encode(audio[:, :1]), self.codec.encode(audio[:, 1:])
        return torch.stack([left, right], dim=2).flatten(1, 2)                 # L0 R0 L1 R1 ...

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, K, frames) -> float32 audio (B, channels, frames * hop)."""
        codes = self._check_codes(codes, "codes")
        if codes.shape[-1] == 0:
            return torch.zeros(codes.shape[0], self.audio_channels, 0, device=self.codec_device)
        codes = codes.to(self.codec_device)
        if self.audio_channels == 1:
            return self.codec.decode(codes)
        # both channels in one batch: the codec's LSTM reads its weights once a step for all rows
        B = codes.shape[0]
        audio = self.codec.decode(torch.cat([codes[:, 0::2], codes[:, 1::2]], dim=0))
        return torch.cat([audio[:B], audio[B:]], dim=1)

    def _check_codes(self, codes, what: str) -> torch.Tensor:
        """Codes as the codec and the LM take them: an integer tensor (B, K, frames) in [0, codebook_size)."""
        codes = torch.as_tensor(codes)
        K, size = self.cfg.lm.num_codebooks, self.cfg.codec.codebook_size
        if codes.dim() != 3 or codes.shape[1] != K:
            raise ValueError(f"{what} must be (batch, {K}, frames), got shape {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"{what} must be integers, got {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= size):
            raise ValueError(f"{what} must lie in [0, {size})")
        return codes

    @property
    def codec_device(self) -> torch.device:
        return next(self.codec.parameters()).device

    # -- generation -------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | str | None = None, duration: float = 8.0, *,
                 progress: bool = False, **options) -> torch.Tensor:
        """Prompts (or None) -> float32 audio (B, channels, samples) at model.sample_rate; the options are
        those of `generate_codes`. With `prompt_audio` the output starts with the prompt (re-synthesised)."""
        return self.decode(self.generate_codes(prompts, duration, progress=progress, **options))

    @torch.inference_mode()
    def generate_codes(self, prompts: Sequence[str] | str | None = None, duration: float = 8.0, *,
                       melody=None, melody_sample_rate: int | None = None, prompt_audio=None,
                       prompt_sample_rate: int | None = None, batch_size: int | None = None, demucs: bool = True,
                       extend_stride: float = EXTEND_STRIDE, top_k: int = 250, top_p: float = 0.0,
                       temperature: float = 1.0, guidance_scale: float = 3.0, seed: int | None = None,
                       progress: bool = False) -> torch.Tensor:
        """Conditions -> codes (B, K, frames), frames = int(duration * frame_rate) as in audiocraft, `duration` the
        total length.

        prompts        text per row; None for no text (unconditional, or melody / continuation alone); a row
                       whose prompt is None or "" has no text (the null condition, as in audiocraft)
        melody         melody checkpoints: (channels, samples) for every row, or one per row as a list (None:
                       that row has no melody) or a (B, channels, samples) tensor, at `melody_sample_rate`
                       (default model.sample_rate); drums and bass are removed with Demucs first when installed
                       and `demucs` is True
        prompt_audio   continuation: audio the output starts with, same layouts, at `prompt_sample_rate`
        batch_size     rows when nothing else fixes it (unconditional generation)
        duration       beyond the window (cfg.max_duration, 30 s for the published models) the window slides by
                       `extend_stride` seconds, re-conditioned each time
        top_k, top_p, temperature, guidance_scale, seed: sampling (musicgen/sampling.py)
        """
        job = self._inputs(prompts, duration, melody, melody_sample_rate, prompt_audio, prompt_sample_rate,
                           batch_size, demucs, top_k, top_p, temperature, guidance_scale, seed)
        frames, known, melodies = job["frames"], job["known"], job["melodies"]
        window_frames = self.window_frames
        stride = int(extend_stride * self.frame_rate) if isinstance(extend_stride, numbers.Real) else 0
        if frames > window_frames and not 0 < stride < window_frames:
            raise ValueError(f"extend_stride must be in (0, {self.cfg.max_duration:g}) seconds, at least one frame "
                             f"and less than the window, got {extend_stride!r}")
        # one progress bar over every window: a window of n frames after a prompt of p takes n + D - p steps
        # (one, where the prompt fills it: Engine.admit)
        delay = max(codebook_delays(self.cfg.lm.num_codebooks, self.audio_channels))
        plan = window_plan(known.shape[2], frames, window_frames, stride)
        bar = _progress(sum(n + delay - p if p < n else 1 for _, n, p in plan), progress)

        def window(known_codes: torch.Tensor, window_frames: int, window_melodies) -> torch.Tensor:
            if job["separate"] and window_melodies is not None:   # long-form: Demucs on each window's melody
                window_melodies = [None if m is None else chroma_mod.separate(m) for m in window_melodies]
            req = self._request(job, known_codes, window_frames, window_melodies)
            for _ in self.decode_steps(req, bar=bar):
                pass
            return req.codes

        try:
            if frames <= window_frames:
                return window(known, frames, melodies)
            return generate_long(window, known, frames, window_frames, stride,
                                 melodies, chroma_mod.CHROMA_SAMPLE_RATE / self.frame_rate,
                                 int(self.cfg.max_duration * chroma_mod.CHROMA_SAMPLE_RATE))
        finally:
            bar.close()

    def stream(self, prompts: Sequence[str] | str | None = None, duration: float = 8.0, chunk_seconds: float = 1.0,
               **options):
        """Yield float32 audio (B, channels, samples) while it is generated, about `chunk_seconds` at a time;
        joined, it equals `generate` with the same arguments up to float rounding (see musicgen.streaming).
        A stream covers one window (cfg.max_duration): the options are generate_codes' except extend_stride and
        progress."""
        from .streaming import stream

        for name in ("extend_stride", "progress"):
            if name in options:
                raise ValueError(f"stream() takes no {name}: it covers one {self.cfg.max_duration:g} s window and "
                                 f"reports its progress by yielding")
        return stream(self, prompts, duration, chunk_seconds, **options)

    @torch.inference_mode()
    def new_request(self, prompts: Sequence[str] | str | None = None, duration: float = 8.0, *, melody=None,
                    melody_sample_rate: int | None = None, prompt_audio=None, prompt_sample_rate: int | None = None,
                    batch_size: int | None = None, demucs: bool = True, top_k: int = 250, top_p: float = 0.0,
                    temperature: float = 1.0, guidance_scale: float = 3.0, seed: int | None = None,
                    prompt_codes: torch.Tensor | None = None, melodies: list | None = None) -> Request:
        """The decoding engine's `Request` for one window (cfg.max_duration) with generate_codes' inputs.
        prompt_codes (B, K, P) and melodies (mono 32 kHz waves, already separated) stand for prompt_audio and
        melody when the caller has them ready (the service encodes its uploads as they arrive)."""
        job = self._inputs(prompts, duration, melody, melody_sample_rate, prompt_audio, prompt_sample_rate,
                           batch_size, demucs, top_k, top_p, temperature, guidance_scale, seed, prompt_codes,
                           melodies)
        if job["frames"] > self.window_frames:
            raise ValueError(f"a request covers one {self.cfg.max_duration:g} s window; ask for at most "
                             f"{self.cfg.max_duration:g} s, or use generate() for long-form")
        return self._request(job, job["known"], job["frames"], job["melodies"])

    def decode_steps(self, req: Request, progress: bool = False, bar=None):
        """Decode `req` alone on an engine of its own, yielding after each step (streaming reads its grid).
        progress: a bar of its own; bar: a tqdm bar to advance instead (a long-form generation's)."""
        L = req.seq.shape[-1]
        S = 0 if req.cond.cross_bias is None else req.cond.cross_bias.shape[-1]
        engine = Engine(self, req.rows, req.offset + L, S)
        engine.admit(req)
        own = bar is None
        if own:
            bar = _progress(L - 1 - req.pos, progress)
        try:
            while not req.finished:
                engine.step()
                bar.update(1)
                yield req.pos
        finally:
            if own:
                bar.close()

    @property
    def window_frames(self) -> int:
        """Frames of one generation window: int(max_duration * frame_rate), as audiocraft's max_gen_len."""
        return int(self.cfg.max_duration * self.frame_rate)

    def frames_for(self, duration: float) -> int:
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0:
            raise ValueError(f"duration must be a positive number of seconds, got {duration!r}")
        if duration == float("inf"):
            raise ValueError("duration must be finite")
        frames = int(duration * self.frame_rate)   # rounded down, as audiocraft's total_gen_len
        if frames < 1:
            raise ValueError(f"duration must be at least one frame ({1 / self.frame_rate:g} s), got {duration!r}")
        return frames

    # -- a generation's inputs --------------------------------------------------------------------------
    def _inputs(self, prompts, duration, melody, melody_sample_rate, prompt_audio, prompt_sample_rate, batch_size,
                demucs, top_k, top_p, temperature, guidance_scale, seed, prompt_codes=None, melodies=None) -> dict:
        """Check and encode every input of a generation: text states, known codes, melodies, sampling."""
        params = SamplingParams(top_k=top_k, top_p=top_p, temperature=temperature, guidance_scale=guidance_scale)
        params.validate()
        frames = self.frames_for(duration)
        seed = check_seed(seed)
        if prompt_codes is not None:
            self._check_codes(prompt_codes, "prompt_codes")
        prompts, B = check_batch(prompts, batch_size, [rows_of(melody, "melody"), rows_of(prompt_audio, "prompt_audio"),
                                                       None if prompt_codes is None else prompt_codes.shape[0],
                                                       None if melodies is None else len(melodies)])
        # a prompt may fill the duration, and at most one window (audiocraft refuses longer ones too)
        limit = min(frames, self.window_frames)
        known = (prompt_codes.to(self.device) if prompt_codes is not None
                 else self._prompt_codes(prompt_audio, prompt_sample_rate, B, limit))  # (B, K, P)
        if known.shape[2] > limit:
            raise _long_prompt(known.shape[2], limit, self.frame_rate)
        # Demucs runs on the whole melody of a one-window request, and (as audiocraft's long-form does) on the
        # melody under each window of a longer one
        separate_later = demucs and frames > self.window_frames
        if melodies is None:
            melodies = self._melodies(melody, melody_sample_rate, B, demucs and not separate_later)
        elif not self.supports_melody:
            raise ValueError("melody conditioning needs a melody checkpoint")
        if prompts is not None and not any(prompts):   # no row has text: as prompts=None
            prompts = None
        if prompts is None and melodies is None:   # both rows of a guided pair would be alike: skip guidance
            params = SamplingParams(top_k=top_k, top_p=top_p, temperature=temperature, guidance_scale=1.0)
        states, mask = (self.encode_text(prompts) if prompts is not None
                        else conditions.null_text(B, self.cfg.lm.dim, self.device, self.dtype))
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        return dict(frames=frames, known=known, melodies=melodies, params=params, states=states, mask=mask,
                    separate=separate_later and melody is not None,
                    generator=generator)

    def _request(self, job: dict, known: torch.Tensor, frames: int, melodies) -> Request:
        """One window's Request: its grid (the known codes laid out) and the conditions of its rows."""
        params, states, mask = job["params"], job["states"], job["mask"]
        if self.cfg.lm.prefix_conditioning:
            chroma = self.melody_chroma(melodies, states.shape[0])
            null = chroma_mod.null_chroma(states.shape[0], self.cfg.melody, self.device)
            cond = conditions.prefix(self.chroma_proj, states.to(self.dtype), chroma, null, params.uses_cfg)
        else:
            cond = conditions.cross_attention(self.lm, states, mask, params.uses_cfg)
        seq = build_pattern(known, frames, self.cfg.lm.special_token, self.audio_channels)   # (B, K, L)
        return Request(seq, cond, params, job["generator"], frames=frames, channels=self.audio_channels)

    def _prompt_codes(self, audio, sample_rate: int | None, batch: int, limit: int) -> torch.Tensor:
        """Continuation prompt -> its codes (B, K, P); P = 0 without a prompt. One longer than `limit` frames
        is refused before it is resampled and encoded (a wrong sample rate can make it hours long)."""
        K = self.cfg.lm.num_codebooks
        if audio is None:
            return torch.zeros(batch, K, 0, dtype=torch.long, device=self.device)
        waves = per_row(audio, batch, "prompt_audio")
        sr = self.sample_rate if sample_rate is None else rate(sample_rate, "prompt_sample_rate")
        seconds = max(w.shape[-1] for w in waves) / sr
        if seconds * self.frame_rate > limit + 1:
            raise _long_prompt(math.ceil(seconds * self.frame_rate), limit, self.frame_rate)
        # like audiocraft's convert_audio: down-mix or duplicate channels, resample to the codec rate
        waves = [resample(convert_channels(w, self.audio_channels), sr, self.sample_rate) for w in waves]
        length = min(w.shape[-1] for w in waves)
        if length == 0:
            raise ValueError("prompt_audio is empty (0 samples)")
        if any(w.shape[-1] != length for w in waves):
            raise ValueError("prompt_audio rows have different lengths; trim them to one length")
        return self.encode(torch.stack(waves)).to(self.device)                 # (B, K, P)

    def _melodies(self, melody, sample_rate: int | None, batch: int, demucs: bool) -> list[torch.Tensor] | None:
        if melody is None:
            return None
        if not self.supports_melody:
            raise ValueError(f"model {self.cfg.name!r} has no melody conditioning; use a melody checkpoint such as "
                             f"facebook/musicgen-melody")
        sr = self.sample_rate if sample_rate is None else rate(sample_rate, "melody_sample_rate")
        rows = per_row(melody, batch, "melody", allow_none=True)
        if all(w is None for w in rows):
            return None
        return [None if w is None else chroma_mod.prepare_melody(w, sr, demucs) for w in rows]

    def melody_chroma(self, melodies: list[torch.Tensor | None] | None, batch: int) -> torch.Tensor:
        """Mono 32 kHz melodies (or None, for all rows or one) -> chroma (B, chroma_length, 12) as the LM sees
        it; a row without a melody gets the null chroma, as guidance's unconditional rows."""
        mc = self.cfg.melody
        if melodies is None:
            return chroma_mod.null_chroma(batch, mc, self.device)
        out = [chroma_mod.null_chroma(1, mc, self.device) if w is None else
               chroma_mod.fit_length(chroma_mod.chromagram(w[None].to(self.device), mc), mc.chroma_length)
               for w in melodies]
        return torch.cat(out)


def _long_prompt(frames: int, limit: int, frame_rate: int) -> ValueError:
    """A prompt of `frames` codec frames where at most `limit` fit (the frames to generate, at most a window)."""
    return ValueError(f"the audio prompt is {frames} frames ({frames / frame_rate:g} s): longer than the "
                      f"{limit} frames ({limit / frame_rate:g} s) to generate in one window")


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="step", desc="decoding", file=sys.stderr, disable=not enabled, leave=False,
                dynamic_ncols=True)
