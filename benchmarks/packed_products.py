"""PyTorch's own products over one decoding step's weights: the floor of a step without our native kernels.

    python benchmarks/packed_products.py                    # musicgen-small's layer set, 1 and 2 rows
    python benchmarks/packed_products.py --layers 48 --dim 1536 --rows 2

A step multiplies a few rows (2 with guidance) by every LM weight once: per layer the fused q/k/v projection,
the self-attention output, the cross-attention query and output, and the two feed-forward matrices. This times
those products alone, with random weights at the model's shapes and nothing between them, for
- int4: `aten._weight_int4pack_mm_for_cpu` (groups of 32, bfloat16 activations), as quant.py calls it;
- int8: `aten._weight_int8pack_mm` (per-channel scales, bfloat16 activations), as quant.py calls it;
- float32: `F.linear` (MKL), the exact path.
"from memory" uses a distinct weight per layer, as a step does, and GB/s is the rate it reads them at (codes
and scales); "in cache" repeats one layer's weights, which then sit in the CPU's caches: where the two are
close, the kernel is bound by its arithmetic, not by memory.
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24, help="decoder layers (small 24, medium 48, large 48)")
    p.add_argument("--dim", type=int, default=1024, help="model width (small 1024, medium 1536, large 2048)")
    p.add_argument("--rows", default="1,2", help="rows per product, comma-separated (2: one prompt with guidance)")
    p.add_argument("--repeat", type=int, default=20, help="timed passes over all layers")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    D = args.dim
    shapes = [(3 * D, D), (D, D), (D, D), (D, D), (4 * D, D), (D, 4 * D)]   # (out, in) of each product

    def int4_layer(n, k):
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        return (torch._convert_weight_to_int4pack_for_cpu(codes, 1), torch.randn(k // 32, n, 2, dtype=torch.bfloat16))

    def int8_layer(n, k):
        return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, dtype=torch.bfloat16)

    kinds = {
        "int4": (int4_layer, torch.bfloat16, lambda x, w: torch._weight_int4pack_mm_for_cpu(x, w[0], 32, w[1])),
        "int8": (int8_layer, torch.bfloat16, lambda x, w: torch._weight_int8pack_mm(x, w[0], w[1])),
        "float32": (lambda n, k: torch.randn(n, k), torch.float32, F.linear),
    }

    def timed(product, weights, xs) -> float:
        def one_pass():
            for (n, k), w in weights:
                product(xs[k], w)
        one_pass()
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            one_pass()
        return (time.perf_counter() - t0) / args.repeat * 1e3

    print(f"{args.layers} layers of width {D}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"ms per step of products")
    print("| weights | rows | from memory | GB/s | in cache |")
    print("|---|---:|---:|---:|---:|")
    with torch.inference_mode():
        for name, (make, dtype, product) in kinds.items():
            distinct = [((n, k), make(n, k)) for _ in range(args.layers) for n, k in shapes]
            one = [((n, k), make(n, k)) for n, k in shapes] * args.layers
            size = sum(t.numel() * t.element_size() for _, w in distinct
                       for t in (w if isinstance(w, tuple) else (w,)))
            for rows in (int(r) for r in args.rows.split(",")):
                xs = {k: torch.randn(rows, k, dtype=dtype) for k in (D, 4 * D)}
                ms = timed(product, distinct, xs)
                print(f"| {name} | {rows} | {ms:.1f} | {size / ms / 1e6:.1f} | {timed(product, one, xs):.1f} |",
                      flush=True)
            del distinct, one


if __name__ == "__main__":
    main()
