"""How a loaded model stores and computes: one value, fixed at load.

    weights  "float32", "bfloat16", "float16": the LM's and text encoder's weights in that dtype;
             "int8", "int4": weight-only quantised (musicgen/accel/quant.py)
    compute  the dtype of their activations (and of their unquantised weights)
    text_kv  the dtype of the text keys, values and mask while decoding
    self_kv  the self-attention cache: a float dtype, or torch.int8 rows (codes and a float32 scale per
             key or value vector, lm.kv_quantize)

The codec stays float32 in every mode: it is cheap, and its LSTM and residual sums are where half precision
audibly hurts. `float32` is the exact path: float32 everywhere, held to the reference by the conformance
tests. The other modes trade accuracy for speed within tested tolerances (README, Precision and speed):
- quantised models on a CPU without our kernels compute in bfloat16: PyTorch's packed weight-only kernels are
  fast with bfloat16 activations only, and converting every product's input and output cost more than the
  products' savings (docs/performance.md, "Without the native kernels");
- quantised models on CPU keep the text keys/values in bfloat16: attention reads the whole cache every step,
  and at 30 s of float32 that is as much memory traffic as 4-bit weights, while its rounding moves the logits
  far less than the weights' quantisation does;
- where the fused CPU step decodes (accel/fused.py) a quantised or 16-bit model, its self-attention cache is
  int8 rows: half a 16-bit cache's bytes, read by the native attention directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
QUANTIZE = (None, "int8", "int4")


@dataclass(frozen=True)
class Precision:
    weights: str
    compute: torch.dtype
    text_kv: torch.dtype
    self_kv: torch.dtype

    @property
    def attend(self) -> torch.dtype:
        """The dtype attention computes in over the caches (int8 rows are read back to it)."""
        return self.text_kv

    @property
    def exact(self) -> bool:
        return self.weights == "float32"

    @classmethod
    def choose(cls, dtype: str | torch.dtype, quantize: str | None, device: torch.device, fused: bool = False,
               kernels: bool = True) -> "Precision":
        """The precision of `load(dtype=..., quantize=...)` on `device`; fused: whether the fused CPU step
        decodes (it reads int8 cache rows); kernels: whether our CPU kernels are built (without them a quantised
        model computes in bfloat16, the activations PyTorch's packed kernels take)."""
        compute = parse_dtype(dtype)
        if quantize not in QUANTIZE:
            raise ValueError(f"unknown quantize {quantize!r}: choose None, 'int8' or 'int4'")
        weights = quantize or {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[compute]
        cpu = device.type == "cpu"
        if quantize and cpu and not kernels and compute == torch.float32:
            compute = torch.bfloat16
        text_kv = torch.bfloat16 if quantize and cpu and compute == torch.float32 else compute
        compact = quantize is not None or compute != torch.float32
        self_kv = torch.int8 if cpu and fused and compact else text_kv
        return cls(weights, compute, text_kv, self_kv)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose float32, bfloat16 or float16")
    return DTYPES[dtype]
