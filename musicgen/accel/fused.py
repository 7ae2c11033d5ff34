"""Decoding steps of a CPU LM in one native call (musicgen/kernels/decoder.cpp).

With 4-bit weights the products of a musicgen-small step take about 11 ms on two cores; the whole step driven
layer by layer from Python took about 24 ms at position 300: attention over the cache, and the dispatch of
some 30 small operations per layer. bfloat16 weights paid the same: 28 ms of products in a 51 ms step, and
float32 ones about 16 ms of a 71 ms step. `FusedLayers` hands the decoder layers' norms and weights to the
native decoder once, and `MusicLM.forward` routes one-position eager steps on CPU through it; the
embeddings, the final norm and the heads stay in Python. It computes what the layer loop computes
(tests/test_fast.py holds the two together), writing keys and values into the same `KVCache` buffers, so
prefill in Python and steps here interleave. Its activations are float32 throughout the layers, so for a
bfloat16 (or float16) model it is closer to float32 than the layer loop (which rounds every activation to the
model's dtype); only the step's output, the keys and the values are rounded. For a float32 model the two
differ only in the order of float32 sums (about 1e-6 of the logits' spread), as two BLAS libraries do: it is
the exact path's decoding step, held to transformers by the conformance tests as the layer loop is.

`attach(lm)` installs it where it applies: CPU, no autograd, the kernels built, and every decoder linear an
Int4Linear or Int8Linear (float32 or bfloat16 model), or a float32, bfloat16 or float16 linear on a CPU with
AVX-512 where our dense kernel reads the weights about as fast as PyTorch's products or faster
(quant.dense_policy; float16 products in PyTorch read the weights at 7 GB/s here, a third of our kernel's
rate). MUSICGEN_FUSED=0 turns it off: every step then runs the PyTorch layer loop (to compare the two paths).
"""
from __future__ import annotations

import os
import sys

import torch

from . import kernels
from .quant import Int4Linear, Int8Linear, SkinnyLinear, dense_picked


class FusedLayers:
    def __init__(self, native, dtype: torch.dtype, bindings: list | None = None):
        self.native = native
        self.dtype = dtype   # the model's, when built: a model converted since (model.float()) keeps its layer loop
        # (dict, key, object) for every layer, sub-layer, linear, norm and their tensors as they were at build:
        # the native decoder holds those tensors, so a module or parameter put in their place later (adapters,
        # another quantisation, `module.weight = Parameter(...)`) would be ignored by it
        self.bindings = bindings or []
        self.stale = False

    def takes(self, x: torch.Tensor) -> bool:
        """Whether the one-position rows x go through it: on CPU, in the dtype it was built for, no autograd, and
        the LM's layers still the ones it was built from (else the layer loop runs them, and it says so once)."""
        if x.device.type != "cpu" or x.dtype != self.dtype or torch.is_grad_enabled() or self.stale:
            return False
        if not all(d.get(k) is v for d, k, v in self.bindings):
            self.stale = True
            print("musicgen: the LM's layers changed after load; its decoding steps now run the PyTorch layer "
                  "loop (musicgen.fused.attach(model.lm) builds the fused decoder for them again)", file=sys.stderr)
            return False
        return True

    def __call__(self, x: torch.Tensor, pos: int, caches, cross_kv, cross_bias) -> torch.Tensor:
        """x (R, 1, D) at position pos -> (R, 1, D) after every decoder layer (MusicLM.forward's step)."""
        ks, vs = ([], []) if cross_kv is None else ([k for k, _ in cross_kv], [v for _, v in cross_kv])
        y = self.rows(x[:, 0], [pos], [c.k for c in caches], [c.v for c in caches], ks, vs, cross_bias)
        return y[:, None]

    def rows(self, x: torch.Tensor, positions: list[int], keys, values, cross_keys, cross_values,
             cross_bias) -> torch.Tensor:
        """x (R, D), row r at positions[r] (or every row at positions[0]) -> (R, D); keys/values per layer
        (>= R, H, max_len, hd) (the continuous-batching scheduler's slots, rows past R untouched)."""
        with torch.profiler.record_function("musicgen::fused_layers"):   # named in profiles (benchmarks/)
            return self.native.step(x.float(), positions, keys, values, cross_keys, cross_values,
                                    cross_bias).to(x.dtype)


def _linear(module) -> tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(kind, weight, scales, bias) of a layer, as the native decoder takes it; kind None where it cannot (a
    float32 or 16-bit linear is "dense" where dense_policy picks our kernel for decoding steps)."""
    if isinstance(module, (Int4Linear, Int8Linear)):
        return ("int4" if isinstance(module, Int4Linear) else "int8", module.weight, *module._kernel_args())
    if type(module) in (torch.nn.Linear, SkinnyLinear) and dense_picked(module.weight.dtype):
        return "dense", module.weight.contiguous(), None, module.bias
    return None, None, None, None   # anything else (an adapter, another quantisation): the layer loop


def build(lm) -> FusedLayers | None:
    """The fused decoder for `lm`, or None where it does not apply (see the module docstring)."""
    cfg = lm.cfg
    dtype = lm.norm.weight.dtype
    if lm.norm.weight.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if cfg.head_dim > 256 or cfg.dim % 8 or cfg.ffn_dim % 8:
        return None
    linears = [[_linear(layer.get_submodule(p)) for p in _layer_parts(layer)[1]] for layer in lm.layers]
    if any(kind is None for layer in linears for kind, *_ in layer):   # before the decoder, which builds the kernels
        return None
    native_cls = kernels.fused_decoder()
    if native_cls is None:
        return None
    native = native_cls(cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.layer_norm_eps, cfg.activation)
    for layer, layer_linears in zip(lm.layers, linears):
        norms = [layer.get_submodule(p) for p in _layer_parts(layer)[0]]
        if any(n.weight is None or n.bias is None for n in norms):
            return None
        kinds, weights, scales, biases = zip(*layer_linears)
        native.add_layer([t.float() for n in norms for t in (n.weight, n.bias)], list(kinds), list(weights),
                         list(scales), [None if b is None else b.float() for b in biases])
    return FusedLayers(native, dtype, _bindings(lm))


def _bindings(lm) -> list:
    """(dict, key, object) of what the native decoder was built from (see FusedLayers.bindings)."""
    out = {}   # (id of the dict, key) -> (dict, key, object): a module on several paths is checked once

    def bind(d, key):
        out[id(d), key] = (d, key, d[key])
        return d[key]

    for i in range(len(lm.layers)):
        layer = bind(lm.layers._modules, str(i))
        for path in [p for parts in _layer_parts(layer) for p in parts]:
            m = layer
            for name in path.split("."):   # every module on the way: self_attn, then self_attn.qkv
                m = bind(m._modules, name)
            for d in (m._parameters, m._buffers):
                for k in d:
                    bind(d, k)
    return list(out.values())


def _layer_parts(layer) -> tuple[list[str], list[str]]:
    """Paths of a layer's norms and linears, in the order the native decoder takes them: norm1, norm2
    (, norm_cross); qkv, out, fc1, fc2 (, cross q, cross out)."""
    norms, linears = ["norm1", "norm2"], ["self_attn.qkv", "self_attn.out", "fc1", "fc2"]
    if layer.cross_attn is not None:
        norms, linears = norms + ["norm_cross"], linears + ["cross_attn.q", "cross_attn.out"]
    return norms, linears


def attach(lm) -> bool:
    """Route `lm`'s eager one-position CPU steps through the fused decoder where it applies; True if it does."""
    lm.fused = None
    if os.environ.get("MUSICGEN_FUSED", "") == "0":
        return False
    lm.fused = build(lm)
    return lm.fused is not None
