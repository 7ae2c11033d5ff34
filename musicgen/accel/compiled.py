"""The decoding step's layer loop under torch.compile: `load(..., compile=True)`, meant for GPUs.

An eager step on a GPU is bound by the host: every layer launches a few dozen kernels, each a few
microseconds of Python and driver work. Compiled with mode "reduce-overhead", inductor fuses the layer loop
(`MusicLM.step_layers`, the reference backend's own code) and records it as CUDA graphs, so a step costs
what its kernels cost on the card. The first generation pays for the compile (it says how long, once per
row count).

Graphs want static shapes and addresses: the cache is kept from one generation to the next (one per row
count, at the model's full length, its tensors marked as static addresses), the rows' positions are a
tensor, and self-attention reads a window of the cache rounded up to WINDOW_BUCKET positions under a mask,
so that a graph is recorded once per bucket rather than once per step.
"""
from __future__ import annotations

import sys
import time

import torch

WINDOW_BUCKET = 128   # compiled steps attend over a multiple of this many cache positions
TEXT_BUCKET = 32      # and over text keys padded (and masked) to a multiple of this many tokens
GRAPH_MODES = ("reduce-overhead", "max-autotune")   # torch.compile modes that record CUDA graphs


def window(filled: int, length: int) -> int:
    """Cache positions a compiled step reads when `filled` of them hold keys: rounded up to WINDOW_BUCKET."""
    return min(-(-filled // WINDOW_BUCKET) * WINDOW_BUCKET, length)


def _layers(lm, x, pos, cache, mask):
    return lm.step_layers(x, pos, cache, mask.shape[-1], mask)


class Compiled:
    name = "compiled"

    def __init__(self, mode: str | None = None, backend: str = "inductor"):
        self.mode, self.backend = mode, backend
        self.fn = None
        self.warmed: set[int] = set()
        self.caches: dict = {}

    def new_cache(self, make, rows: int):
        """A cache for `rows` rows at the model's full length, reused by the next generation of as many rows:
        the compiled graphs then keep reading the same tensors."""
        cache = self.caches.get(rows)
        if cache is None:
            self.caches.clear()   # one row count at a time: caches are the largest allocation of a generation
            cache = make()
            cache.text_bucket = TEXT_BUCKET
            cache.grow(cache.lm.positions.shape[0], exact=True)
            self.caches[rows] = cache
        return cache

    def layers(self, lm, x: torch.Tensor, pos: torch.Tensor, positions: list[int], cache) -> torch.Tensor:
        mode = self.mode or ("reduce-overhead" if x.device.type == "cuda" else "default")
        if self.fn is None:
            self.fn = torch.compile(_layers, backend=self.backend, fullgraph=True, dynamic=False, mode=mode)
        W = window(max(positions) + 1, cache.length)
        mask = (torch.arange(W, device=pos.device) <= pos[:, None])[:, None, None]      # (R, 1, 1, W)
        torch._dynamo.mark_dynamic(mask, 3)   # one graph for every window (CUDA graphs: one per bucket)
        for t in cache.tensors():   # the text's tensors are replaced when a longer text comes: every time
            torch._dynamo.mark_static_address(t)
        if x.shape[0] in self.warmed:
            return self.fn(lm, x, pos, cache, mask)
        from torch._dynamo.utils import counters

        skips = counters["inductor"]["cudagraph_skips"]
        start = time.perf_counter()
        y = self.fn(lm, x, pos, cache, mask)
        self.warmed.add(x.shape[0])
        print(f"musicgen: compiled the decoding step for {x.shape[0]} rows in {time.perf_counter() - start:.1f} s "
              "(once per row count)", file=sys.stderr)
        if mode in GRAPH_MODES and counters["inductor"]["cudagraph_skips"] > skips:
            # inductor says why only under TORCH_LOGS=cudagraphs; without graphs a GPU step is bound by launches
            print("musicgen: CUDA graphs are not used for the decoding step; it runs without them, more slowly "
                  "(TORCH_LOGS=cudagraphs says why)", file=sys.stderr)
        return y
