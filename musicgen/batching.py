"""Continuous batching: one decoding loop shared by every request in flight.

    sched = Scheduler(model, max_batch=8)
    req = sched.submit(Request("lofi beat", frames=250, params=SamplingParams(), seed=0))
    threading.Thread(target=sched.run, daemon=True).start()
    req.done.wait(); req.codes                                        # (K, frames), as generate_codes gives

Each step runs one forward pass over all active requests, each at its own position of its own delayed grid.
Between steps (and only there) finished or cancelled requests leave and waiting ones join, up to
`max_batch`; a joining request starts at position 0 with the all-special start token, so there is no separate
prefill and nobody waits for anybody. Known codes (a continuation prompt) are fed one per step, as
`_decode_grid` would take them in its prefill.

Memory is gpt-fast's static cache, with slots: request i owns rows 2i (conditional) and 2i+1 (unconditional,
null text) of every cache; active requests always fill slots 0..n-1 (a leaving request's slot is refilled by
the last one), so a step works on the contiguous rows [0, 2n) without gathering. Self-attention writes each
row's key at that row's position and masks keys beyond it; cross-attention keys/values are padded to the
longest text in the cache and masked. Sampling is per request (its own parameters and torch.Generator), so a
request decoded here gets exactly the codes `model.generate_codes([prompt], ...)` gives it alone, whoever
shares its steps (tests/test_batching.py).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .delay import build_pattern, codebook_delays, revert_pattern
from . import lm as lm_mod
from .sampling import SamplingParams, sample_rows

GROW = 64   # cache length grows in steps of this many positions


@dataclass(eq=False)
class Request:
    prompt: str
    frames: int                                  # frames of audio to generate (prefix included)
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    prefix: torch.Tensor | None = None           # (K, P) known codes: a continuation prompt
    melody: torch.Tensor | None = None           # (samples,) mono melody at 32 kHz: melody checkpoints
    on_step: object = None                       # callable(request) after each of its steps (decoding thread)
    on_done: object = None                       # callable(request) when it leaves: done, cancelled or failed
    tag: dict = field(default_factory=dict)      # the caller's bookkeeping (the service's job id)
    # scheduler state, written by the decoding thread only
    seq: torch.Tensor | None = None              # (K, L) delayed grid; -1 where codes are still to come
    pos: int = 0                                 # next position of the grid fed to the LM
    offset: int = 0                              # LM positions taken by prepended condition tokens
    steps: int = 0                               # steps taken
    shared_steps: int = 0                        # steps taken together with at least one other request
    status: str = "queued"                       # queued, running, done, cancelled, failed
    error: str | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None

    @property
    def total_steps(self) -> int:
        return 0 if self.seq is None else self.seq.shape[-1] - 1

    @property
    def progress(self) -> float:
        return self.steps / self.total_steps if self.total_steps else 0.0

    @property
    def complete_frames(self) -> int:
        """Frames whose every codebook is sampled (frame f of the last codebook lands at f + delay + 1)."""
        if self.seq is None:
            return 0
        return max(0, min(self.frames, self.pos - max(codebook_delays(self.seq.shape[0], self._channels))))

    def codes_between(self, start: int, end: int) -> torch.Tensor:
        """Codes (K, end - start) of complete frames [start, end)."""
        delays = codebook_delays(self.seq.shape[0], self._channels)
        return torch.stack([self.seq[k, start + d + 1:end + d + 1] for k, d in enumerate(delays)])

    @property
    def codes(self) -> torch.Tensor:
        """(K, frames) once done."""
        return revert_pattern(self.seq[None], self.frames, self._channels)[0]

    _channels: int = 1


class Scheduler:
    def __init__(self, model, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.lm, self.max_batch = model, model.lm, max_batch
        self.K, self.special = model.cfg.lm.num_codebooks, model.cfg.lm.special_token
        self.pending: deque[Request] = deque()
        self.active: list[Request] = []          # active[i] owns cache rows 2i, 2i+1
        self.lock = threading.Condition()
        self.steps = 0                           # batched forward passes
        self.request_steps = 0                   # sum over requests of the steps they took part in
        self.busy_seconds = 0.0
        self.k: list[torch.Tensor] = []          # per layer (2 * max_batch, H, L, hd (+ 4: int8 rows))
        self.v: list[torch.Tensor] = []
        self.ck: list[torch.Tensor] = []         # per layer (2 * max_batch, H, S, hd) cross-attention keys
        self.cv: list[torch.Tensor] = []
        self.bias = None                         # (2 * max_batch, 1, 1, S) additive text mask
        # caches in the dtypes generate() decodes with (quantised on CPU: bfloat16 text keys/values, int8
        # self-attention rows), so codes match a solo request's
        self.cache_dtype = model.cache_dtype or model.lm.norm.weight.dtype
        self.kv_dtype = model.kv_dtype or self.cache_dtype   # the self-attention slots (int8 rows: lm.KVCache)
        self.length = self.text_length = 0
        self._stop = threading.Event()
        self._paused = False

    # -- requests -------------------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        limit = self.lm.positions.shape[0]
        L = req.frames + max(codebook_delays(self.K, self.model.audio_channels)) + 1
        if self.model.cfg.lm.prefix_conditioning:   # chroma frames and text come first
            L += self.model.cfg.melody.chroma_length + 1
        if req.melody is not None and not self.model.cfg.lm.prefix_conditioning:
            raise ValueError("melody conditioning needs a melody checkpoint")
        if L > limit:
            raise ValueError(f"{req.frames} frames need {L} positions; the model has {limit}")
        req.params.validate()
        with self.lock:
            self.pending.append(req)
            self.lock.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """A waiting request leaves now, a running one at the next step boundary."""
        with self.lock:
            req.cancelled = True
            if req in self.pending:
                self.pending.remove(req)
                _finish(req, "cancelled")
            self.lock.notify_all()

    @property
    def load(self) -> int:
        return len(self.pending) + len(self.active)

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> None:
        """Decode until stop(); sleeps while there is nothing to do."""
        while not self._stop.is_set():
            with self.lock:
                while (self._paused or not (self.pending or self.active)) and not self._stop.is_set():
                    self.lock.wait(0.5)
            if self._stop.is_set():
                break
            try:
                self.step()
            except Exception as e:  # e.g. out of memory: fail what was in flight, keep serving the rest
                with self.lock:
                    for req in list(self.active):
                        req.error = f"{type(e).__name__}: {e}"
                        self._release(req, "failed")

    def pause(self) -> None:
        """Hold the loop at the next step boundary (requests still queue); `resume()` lets it go on."""
        with self.lock:
            self._paused = True

    def resume(self) -> None:
        with self.lock:
            self._paused = False
            self.lock.notify_all()

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            self.lock.notify_all()

    @torch.inference_mode()
    def step(self) -> int:
        """One step boundary (release, admit) and one forward pass; returns how many requests took it."""
        t0 = time.perf_counter()
        with self.lock:
            for req in [r for r in self.active if r.cancelled]:
                self._release(req, "cancelled")
            while self.pending and len(self.active) < self.max_batch:
                req = self.pending.popleft()
                if req.cancelled:
                    _finish(req, "cancelled")
                    continue
                try:
                    self._admit(req)
                except Exception as e:  # a bad request must not take the loop down
                    req.error = f"{type(e).__name__}: {e}"
                    _finish(req, "failed")
        n = len(self.active)
        if n == 0:
            return 0
        tokens = torch.stack([r.seq[:, r.pos] for r in self.active])                     # (n, K)
        pos = torch.tensor([r.offset + r.pos for r in self.active], device=self.model.device)  # (n,)
        logits = self._forward(tokens.repeat_interleave(2, 0), pos.repeat_interleave(2, 0))  # (2n, K, V)
        cond, uncond = logits[0::2].float(), logits[1::2].float()                        # (n, K, V)
        groups: dict[SamplingParams, list[int]] = {}
        for i, req in enumerate(self.active):      # requests with equal parameters sample as one batch
            groups.setdefault(req.params, []).append(i)
        tokens = torch.empty(n, self.K, dtype=torch.long, device=logits.device)         # (n, K)
        for p, idx in groups.items():
            c, u = (cond, uncond) if len(idx) == n else (cond[idx], uncond[idx])
            guided = u + (c - u) * p.guidance_scale if p.uses_cfg else c                 # (g, K, V)
            tokens[idx] = sample_rows(guided, p, [self.active[i].generator for i in idx])
        for i, req in enumerate(list(self.active)):
            nxt = req.seq[:, req.pos + 1]
            req.seq[:, req.pos + 1] = torch.where(nxt == -1, tokens[i], nxt)
            req.pos += 1
            req.steps += 1
            req.shared_steps += n > 1
            if req.on_step is not None:
                req.on_step(req)
        self.steps += 1
        self.request_steps += n
        with self.lock:
            for req in [r for r in self.active if r.pos == r.seq.shape[-1] - 1]:
                self._release(req, "done")
        self.busy_seconds += time.perf_counter() - t0
        return n

    # -- slots ----------------------------------------------------------------------------------------
    def _admit(self, req: Request) -> None:
        model = self.model
        channels = model.audio_channels
        known = req.prefix if req.prefix is not None else torch.zeros(self.K, 0, dtype=torch.long)
        req.seq = build_pattern(known[None].to(model.device), req.frames, self.special, channels)[0]  # (K, L)
        req._channels = channels
        req.pos, req.status = 0, "running"
        if req.seed is not None:
            req.generator = torch.Generator(device=model.device).manual_seed(int(req.seed))
        states, mask = model.encode_text([req.prompt])                                   # (1, S, C), (1, S)
        slot = len(self.active)
        rows = slice(2 * slot, 2 * slot + 2)
        if model.cfg.lm.prefix_conditioning:   # melody models: prefill the prepended tokens into the slot
            melodies = None if req.melody is None else [req.melody.to(model.device)]
            prefix = model._conditions(states, mask, melodies, cfg_rows=True).prefix    # (2, P, D)
            req.offset = prefix.shape[1]
            if req.offset + req.seq.shape[-1] > self.lm.positions.shape[0]:
                raise ValueError(f"the text and melody take {req.offset} positions; with {req.frames} frames that "
                                 f"exceeds the model's {self.lm.positions.shape[0]}; shorten the prompt or duration")
            self._grow(req.offset + req.seq.shape[-1], 0)
            caches = self.lm.new_caches(2, req.offset, dtype=self.kv_dtype, attend_dtype=self.cache_dtype)
            with lm_mod.attention_backends(model.device):
                self.lm(torch.zeros(2, self.K, 0, dtype=torch.long, device=model.device), None, None, 0, caches,
                        prefix=prefix)
            for i, c in enumerate(caches):
                self.k[i][rows, :, :req.offset], self.v[i][rows, :, :req.offset] = c.k, c.v
            self.active.append(req)
            return
        self._grow(req.seq.shape[-1], states.shape[1])
        S = states.shape[1]
        pair = torch.cat([states, torch.zeros_like(states)]).to(model.dtype)            # (2, S, C)
        pair_mask = torch.cat([mask, torch.zeros_like(mask)])                           # (2, S)
        for layer, ck, cv in zip(self.lm.layers, self.ck, self.cv):
            k, v = layer.cross_attn.project(pair)                                        # 2 x (2, H, S, hd)
            ck[rows].zero_()
            cv[rows].zero_()
            ck[rows, :, :S], cv[rows, :, :S] = k, v
        # as generate() has it: keys, values and the text bias in the cache dtype (its lowest value masks)
        self.bias[rows] = torch.finfo(self.cache_dtype).min
        self.bias[rows, ..., :S] = self.lm.cross_bias(pair_mask, self.cache_dtype)
        self.active.append(req)

    def _release(self, req: Request, status: str) -> None:
        i, last = self.active.index(req), len(self.active) - 1
        if i != last:   # the last request moves into the freed slot, so slots stay 0..n-1
            src, dst = slice(2 * last, 2 * last + 2), slice(2 * i, 2 * i + 2)
            for t in self.k + self.v + self.ck + self.cv + [self.bias]:
                t[dst] = t[src]
            self.active[i] = self.active[last]
        self.active.pop()
        _finish(req, status)

    def _grow(self, length: int, text_length: int) -> None:
        """Make room for a grid of `length` positions and a text of `text_length` tokens (keeps contents)."""
        if length <= self.length and text_length <= self.text_length:
            return
        cfg, p = self.lm.cfg, self.lm.norm.weight
        L = max(self.length, min(-(-length // GROW) * GROW, self.lm.positions.shape[0]))
        S = max(self.text_length, text_length)
        R = 2 * self.max_batch

        def grown(old, shape, fill=0.0, dtype=self.cache_dtype):
            new = torch.full(shape, fill, dtype=dtype, device=p.device)
            if old is not None:
                new[tuple(slice(0, n) for n in old.shape)] = old
            return new

        n = len(self.lm.layers)
        olds = lambda xs: xs if xs else [None] * n  # noqa: E731
        row = cfg.head_dim + (lm_mod.KV_SCALE_BYTES if self.kv_dtype == torch.int8 else 0)
        self.k = [grown(o, (R, cfg.num_heads, L, row), dtype=self.kv_dtype) for o in olds(self.k)]
        self.v = [grown(o, (R, cfg.num_heads, L, row), dtype=self.kv_dtype) for o in olds(self.v)]
        self.ck = [grown(o, (R, cfg.num_heads, S, cfg.head_dim)) for o in olds(self.ck)]
        self.cv = [grown(o, (R, cfg.num_heads, S, cfg.head_dim)) for o in olds(self.cv)]
        self.bias = grown(self.bias, (R, 1, 1, S), torch.finfo(self.cache_dtype).min)
        self.length, self.text_length = L, S

    # -- the model, one position per row --------------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (R, K) at per-row positions pos (R,) -> logits (R, K, V); rows [0, R) of the caches.

        MusicLM.forward with a position per row: the same modules, but keys are written at each row's own
        position and each row's query only sees keys up to it.
        """
        lm = self.lm
        R, K = tokens.shape
        x = sum(lm.embed[k](tokens[:, k]) for k in range(K)) * lm.embed_scale           # (R, D)
        x = (x + lm.positions[pos].to(x.dtype))[:, None]                                 # (R, 1, D)
        if lm.fused is not None and lm.fused.takes(x):   # one native call (fused.py)
            text = lm.layers[0].cross_attn is not None
            x = lm.fused.rows(x[:, 0], pos.tolist(), self.k, self.v, [k[:R] for k in self.ck] if text else [],
                              [v[:R] for v in self.cv] if text else [], self.bias[:R] if text else None)[:, None]
        else:
            with lm_mod.attention_backends(x.device):   # the key span changes every step
                x = self._layers(x, pos)
        x = lm.norm(x)
        return torch.stack([head(x[:, 0]) for head in lm.heads], dim=1)                 # (R, K, V)

    def _layers(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The decoder layers for (R, 1, D) rows at positions pos (R,), in torch operators."""
        lm, R = self.lm, x.shape[0]
        span = int(pos.max()) + 1
        visible = (torch.arange(span, device=pos.device) <= pos[:, None])[:, None, None]  # (R, 1, 1, span)
        rows = torch.arange(R, device=pos.device)
        for i, layer in enumerate(lm.layers):
            att = layer.self_attn
            H, hd = att.heads, att.head_dim
            q, k, v = att.qkv(layer.norm1(x)).view(R, 1, 3, H, hd).permute(2, 0, 3, 1, 4)  # 3 x (R, H, 1, hd)
            # stored and read as lm.KVCache does (int8 rows with scales where kv_dtype is int8), as generate() does
            self.k[i][rows, :, pos] = lm_mod.kv_encode(k[:, :, 0], self.kv_dtype)
            self.v[i][rows, :, pos] = lm_mod.kv_encode(v[:, :, 0], self.kv_dtype)
            keys, values = (lm_mod.kv_read(c[:R, :, :span], self.cache_dtype) for c in (self.k[i], self.v[i]))
            y = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=visible)   # (R, H, 1, hd)
            x = x + att.out(y.transpose(1, 2).reshape(R, 1, H * hd).to(x.dtype))
            if layer.cross_attn is not None:
                x = x + layer.cross_attn(layer.norm_cross(x), (self.ck[i][:R], self.cv[i][:R]), self.bias[:R])
            x = x + layer.fc2(layer.act(layer.fc1(layer.norm2(x))))
        return x


def _finish(req: Request, status: str) -> None:
    req.status = status
    req.done.set()
    if req.on_done is not None:
        req.on_done(req)
