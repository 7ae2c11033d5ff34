"""Continuous batching for the service: one decoding thread feeds the engine's one loop.

    sched = Scheduler(model, max_batch=8)
    req = sched.submit(job_request(prompt="lofi beat", duration=5.0, top_k=250, seed=0))
    threading.Thread(target=sched.run, daemon=True).start()
    req.done.wait(); req.codes                              # (1, K, frames): what generate_codes gives alone

Waiting requests join the engine (musicgen/engine.py) at step boundaries, up to `max_batch` requests; each
step runs every active request together; finished or cancelled ones leave. A request's inputs are turned into
its grid and conditions (text encoding, melody chroma) when it joins, on the decoding thread.
"""
from __future__ import annotations

import threading
import time
from collections import deque

import torch

from ..delay import pattern_length
from ..engine import Engine, Request, finish


def job_request(**inputs) -> Request:
    """A Request that the scheduler builds from `model.new_request(**inputs)` when it joins."""
    return Request(None, None, inputs=inputs)


class Scheduler:
    def __init__(self, model, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.engine = Engine(model, rows=2 * max_batch)   # guidance: two rows a request
        self.pending: deque[Request] = deque()
        self.lock = threading.Condition()
        self.busy_seconds = 0.0
        self._stop = threading.Event()
        self._paused = False

    @property
    def active(self) -> list[Request]:
        return self.engine.active

    @property
    def steps(self) -> int:
        return self.engine.steps

    @property
    def request_steps(self) -> int:
        return self.engine.request_steps

    @property
    def load(self) -> int:
        return len(self.pending) + len(self.active)

    # -- requests -------------------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        """Queue `req`; too long for the model is refused here (a ValueError naming the limit)."""
        model, inputs = self.model, req.inputs
        frames = model.frames_for(inputs.get("duration", 8.0))
        length = pattern_length(frames, model.cfg.lm.num_codebooks, model.audio_channels)
        if model.cfg.lm.prefix_conditioning:   # chroma frames and at least one text token come first
            length += model.cfg.melody.chroma_length + 1
        limit = model.lm.positions.shape[0]
        if length > limit:
            raise ValueError(f"{frames} frames need {length} positions; the model has {limit}")
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
                finish(req, "cancelled")
            self.lock.notify_all()

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
                        self.engine.release(req, "failed")

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
        """One step boundary (leave, join) and one engine step; returns how many requests took it."""
        t0 = time.perf_counter()
        with self.lock:
            for req in [r for r in self.active if r.cancelled]:
                self.engine.release(req, "cancelled")
            while self.pending and len(self.active) < self.max_batch:
                req = self.pending.popleft()
                if req.cancelled:
                    finish(req, "cancelled")
                    continue
                try:
                    self._admit(req)
                except Exception as e:  # a bad request must not take the loop down
                    req.error = f"{type(e).__name__}: {e}"
                    finish(req, "failed")
        n = len(self.active)
        if n:
            self.engine.step()
        self.busy_seconds += time.perf_counter() - t0
        return n

    def _admit(self, req: Request) -> None:
        built = self.model.new_request(**req.inputs)
        for name in ("seq", "cond", "params", "generator", "frames", "channels"):
            setattr(req, name, getattr(built, name))
        self.engine.admit(req)
