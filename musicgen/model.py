"""`musicgen.load(...)` and the `MusicGen` model object: text -> codes -> audio.

    model = musicgen.load("facebook/musicgen-small")
    audio = model.generate(["lofi beat"], duration=8.0)        # (B, channels, samples) at model.sample_rate

Generation is split the gpt-fast way: text states and cross-attention keys/values once, a prefill over the
known prefix of the delayed grid, then one cached step per position.

Every mode of the original goes through `generate_codes`: text, melody (chroma prefix, melody checkpoints),
continuation (`prompt_audio`: its codes are the known prefix of the grid), unconditional (`prompts=None`),
stereo (8 interleaved codebooks) and long-form (duration beyond 30 s: windows slid by `extend_stride`).
"""
from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from . import audiocraft_format
from . import checkpoint as ckpt
from . import chroma as chroma_mod
from . import conditions
from .accel import fused
from . import lm as lm_mod
from .audio import convert_channels, resample
from .codec import EnCodec
from .config import MusicGenConfig
from .delay import build_pattern, revert_pattern
from .longform import generate_long
from .lm import MusicLM, sinusoids
from .accel.kernels import int8_gemv
from .accel.quant import Int8Linear, quantize_int4, quantize_int8, use_skinny_linear
from .sampling import SamplingParams, apply_cfg, sample
from .t5 import T5Encoder
from .tokenizer import TextTokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
MAX_DURATION = 30.0   # seconds: the context MusicGen was trained on; longer runs slide a window over it
EXTEND_STRIDE = 18.0  # seconds the window advances in long-form generation (audiocraft's extend_stride)


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
        # melody checkpoints project 12 chroma bins to the LM width (transformers' audio_enc_to_dec_proj)
        self.chroma_proj = None
        if cfg.melody is not None and cfg.melody.num_chroma != cfg.lm.dim:
            self.chroma_proj = nn.Linear(cfg.melody.num_chroma, cfg.lm.dim)

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
    def encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (states (B, S, C), mask (B, S)); padded positions are zeroed as in transformers."""
        if self.tokenizer is None:
            raise RuntimeError("this model was built without a tokenizer; load it from a checkpoint folder")
        ids, mask = self.tokenizer(list(prompts))
        ids, mask = ids.to(self.device), mask.to(self.device)
        with lm_mod.attention_backends(self.device):                           # a new text length per request
            states = self.text_encoder(ids, mask)                              # (B, S, d_model)
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
        # both channels in one batch: the codec's LSTM reads its weights once a step for all rows
        B = codes.shape[0]
        audio = self.codec.decode(torch.cat([codes[:, 0::2], codes[:, 1::2]], dim=0))
        return torch.cat([audio[:B], audio[B:]], dim=1)

    @property
    def codec_device(self) -> torch.device:
        return next(self.codec.parameters()).device

    # -- generation -------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | str | None = None, duration: float = 8.0, *,
                 melody=None, melody_sample_rate: int | None = None, prompt_audio=None,
                 prompt_sample_rate: int | None = None, batch_size: int | None = None, demucs: bool = True,
                 extend_stride: float = EXTEND_STRIDE, top_k: int = 250, top_p: float = 0.0,
                 temperature: float = 1.0, guidance_scale: float = 3.0, seed: int | None = None,
                 progress: bool = False) -> torch.Tensor:
        """Prompts (or None) -> float32 audio (B, channels, samples) at model.sample_rate; see generate_codes.
        With `prompt_audio` the output starts with the prompt (re-synthesised by the codec)."""
        codes = self.generate_codes(prompts, duration, melody=melody, melody_sample_rate=melody_sample_rate,
                                    prompt_audio=prompt_audio, prompt_sample_rate=prompt_sample_rate,
                                    batch_size=batch_size, demucs=demucs, extend_stride=extend_stride, top_k=top_k,
                                    top_p=top_p, temperature=temperature, guidance_scale=guidance_scale, seed=seed,
                                    progress=progress)
        return self.decode(codes)

    @torch.inference_mode()
    def generate_codes(self, prompts: Sequence[str] | str | None = None, duration: float = 8.0, *,
                       melody=None, melody_sample_rate: int | None = None, prompt_audio=None,
                       prompt_sample_rate: int | None = None, batch_size: int | None = None, demucs: bool = True,
                       extend_stride: float = EXTEND_STRIDE, top_k: int = 250, top_p: float = 0.0,
                       temperature: float = 1.0, guidance_scale: float = 3.0, seed: int | None = None,
                       progress: bool = False) -> torch.Tensor:
        """Conditions -> codes (B, K, frames), frames = round(duration * frame_rate), `duration` the total length.

        prompts        text per row; None for no text (unconditional, or melody / continuation alone)
        melody         melody checkpoints: (channels, samples) for every row, or one per row as a list or a
                       (B, channels, samples) tensor, at `melody_sample_rate` (default model.sample_rate);
                       drums and bass are removed with Demucs first when installed and `demucs` is True
        prompt_audio   continuation: audio the output starts with, same layouts, at `prompt_sample_rate`
        batch_size     rows when nothing else fixes it (unconditional generation)
        duration       beyond 30 s the 30 s window slides by `extend_stride` seconds, re-conditioned each time
        """
        frames, known, melodies, params, states, mask, generator = self._prepare(
            prompts, duration, melody, melody_sample_rate, prompt_audio, prompt_sample_rate, batch_size, demucs,
            top_k, top_p, temperature, guidance_scale, seed)

        def window(known_codes: torch.Tensor, window_frames: int, window_melodies) -> torch.Tensor:
            cond = self._conditions(states, mask, window_melodies, params.uses_cfg)
            seq = build_pattern(known_codes, window_frames, self.cfg.lm.special_token, self.audio_channels)
            seq = self._decode_grid(seq, cond, params, generator, progress)
            return revert_pattern(seq, window_frames, self.audio_channels)

        window_frames = round(MAX_DURATION * self.frame_rate)
        if frames <= window_frames:
            return window(known, frames, melodies)
        if not 0 < extend_stride < MAX_DURATION:
            raise ValueError(f"extend_stride must be in (0, {MAX_DURATION:g}) seconds, got {extend_stride!r}")
        return generate_long(window, known, frames, window_frames, round(extend_stride * self.frame_rate),
                             melodies, chroma_mod.CHROMA_SAMPLE_RATE / self.frame_rate,
                             round(MAX_DURATION * chroma_mod.CHROMA_SAMPLE_RATE))

    def _prepare(self, prompts, duration, melody, melody_sample_rate, prompt_audio, prompt_sample_rate, batch_size,
                 demucs, top_k, top_p, temperature, guidance_scale, seed):
        """Check and encode every input of a generation (shared by generate_codes and stream)."""
        params = SamplingParams(top_k=top_k, top_p=top_p, temperature=temperature, guidance_scale=guidance_scale)
        params.validate()
        frames = self.frames_for(duration)
        prompts, B = _batch(prompts, batch_size, [_rows(melody), _rows(prompt_audio)])
        known = self._prompt_codes(prompt_audio, prompt_sample_rate, B)       # (B, K, P)
        if known.shape[2] > frames:
            raise ValueError(f"the audio prompt ({known.shape[2] / self.frame_rate:g} s) is longer than the "
                             f"duration to generate ({duration:g} s)")
        melodies = self._melodies(melody, melody_sample_rate, B, demucs)     # B mono 32 kHz waves, or None
        if prompts is None and melodies is None:
            params = SamplingParams(top_k=top_k, top_p=top_p, temperature=temperature, guidance_scale=1.0)
        states, mask = (self.encode_text(prompts) if prompts is not None
                        else conditions.null_text(B, self.cfg.lm.dim, self.device, self.dtype))
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))

        return frames, known, melodies, params, states, mask, generator

    def stream(self, prompts: Sequence[str] | str | None = None, duration: float = 8.0, chunk_seconds: float = 1.0,
               **kwargs):
        """Yield float32 audio (B, channels, samples) while it is generated, about `chunk_seconds` at a time;
        joined, it equals `generate` with the same arguments up to float rounding (see musicgen.streaming)."""
        from .streaming import stream
        return stream(self, prompts, duration, chunk_seconds, **kwargs)

    def frames_for(self, duration: float) -> int:
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0:
            raise ValueError(f"duration must be a positive number of seconds, got {duration!r}")
        if duration == float("inf"):
            raise ValueError("duration must be finite")
        return max(1, round(duration * self.frame_rate))

    # -- conditioning inputs ----------------------------------------------------------------------------
    def _prompt_codes(self, audio, sample_rate: int | None, batch: int) -> torch.Tensor:
        """Continuation prompt -> its codes (B, K, P); P = 0 without a prompt."""
        K = self.cfg.lm.num_codebooks
        if audio is None:
            return torch.zeros(batch, K, 0, dtype=torch.long, device=self.device)
        waves = _per_row(audio, batch, "prompt_audio")
        sr = self.sample_rate if sample_rate is None else _rate(sample_rate, "prompt_sample_rate")
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
        sr = self.sample_rate if sample_rate is None else _rate(sample_rate, "melody_sample_rate")
        return [chroma_mod.prepare_melody(w, sr, demucs) for w in _per_row(melody, batch, "melody")]

    def melody_chroma(self, melodies: list[torch.Tensor] | None, batch: int) -> torch.Tensor:
        """Mono 32 kHz melodies (or None) -> chroma (B, chroma_length, 12) as the LM sees it."""
        mc = self.cfg.melody
        if melodies is None:
            return chroma_mod.null_chroma(batch, mc, self.device)
        out = [chroma_mod.fit_length(chroma_mod.chromagram(w[None].to(self.device), mc), mc.chroma_length)
               for w in melodies]
        return torch.cat(out)

    def _conditions(self, states, mask, melodies, cfg_rows: bool) -> conditions.Conditions:
        B = states.shape[0]
        if not self.cfg.lm.prefix_conditioning:
            if self._static_steps:   # static shapes: pad the text to a bucket (padding is masked: exact)
                states, mask = _pad_text(states, mask, bucket=32)
            return conditions.cross_attention(self.lm, states, mask, cfg_rows)
        chroma = self.melody_chroma(melodies, B)
        null = chroma_mod.null_chroma(B, self.cfg.melody, self.device)
        return conditions.prefix(self.chroma_proj, states.to(self.dtype), chroma, null, cfg_rows)

    # -- decoding -----------------------------------------------------------------------------------------
    def _decode_grid(self, seq: torch.Tensor, cond: conditions.Conditions, params: SamplingParams,
                     generator: torch.Generator | None, progress: bool) -> torch.Tensor:
        """Fill every -1 of the delayed grid (B, K, L), left to right, with sampled codes."""
        seq = seq.clone()
        for _ in self._decode_steps(seq, cond, params, generator, progress):
            pass
        return seq

    def _decode_steps(self, seq: torch.Tensor, cond: conditions.Conditions, params: SamplingParams,
                      generator: torch.Generator | None, progress: bool = False):
        """The decoding loop: fills the -1 entries of `seq` (B, K, L) in place and yields each position once it
        is sampled (streaming reads the grid between steps)."""
        B, K, L = seq.shape
        rows = 2 * B if params.uses_cfg else B
        P = cond.prefix_length                                                 # prepended condition tokens
        compiled = self._compiled_step is not None
        graphs = None if compiled else self._graphs   # compile() takes precedence
        static = self._static_steps
        # static shapes (compile, CUDA graphs): caches over every position, reused across generations of one
        # batch size
        caches = (self._static_caches(rows) if static
                  else self.lm.new_caches(rows, P + L, dtype=self.kv_dtype or self.cache_dtype,
                                          attend_dtype=self.cache_dtype or self.dtype))
        kv, bias = cond.cross_kv, cond.cross_bias
        if self.cache_dtype is not None and not static and kv is not None:   # text keys/values alike
            kv = [(k.to(self.cache_dtype), v.to(self.cache_dtype)) for k, v in kv]
            # saturate: float32's lowest rounds to -inf in bfloat16, and a row masked everywhere must stay finite
            bias = None if bias is None else bias.clamp(min=torch.finfo(self.cache_dtype).min).to(self.cache_dtype)
        open_ = (seq == -1).any(dim=1).any(dim=0)                              # (L,) positions with work left
        start = int(open_.nonzero()[0]) if open_.any() else L                  # first position to generate
        step_inputs = lambda x: torch.cat([x, x], dim=0) if params.uses_cfg else x  # noqa: E731
        bar = _progress(L - start, progress)
        attention = functools.partial(lm_mod.attention_backends, self.device)   # CUDA: shapes change per step
        with attention():   # prefill
            logits = self.lm(step_inputs(seq[:, :, :start]), kv, bias, 0, caches, prefix=cond.prefix)[:, :, -1]
        if static:   # the static step's position (a tensor) and its self-attention mask, updated in place
            pos_t = torch.tensor([P + start], device=self.device)
            window_mask = self._window_mask(caches, P + start)
            if graphs is not None:
                graphs.start(caches, kv, bias)
        for pos in range(start, L):
            if params.uses_cfg:
                logits = apply_cfg(logits.float(), params.guidance_scale)      # (B, K, V)
            token = sample(logits, params, generator)                          # (B, K)
            seq[:, :, pos] = torch.where(seq[:, :, pos] == -1, token, seq[:, :, pos])
            bar.update(1)
            yield pos
            if pos + 1 < L:
                step = step_inputs(seq[:, :, pos:pos + 1])                     # (rows, K, 1)
                if static:
                    pos_t.fill_(P + pos)
                    window_mask[..., P + pos] = 0                             # this step's key is visible
                    window = window_mask[..., :lm_mod.window(P + pos + 1, window_mask.shape[-1])]
                    if compiled:
                        with attention(compiled=True):
                            logits = self._run_compiled(step, pos_t, kv, bias, caches, window)
                    else:   # graphs record eager kernels: eager attention's backends
                        with attention():
                            logits = graphs(step, pos_t, window)
                else:
                    with attention():
                        logits = self.lm(step, kv, bias, P + pos, caches)[:, :, -1]
        bar.close()
        return seq

    # -- compiled decoding ------------------------------------------------------------------------------
    _compiled_step = None
    _compile_mode = None
    _graphs = None   # graphs.StepGraphs: CUDA graphs of the eager step (cuda_graphs)
    # dtype of the text keys/values and the decoding KV cache when it differs from the LM's (None: the LM's).
    # load(quantize="int4" or "int8") on CPU sets bfloat16: attention reads the whole cache every step, and at
    # 30 s of float32 that is as much memory traffic as the 4-bit weights. Its rounding moves the logits by
    # about 3e-4 of their spread, against the 0.026 (int8) and 0.05 (int4) of the weights. Eager decoding only.
    cache_dtype = None
    # dtype of the self-attention cache when it differs from cache_dtype. load(quantize=...) or a 16-bit dtype on
    # CPU, where the fused decoder runs the steps, sets torch.int8: each key and value vector as int8 codes with
    # a float32 scale (lm.kv_quantize), half the bytes of a 16-bit cache; the logits move by about as little
    # again (bfloat16's mean error 0.00331 -> 0.00331 of their spread, float16's 0.00042 -> 0.00043).
    # MUSICGEN_KV_INT8=0 at load keeps the 16-bit cache. float32 keeps its exact float32 cache.
    kv_dtype = None

    def compile(self, mode: str | None = None, backend: str = "inductor", gemv: bool | None = None) -> "MusicGen":
        """Compile the one-token decoding step (static shapes; CUDA graphs with mode "reduce-overhead" on GPU).
        The first generation pays the compile time; later ones with the same batch size reuse it.

        gemv=True (default: MUSICGEN_COMPILE_GEMV=1): the step's products of a few rows (every linear layer
        and output head; with guidance, 2 rows a batch item) are traced as multiply-and-sum reductions
        (`lm.row_linear`) instead of matrix products, so that inductor writes them as kernels of its own
        (Triton on a GPU), tuned by coordinate descent (inductor's `coordinate_descent_tuning`, turned on
        with it). Inductor compiles one-row products this way itself when that tuning is on (its source
        says its matrix-vector products reach peak bandwidth only with it); MusicGen's guided steps have
        two rows, which it leaves to cuBLAS. Opt-in until a GPU has measured it on MusicGen's shapes; on
        CPU it is slower than the default compiled step (small float32: 6.0 against 14.1 steps/s).

        A model on CPU with a fused native decoder (musicgen/fused.py: every layer in one call; quantised and
        16-bit models, and float32 ones where our kernel reads float32 weights as fast as PyTorch) keeps it
        instead: a compiled graph of the same layers does not beat it (small int4 32.1 against 53.5 steps/s,
        int8 22.4 against 30.2, float32 15.0 against 15.6). It says so once; MUSICGEN_FUSED=0 at load compiles
        the layer loop."""
        if self.lm.fused is not None:
            print("musicgen: compile skipped: this model's fused CPU decoder is faster than a compiled "
                  "step (MUSICGEN_FUSED=0 at load to compile anyway)", file=sys.stderr)
            return self
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        if gemv is None:
            gemv = os.environ.get("MUSICGEN_COMPILE_GEMV", "") == "1"
        self.lm.row_products = gemv
        if gemv:
            lm_mod.prepare_row_products()
        how = dict(mode=mode)
        if gemv and backend == "inductor":   # the mode's own options, and tuning (torch.compile takes one or the other)
            from torch._inductor import list_mode_options

            how = dict(options={**list_mode_options(mode), "coordinate_descent_tuning": True})
        self._compiled_step = torch.compile(self.lm.step, backend=backend, fullgraph=True, dynamic=False, **how)
        self._compile_mode = mode
        self._caches = {}
        return self

    def cuda_graphs(self, enabled: bool = True, capture: bool = True) -> "MusicGen":
        """Decode with CUDA graphs of the eager step, recorded per window bucket by running the step twice,
        without torch.compile's first-generation compile (musicgen/graphs.py). Ignored after `compile()`, whose
        "reduce-overhead" mode records graphs of its own fused kernels. `capture=False` runs the same
        static-shape step without recording (any device: to compare, and for tests). MUSICGEN_CUDA_GRAPHS=1 at
        load turns it on for CUDA models."""
        if not enabled:
            self._graphs = None
            return self
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, not {self.device.type}")
        if self.lm.fused is not None:
            raise ValueError("this model decodes in its fused CPU decoder (MUSICGEN_FUSED=0 at load to use the "
                             "static step)")
        from .graphs import StepGraphs

        self._graphs = StepGraphs(self.lm, capture=capture)
        self._caches = {}
        return self

    @property
    def _static_steps(self) -> bool:
        """Whether decoding steps run with static shapes (compiled, or through CUDA graphs)."""
        return self._compiled_step is not None or self._graphs is not None

    def _window_mask(self, caches, filled: int) -> torch.Tensor:
        """(1, 1, 1, max_len) additive self-attention mask of the compiled step: 0 over the `filled` positions
        the prefill wrote, -inf after; each step opens its own position and reads a bucketed window of it."""
        k = caches[0].k
        mask = torch.full((1, 1, 1, k.shape[2]), float("-inf"), dtype=k.dtype, device=k.device)
        mask[..., :filled] = 0
        return mask

    def _run_compiled(self, step, pos_t, cross_kv, cross_bias, caches, window) -> torch.Tensor:
        torch._dynamo.mark_dynamic(window, 3)   # one graph for every window length (CUDA graphs: one per bucket)
        key = (step.shape[0], cross_kv[0][0].shape[2] if cross_kv is not None else 0)
        warmed = self.__dict__.setdefault("_warmed", set())
        if key in warmed:
            return self._compiled_step(step, pos_t, cross_kv, cross_bias, caches, window).clone()
        from torch._dynamo.utils import counters

        skips = counters["inductor"]["cudagraph_skips"]
        start = time.perf_counter()
        out = self._compiled_step(step, pos_t, cross_kv, cross_bias, caches, window).clone()
        warmed.add(key)
        print(f"musicgen: compiled the decoding step for {key[0]} rows in {time.perf_counter() - start:.1f} s "
              "(once per batch size)", file=sys.stderr)
        if self._compile_mode in _CUDA_GRAPH_MODES and counters["inductor"]["cudagraph_skips"] > skips:
            # inductor logs why only under TORCH_LOGS=cudagraphs; without graphs a GPU step is bound by launches
            print("musicgen: CUDA graphs are not used for the decoding step; it runs without them, more slowly "
                  "(TORCH_LOGS=cudagraphs says why)", file=sys.stderr)
        return out

    def _static_caches(self, rows: int):
        caches = getattr(self, "_caches", {})
        if rows not in caches:
            caches.clear()   # one batch size at a time: caches are the biggest allocation of a generation
            if self._graphs is not None:
                self._graphs.reset()   # its graphs hold the old caches
            caches[rows] = self.lm.new_caches(rows, self.lm.positions.shape[0])
        self._caches = caches
        return caches[rows]


_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")   # torch.compile modes that record CUDA graphs


def _pad_text(states: torch.Tensor, mask: torch.Tensor, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    S = states.shape[1]
    target = -(-S // bucket) * bucket
    if target == S:
        return states, mask
    pad = target - S
    return (torch.nn.functional.pad(states, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad)))


def _batch(prompts, batch_size: int | None, rows: list[int | None]) -> tuple[list[str] | None, int]:
    """Validate prompts and settle the batch size from prompts, batch_size, melody or prompt audio rows."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    sizes = {n for n in rows if n is not None}
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("give at least one prompt, or prompts=None for generation without text")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty")
        sizes.add(len(prompts))
    if batch_size is not None:
        sizes.add(batch_size)
    if len(sizes) > 1:
        raise ValueError(f"inconsistent batch: prompts, batch_size, melody and prompt_audio give {sorted(sizes)} rows")
    return prompts, (sizes.pop() if sizes else 1)


def _rows(audio) -> int | None:
    """Rows an audio argument fixes: a list's length or a 3-d tensor's batch; None for one shared signal."""
    if isinstance(audio, (list, tuple)):
        return len(audio)
    if isinstance(audio, torch.Tensor) and audio.dim() == 3:
        return audio.shape[0]
    return None


def _per_row(audio, batch: int, what: str) -> list[torch.Tensor]:
    """(samples,), (channels, samples) for every row, (B, channels, samples) or a list of rows -> B tensors."""
    if isinstance(audio, (list, tuple)):
        items = [torch.as_tensor(a, dtype=torch.float32) for a in audio]
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
        a = a.detach().float().cpu()
        a = a[None] if a.dim() == 1 else a
        if a.dim() != 2:
            raise ValueError(f"each {what} must be (channels, samples), got shape {tuple(a.shape)}")
        if a.shape[0] > 2:
            raise ValueError(f"{what} has {a.shape[0]} channels; expected mono or stereo (channels, samples)")
        if not torch.isfinite(a).all():
            raise ValueError(f"{what} holds NaN or infinite samples")
        out.append(a)
    if len(out) != batch:
        raise ValueError(f"{len(out)} {what} rows for a batch of {batch}")
    return out


def _rate(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer (Hz), got {value!r}")
    return value


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="step", desc="decoding", file=sys.stderr, disable=not enabled, leave=False,
                dynamic_ncols=True)


# -- loading ----------------------------------------------------------------------------------------------
QUANTIZE = (None, "int8", "int4")


def load(name_or_path: str | os.PathLike = "facebook/musicgen-small", device: str | torch.device = "cpu",
         dtype: str | torch.dtype = "float32", quantize: str | None = None, compile: bool = False) -> MusicGen:
    """Load a MusicGen checkpoint (hub id or local folder in the Hugging Face format).

    dtype: precision of the LM and text encoder ("float32" is the exact reference path; "bfloat16",
    "float16"). quantize="int8": weight-only int8 for every linear layer of the LM and text encoder, with
    activations in `dtype` (on CPU without our AVX2 kernel, bfloat16 for float32, as PyTorch's int8 kernel wants).
    quantize="int4": the LM's transformer layers in 4 bits (groups of 32 with a float16 scale; on x86 CPUs the
    decoding products also quantise activations to int8 per group), its output heads and the text encoder in
    int8: the fastest CPU mode, with the largest departure from float32 (see the README's Performance section).
    Both quantised modes on CPU keep the text keys/values in bfloat16 and, where the fused decoder runs the
    steps, the self-attention cache in int8 rows (MusicGen.kv_dtype; MUSICGEN_KV_INT8=0 keeps bfloat16);
    bfloat16 and float16 models keep that int8 cache too where the fused decoder runs their steps.
    compile=True: torch.compile the decoding step (CUDA graphs on GPU); the first generation pays for it.
    MUSICGEN_COMPILE_GEMV=1 with it: its few-row products as tuned reductions (`MusicGen.compile`, gemv).
    MUSICGEN_CUDA_GRAPHS=1 (CUDA, without compile): CUDA graphs of the eager step, no compile (`cuda_graphs`).
    """
    torch_dtype = _dtype(dtype)
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize {quantize!r}: choose None, 'int8' or 'int4'")
    device = torch.device(device)
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
    if quantize == "int8" and torch_dtype == torch.float32 and device.type == "cpu" and int8_gemv() is None:
        torch_dtype = torch.bfloat16   # without our kernel, PyTorch's fused int8 kernel wants bfloat16 activations
    # the LM and text encoder run in the chosen precision; the codec stays float32 (cheap, and its LSTM
    # and residual sums are where half precision audibly hurts)
    for part in (model.lm, model.text_encoder, model.text_proj, model.chroma_proj):
        if part is not None:
            part._apply(functools.partial(_convert, dtype=torch_dtype))   # part.to(dtype), releasing as it goes
    if quantize == "int4":   # the LM's layers in 4 bits; its output heads and the text encoder in 8
        quantize_int4(model.lm, torch_dtype, skip=("heads",))
    elif quantize == "int8":
        quantize_int8(model.lm, torch_dtype)
    if quantize is not None:
        quantize_int8(model.text_encoder, torch_dtype)
        if model.text_proj is not None:
            model.text_proj = Int8Linear.from_linear(model.text_proj, torch_dtype)
    if device.type == "cpu":   # faster few-row float32 products (decoding); other dtypes and shapes unchanged
        for part in (model.lm, model.text_encoder, model.text_proj, model.chroma_proj):
            if part is not None:
                use_skinny_linear(part)
    if quantize is not None and device.type == "cpu" and torch_dtype == torch.float32:
        model.cache_dtype = torch.bfloat16
    if device.type == "cpu":   # attach decides where the fused step applies (kernels built, dense_policy)
        fused.attach(model.lm)
        compact = quantize is not None or torch_dtype in (torch.bfloat16, torch.float16)   # not the exact path
        if compact and model.lm.fused is not None and os.environ.get("MUSICGEN_KV_INT8", "") != "0":
            model.kv_dtype = torch.int8
    if compile:
        model.compile()
    elif device.type == "cuda" and os.environ.get("MUSICGEN_CUDA_GRAPHS", "") == "1":
        model.cuda_graphs()
    return model


def _convert(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What Module.to(dtype) does to one tensor, and the original's pages released once copied
    (checkpoint.release: a float32 checkpoint loaded as bfloat16 then peaks near the bfloat16 model)."""
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    converted = tensor.to(dtype)
    ckpt.release(tensor)
    return converted


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
