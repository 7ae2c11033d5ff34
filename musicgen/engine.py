"""The decoding engine: one step function over a static cache, one loop, for every way of generating.

`generate`, `stream`, long-form windows and the HTTP service all decode through `Engine`:

    engine = Engine(model, rows=2, length=L)        # a static cache of `rows` rows and `length` positions
    engine.admit(request)                           # its rows take slots, its known prefix is prefilled
    while engine.active:
        engine.step()                               # one forward pass over every active row, then sampling

A `Request` is one generation of B rows that share sampling parameters and a random generator (a call to
`generate` with B prompts, or one job of the service). With classifier-free guidance it owns 2B cache rows,
conditional and unconditional interleaved (c0 u0 c1 u1 ...). Requests sit in slots 0..n-1, contiguous, so a
step works on the rows [0, R) without gathering; a request that leaves has the rows after it moved down.

Every row has its own position: a step writes each row's key at its own position and masks keys past it,
so requests join at any step boundary (continuous batching) and still get exactly the codes they get
alone. A request's known prefix (melody conditions, a continuation prompt) is prefilled when it joins; its
first step feeds the last known position.

The layers of a step run on the model's backend (`model.backend`, chosen at load by what the machine can
do: musicgen/accel/__init__.py): the PyTorch layer loop (`MusicLM.step_layers`, the reference), the native
fused CPU step, or the layer loop under torch.compile. Embeddings, heads and sampling are the same for all.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from . import lm as lm_mod
from .conditions import Conditions
from .delay import codebook_delays, revert_pattern
from .sampling import SamplingParams, apply_cfg, sample_groups

GROW = 64   # the cache's length grows in steps of this many positions


@dataclass(eq=False)
class Request:
    """One generation: B rows of a delayed grid, their conditions, sampling parameters and generator."""
    seq: torch.Tensor | None                     # (B, K, L) delayed grid; -1 where codes are still to come
    cond: Conditions | None                      # per cache row: 2B rows (c0 u0 c1 u1 ...) with guidance, else B
    params: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None
    frames: int = 0                              # frames of audio the grid holds (prefix included)
    channels: int = 1                            # audio channels: stereo grids interleave codebooks
    on_step: object = None                       # callable(request) after each of its steps
    on_done: object = None                       # callable(request) when it leaves: done, cancelled or failed
    tag: dict = field(default_factory=dict)      # the caller's bookkeeping (the service's job id)
    inputs: dict | None = None                   # model.new_request's arguments, for a request built when it
                                                 # joins (seq and cond None until then: the service)
    # the engine's state
    row: int = -1                                # its first cache row while active
    pos: int = 0                                 # the grid position the next step feeds
    steps: int = 0
    shared_steps: int = 0                        # steps taken together with at least one other request
    status: str = "queued"                       # queued, running, done, cancelled, failed
    error: str | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def batch(self) -> int:
        return self.seq.shape[0]

    @property
    def rows(self) -> int:
        return self.batch * (2 if self.params.uses_cfg else 1)

    @property
    def offset(self) -> int:
        """LM positions taken by prepended condition tokens (melody models)."""
        return self.cond.prefix_length

    @property
    def total_steps(self) -> int:
        return 0 if self.seq is None else self.seq.shape[-1] - 1

    @property
    def progress(self) -> float:
        return self.steps / self.total_steps if self.total_steps else 0.0

    @property
    def finished(self) -> bool:
        return self.pos >= self.seq.shape[-1] - 1

    @property
    def complete_frames(self) -> int:
        """Frames whose every codebook is sampled (frame f of the last codebook lands at f + delay + 1)."""
        if self.seq is None:
            return 0
        return max(0, min(self.frames, self.pos - max(codebook_delays(self.seq.shape[1], self.channels))))

    def codes_between(self, start: int, end: int) -> torch.Tensor:
        """Codes (B, K, end - start) of complete frames [start, end)."""
        delays = codebook_delays(self.seq.shape[1], self.channels)
        return torch.stack([self.seq[:, k, start + d + 1:end + d + 1] for k, d in enumerate(delays)], dim=1)

    @property
    def codes(self) -> torch.Tensor:
        """(B, K, frames) once finished."""
        return revert_pattern(self.seq, self.frames, self.channels)


class Cache:
    """Static keys and values of every layer for up to `rows` rows: self-attention (rows, H, length, hd), as
    int8 rows with a float32 scale when `self_kv` is torch.int8 (lm.kv_quantize); cross-attention (rows, H,
    text, hd) with the additive text mask `bias` (rows, 1, 1, text). Grows on demand, keeping its contents."""

    def __init__(self, lm, rows: int, self_kv: torch.dtype, text_kv: torch.dtype, attend: torch.dtype):
        self.lm, self.rows = lm, rows
        self.self_kv, self.text_kv, self.attend = self_kv, text_kv, attend
        self.length = self.text_length = 0
        self.text_bucket = 1   # text lengths are rounded up to a multiple of this (compiled steps: fewer shapes)
        n = len(lm.layers)
        self.k: list = [None] * n
        self.v: list = [None] * n
        self.ck: list = [None] * n if not lm.cfg.prefix_conditioning else []
        self.cv: list = [None] * n if not lm.cfg.prefix_conditioning else []
        self.bias = None

    def grow(self, length: int, text_length: int = 0, exact: bool = False) -> None:
        """Room for `length` positions and `text_length` text tokens (rounded up to GROW unless exact)."""
        limit = self.lm.positions.shape[0]
        if length > limit:
            raise ValueError(f"{length} positions exceed the model's {limit}")
        if length > self.length:
            L = length if exact else min(-(-length // GROW) * GROW, limit)
            cfg = self.lm.cfg
            hd = cfg.head_dim + (lm_mod.KV_SCALE_BYTES if self.self_kv == torch.int8 else 0)
            self.k = [self._grown(t, (self.rows, cfg.num_heads, L, hd), self.self_kv) for t in self.k]
            self.v = [self._grown(t, (self.rows, cfg.num_heads, L, hd), self.self_kv) for t in self.v]
            self.length = L
        if self.ck and text_length > self.text_length:
            text_length = -(-text_length // self.text_bucket) * self.text_bucket
            cfg = self.lm.cfg
            shape = (self.rows, cfg.num_heads, text_length, cfg.head_dim)
            self.ck = [self._grown(t, shape, self.text_kv) for t in self.ck]
            self.cv = [self._grown(t, shape, self.text_kv) for t in self.cv]
            self.bias = self._grown(self.bias, (self.rows, 1, 1, text_length), self.text_kv, self._lowest)
            self.text_length = text_length

    @property
    def _lowest(self) -> float:
        return torch.finfo(self.text_kv).min

    def _grown(self, old, shape, dtype, fill: float = 0.0) -> torch.Tensor:
        new = torch.full(shape, fill, dtype=dtype, device=self.lm.norm.weight.device)
        if old is not None:
            new[tuple(slice(0, n) for n in old.shape)] = old
        return new

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in self.k + self.v + self.ck + self.cv + [self.bias] if t is not None]

    def put_text(self, row: int, cond: Conditions) -> None:
        """The text keys, values and mask of a request's rows, in the cache's dtype (padding masked)."""
        if not self.ck:
            return
        rows = slice(row, row + cond.cross_bias.shape[0])
        S = cond.cross_bias.shape[-1]
        for ck, cv, (k, v) in zip(self.ck, self.cv, cond.cross_kv):
            ck[rows].zero_()
            cv[rows].zero_()
            ck[rows, :, :S], cv[rows, :, :S] = k, v
        self.bias[rows] = self._lowest
        # saturate: float32's lowest rounds to -inf in bfloat16, and a row masked everywhere must stay finite
        self.bias[rows, ..., :S] = cond.cross_bias.clamp(min=self._lowest)

    def stores(self, rows: slice) -> list:
        """Per layer (keys, values, attend dtype) of `rows`: where a prefill keeps its keys and values."""
        return [(k[rows], v[rows], self.attend) for k, v in zip(self.k, self.v)]

    def move(self, src: int, dst: int, count: int) -> None:
        """Rows [src, src + count) to [dst, dst + count) (a request moving down into freed slots)."""
        for t in self.tensors():
            t[dst:dst + count] = t[src:src + count].clone()


class Engine:
    def __init__(self, model, rows: int, length: int = 0, text_length: int = 0):
        if rows < 1:
            raise ValueError(f"the engine needs at least one row, got {rows}")
        self.model, self.lm = model, model.lm
        p = model.precision
        make = lambda: Cache(self.lm, rows, p.self_kv, p.text_kv, p.attend)  # noqa: E731
        new_cache = getattr(model.backend, "new_cache", None)   # compiled steps keep theirs between generations
        self.cache = new_cache(make, rows) if new_cache is not None else make()
        if length:
            self.cache.grow(length, text_length, exact=True)
        self.active: list[Request] = []
        self.steps = 0                           # forward passes
        self.request_steps = 0                   # sum over requests of the steps they took part in

    @property
    def used_rows(self) -> int:
        return sum(r.rows for r in self.active)

    def fits(self, req: Request) -> bool:
        return self.used_rows + req.rows <= self.cache.rows

    # -- requests join and leave --------------------------------------------------------------------------
    @torch.inference_mode()
    def admit(self, req: Request) -> None:
        """Give `req` the next free rows, its text keys/values, and prefill what it knows before its first
        step: prepended conditions and every known grid position but the last."""
        if not self.fits(req):
            raise ValueError(f"a request of {req.rows} rows does not fit: {self.used_rows} of "
                             f"{self.cache.rows} rows are in use")
        open_ = (req.seq == -1).any(dim=1).any(dim=0)                           # (L,) positions with work left
        start = int(open_.nonzero()[0]) if open_.any() else req.seq.shape[-1] - 1
        L = req.seq.shape[-1]
        S = 0 if req.cond.cross_bias is None else req.cond.cross_bias.shape[-1]
        if req.offset + L > self.lm.positions.shape[0]:
            raise ValueError(f"the request needs {req.offset + L} positions; the model has "
                             f"{self.lm.positions.shape[0]}: shorten the duration or the text")
        self.cache.grow(req.offset + L, S)
        req.row, req.status = self.used_rows, "running"
        self.cache.put_text(req.row, req.cond)
        known = start - 1                                                       # the first step feeds this one
        if known > 0 or req.offset:
            rows = slice(req.row, req.row + req.rows)
            codes = self._row_layout(req, req.seq[:, :, :known])                 # (rows, K, known)
            kv = bias = None
            if self.cache.ck:   # the text as the steps read it: the cache's copies, in its dtype
                kv = [(k[rows, :, :S], v[rows, :, :S]) for k, v in zip(self.cache.ck, self.cache.cv)]
                bias = self.cache.bias[rows, ..., :S]
            with lm_mod.attention_backends(self.model.device):
                self.lm(codes, kv, bias, prefix=req.cond.prefix, stores=self.cache.stores(rows))
        req.pos = known
        self.active.append(req)

    def release(self, req: Request, status: str) -> None:
        """`req` leaves; the requests after it move down so that active rows stay [0, R)."""
        i = self.active.index(req)
        self.active.pop(i)
        after = self.active[i:]
        if after:
            count = sum(r.rows for r in after)
            self.cache.move(after[0].row, req.row, count)
            for r in after:
                r.row -= req.rows
        req.row = -1
        finish(req, status)

    # -- the step ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One forward pass over every active row and one sampled position per request; returns (and
        releases) the requests it finished."""
        active = self.active
        if not active:
            return []
        tokens = torch.cat([self._row_layout(r, r.seq[:, :, r.pos]) for r in active])          # (R, K)
        positions = [r.offset + r.pos for r in active for _ in range(r.rows)]
        logits = self.forward(tokens, positions).float()                                      # (R, K, V)
        guided, groups = [], {}
        for r in active:
            rows = logits[r.row:r.row + r.rows]
            if r.params.uses_cfg:                                               # c0 u0 c1 u1 ... -> B guided rows
                rows = apply_cfg(rows, r.params.guidance_scale)
            groups.setdefault(r.params, []).append(len(guided))
            guided.append(rows)
        picked = [None] * len(active)
        for params, members in groups.items():   # requests with equal parameters sample as one batch
            rows = torch.cat([guided[i] for i in members]) if len(members) > 1 else guided[members[0]]
            tokens = sample_groups(rows, params, [active[i].generator for i in members],
                                   [active[i].batch for i in members])
            for i, t in zip(members, tokens.split([active[i].batch for i in members])):
                picked[i] = t                                                  # (B, K)
        for r, t in zip(active, picked):
            nxt = r.seq[:, :, r.pos + 1]
            r.seq[:, :, r.pos + 1] = torch.where(nxt == -1, t, nxt)
            r.pos += 1
            r.steps += 1
            r.shared_steps += len(active) > 1
            if r.on_step is not None:
                r.on_step(r)
        self.steps += 1
        self.request_steps += len(active)
        done = [r for r in active if r.finished]
        for r in done:
            self.release(r, "done")
        return done

    def forward(self, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """tokens (R, K), row r at LM position positions[r] -> logits (R, K, V), over cache rows [0, R)."""
        pos = torch.tensor(positions, device=tokens.device)
        x = self.lm.embed_step(tokens, pos)                                    # (R, 1, D)
        x = self.model.backend.layers(self.lm, x, pos, positions, self.cache)
        return self.lm.logits(x)[:, :, 0]

    @staticmethod
    def _row_layout(req: Request, x: torch.Tensor) -> torch.Tensor:
        """Per-item tensor (B, ...) -> per cache row (c0 u0 c1 u1 ... with guidance)."""
        return x.repeat_interleave(2, dim=0) if req.params.uses_cfg else x


def finish(req: Request, status: str) -> None:
    req.status = status
    req.done.set()
    if req.on_done is not None:
        req.on_done(req)


class Reference:
    """The PyTorch layer loop (lm.MusicLM.step_layers): attention over exactly the positions written so far,
    unmasked when every row is at the same position."""

    name = "reference"

    def layers(self, lm, x, pos: torch.Tensor, positions: list[int], cache: Cache) -> torch.Tensor:
        window = max(positions) + 1
        if min(positions) == window - 1:                                        # one position for all rows
            pos, mask = window - 1, None
        else:
            mask = (torch.arange(window, device=pos.device) <= pos[:, None])[:, None, None]   # (R, 1, 1, W)
        with lm_mod.attention_backends(x.device):                               # the key span changes per step
            return lm.step_layers(x, pos, cache, window, mask)
