"""CUDA graphs of the decoding step without torch.compile (`MusicGen.cuda_graphs`).

An eager decoding step on a GPU is bound by the host, not the card: every layer launches a few dozen kernels,
each a few microseconds of Python and driver work, and medium's 48 layers make about a thousand launches a step
(on an H200, eager float32 medium decoded 78 steps/s while its weights alone would allow several hundred). A CUDA
graph records those launches once and replays them with one call, so the step costs what its kernels cost on
the card. torch.compile's "reduce-overhead" mode does that too, after fusing the kernels, but its first
generation waits for the compiler (52 s for medium on the H200); a graph of the eager kernels is recorded by
running the step twice (a warm-up, then the capture).

A graph replays fixed addresses and shapes, so the step runs the way the compiled one does (`MusicLM.step`): a
static self-attention cache over every position, the position as a tensor, self-attention over the first W
cache positions under an additive mask, W the filled length rounded up to `lm.WINDOW_BUCKET`, and the text
padded to a multiple of 32 tokens (masked, so exact). One graph is recorded per (rows, text length, W) on first
use and replayed after: 12 for a 30 s text-to-music generation of one batch size, at most 16 for a model's
2048 positions. Inputs are copied into
buffers the graphs own: the step's codes, the position and the mask window every step, the text keys and
values once per generation.

Graphs read the weights where they were at recording: moving or replacing parameters (`load_state_dict` copies
in place and is fine) is noticed at the next generation, which records again. If recording fails the steps run
on the same static buffers without graphs, and it says so once.
"""
from __future__ import annotations

import sys

import torch


class StepGraphs:
    """Records and replays `MusicLM.step` for one model: `start` once per generation, then a call per step.

    capture=False runs the same static-shape step directly on the same buffers, without recording: for machines
    without CUDA (the tests) and to compare against the recorded graphs."""

    def __init__(self, lm, capture: bool = True):
        self.lm = lm
        self.capture = capture
        self.graphs: dict[tuple, tuple] = {}    # (rows, text length, W) -> (replay, output)
        self.inputs: dict[tuple, tuple] = {}    # (rows, text length) -> the buffers the graphs read
        self.recorded = 0                       # steps recorded so far (without capture: set up to run directly)
        self._pool = None
        self._caches = None
        self._weights = None
        self._key = None

    def start(self, caches, cross_kv, cross_bias) -> None:
        """A generation begins: its static caches (MusicGen._static_caches) and its text keys and values."""
        weights = tuple(t.data_ptr() for t in (*self.lm.parameters(), *self.lm.buffers()))
        if caches is not self._caches or weights != self._weights:
            self.reset()                        # other caches (another batch size), or moved weights
            self._caches, self._weights = caches, weights
        k = caches[0].k
        rows, S = k.shape[0], cross_kv[0][0].shape[2] if cross_kv is not None else 0
        self._key = (rows, S)
        if self._key not in self.inputs:
            self.inputs[self._key] = (
                torch.zeros(rows, self.lm.cfg.num_codebooks, 1, dtype=torch.long, device=k.device),
                torch.zeros(1, dtype=torch.long, device=k.device),
                torch.full((1, 1, 1, k.shape[2]), float("-inf"), dtype=k.dtype, device=k.device),  # every window
                None if cross_kv is None else [(a.clone(), b.clone()) for a, b in cross_kv],
                None if cross_bias is None else cross_bias.clone())
        _, _, _, kv, bias = self.inputs[self._key]
        for (a, b), (sa, sb) in zip(cross_kv or (), kv or ()):
            sa.copy_(a)
            sb.copy_(b)
        if bias is not None:
            bias.copy_(cross_bias)

    def __call__(self, codes: torch.Tensor, pos: torch.Tensor, window_bias: torch.Tensor) -> torch.Tensor:
        """One step: codes (rows, K, 1), pos (1,), window_bias (1, 1, 1, W) -> logits (rows, K, V)."""
        s_codes, s_pos, s_mask, kv, bias = self.inputs[self._key]
        W = window_bias.shape[-1]
        s_codes.copy_(codes)
        s_pos.copy_(pos)
        s_mask[..., :W].copy_(window_bias)
        key = (*self._key, W)
        if key not in self.graphs:
            self.graphs[key] = self._record(s_codes, s_pos, kv, bias, self._caches, s_mask[..., :W])
        replay, out = self.graphs[key]
        result = replay()
        return (out if result is None else result).clone()   # the next replay writes `out` again

    def reset(self) -> None:
        self.graphs.clear()
        self.inputs.clear()

    def __getstate__(self):
        """Copies and pickles (copy.deepcopy of a model) keep the settings, not the recordings: those hold the
        original's buffers and caches. A copy records its own."""
        state = self.__dict__.copy()
        state.update(graphs={}, inputs={}, _pool=None, _caches=None, _weights=None, _key=None)
        return state

    def _record(self, codes, pos, kv, bias, caches, window):
        def step():
            return self.lm.step(codes, pos, kv, bias, caches, window)

        self.recorded += 1
        if self.capture:
            try:
                return self._capture(step)
            except Exception as e:   # noqa: BLE001 - any failure to record leaves the direct step, which is correct
                self.capture = False
                first = (str(e).splitlines() or [""])[0]
                print(f"musicgen: recording a CUDA graph failed ({type(e).__name__}: {first}); decoding steps run "
                      "without graphs", file=sys.stderr)
        return step, None

    def _capture(self, step):
        # a first run outside recording does the lazy work a graph must not contain (library handles,
        # workspaces); it writes the same key and value at the same position as the replay will
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()   # one memory pool: one graph runs at a time
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step()
        return graph.replay, out
