"""The fused CPU decoding step: every decoder layer of a step in one native call (kernels/decoder.cpp).

Driven layer by layer from Python, a decoding step of a quantised model spends more time dispatching some 30
small operations per layer and attending over the cache than in its products (docs/performance.md).
`FusedLayers` hands the decoder layers' norms and weights to the native decoder once; the engine's steps
then run every layer in one call, writing keys and values into the same cache as the layer loop, so a
prefill in Python and steps here interleave. The embeddings, the final norm and the heads stay in Python.

Its activations are float32 throughout the layers, so for a bfloat16 (or float16) model it is closer to float32
than the layer loop (which rounds every activation to the model's dtype); only the step's output, the keys
and the values are rounded. For a float32 model the two differ only in the order of float32 sums (about 1e-6
of the logits' spread), as two BLAS libraries do (tests/test_backends.py holds the two together).

`build(lm)` makes it where it applies: CPU, the kernels built, and every decoder linear an Int4Linear or
Int8Linear, or a plain float32, bfloat16 or float16 nn.Linear that the kernels can read.
"""
from __future__ import annotations

import sys

import torch

from . import kernels
from .quant import Int4Linear, Int8Linear


class FusedLayers:
    """A decoding-step backend (see musicgen/engine.py): `layers` runs every decoder layer in one call."""

    name = "fused"

    def __init__(self, native, dtype: torch.dtype, bindings: list):
        self.native = native
        self.dtype = dtype   # the model's, when built: a model converted since (model.float()) takes the layer loop
        # (dict, key, object) for every layer, sub-layer, linear, norm and their tensors as they were at build:
        # the native decoder holds those tensors, so a module or parameter put in their place later (adapters,
        # another quantisation, `module.weight = Parameter(...)`) would be ignored by it
        self.bindings = bindings
        self.stale = False
        from ..engine import Reference

        self.reference = Reference()

    def takes(self, x: torch.Tensor) -> bool:
        """Whether rows x go through it: on CPU, in the dtype it was built for, no autograd, and the LM's layers
        still the ones it was built from (else the layer loop runs them, and it says so once)."""
        if x.device.type != "cpu" or x.dtype != self.dtype or torch.is_grad_enabled() or self.stale:
            return False
        if not all(d.get(k) is v for d, k, v in self.bindings):
            self.stale = True
            print("musicgen: the LM's layers changed after load; its decoding steps now run the PyTorch layer "
                  "loop", file=sys.stderr)
            return False
        return True

    def layers(self, lm, x: torch.Tensor, pos: torch.Tensor, positions: list[int], cache) -> torch.Tensor:
        """x (R, 1, D), row r at positions[r] -> (R, 1, D) after every decoder layer, over cache rows [0, R)."""
        if not self.takes(x):
            return self.reference.layers(lm, x, pos, positions, cache)
        R = x.shape[0]
        text = bool(cache.ck)
        with torch.profiler.record_function("musicgen::fused_layers"):   # named in profiles (benchmarks/)
            y = self.native.step(x[:, 0].float(), positions, cache.k, cache.v,
                                 [k[:R] for k in cache.ck] if text else [], [v[:R] for v in cache.cv] if text else [],
                                 cache.bias[:R] if text else None)
        return y.to(x.dtype)[:, None]


DENSE = (torch.float32, torch.bfloat16, torch.float16)   # unquantised weights the kernels read


def _linear(module) -> tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(kind, weight, scales, bias) of a layer, as the native decoder takes it; kind None where it cannot (a
    plain float32 or 16-bit nn.Linear is "dense")."""
    if isinstance(module, (Int4Linear, Int8Linear)):
        return ("int4" if isinstance(module, Int4Linear) else "int8", module.weight, *module._kernel_args())
    if type(module) is torch.nn.Linear and module.weight.dtype in DENSE and kernels.dense_gemv() is not None:
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
