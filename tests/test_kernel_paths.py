"""The native kernels' code paths (AVX2, AVX-512, AMX tiles) against plain references.

(Until the kernels choose their instruction set through an API of their own, the paths are forced with the
kernels' legacy environment switches here.)
"""
from __future__ import annotations

import pytest
import torch

from conftest import kernel_or_skip
from musicgen.accel.quant import dequantize_int4_weight, quantize_int4_weight


def kernel_path(monkeypatch, name: str, path: str, tiles: str):
    """The kernel `name` with one code path allowed: "amx" (AMX tiles of kind `tiles` where the shape suits
    them), "avx512"/"vnni" (MUSICGEN_NO_AMX=1) or "avx2" (MUSICGEN_NO_AVX512=1)."""
    import musicgen.accel.kernels as kernels

    kernel = kernel_or_skip(name)
    monkeypatch.setenv("MUSICGEN_NO_AVX512", "1" if path == "avx2" else "0")
    monkeypatch.setenv("MUSICGEN_NO_AMX", "0" if path == "amx" else "1")
    if path == "amx" and not kernels.amx_available(tiles):
        pytest.skip(f"this CPU (or kernel) has no AMX {tiles} tiles")
    assert kernels.amx_available(tiles) == (path == "amx")
    return kernel


@pytest.mark.parametrize("path", ["amx", "avx512", "avx2"])
@pytest.mark.parametrize("M,N,K,bias", [(1, 7, 5, True), (2, 64, 100, False), (3, 33, 64, True),
                                        (5, 130, 1030, True), (7, 17, 33, False), (8, 96, 4096, False),
                                        (12, 50, 2050, True), (16, 40, 6000, True), (10, 16, 32, True),
                                        (16, 48, 4096, False), (21, 32, 96, True), (6, 16, 64, False),
                                        (40, 80, 160, True)])
def test_int8_kernel_equals_dequantised_matmul(monkeypatch, M, N, K, bias, path):
    """Every code path: AMX bfloat16 tiles from 6 rows where N % 16 == K % 32 == 0 (float32 activations as
    three bfloat16 parts; weight rows in pairs of 16 blocks and one left over, more than 16 rows in blocks of
    16), else the AVX-512 kernel (blocks of 8, 4, 2, 1 rows over chunks of K, four accumulators per row at 1-3
    rows; MUSICGEN_NO_AMX=1), and AVX2 (MUSICGEN_NO_AVX512=1)."""
    kernel = kernel_path(monkeypatch, "int8_gemv", path, "bf16")
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s, b = torch.rand(N, generator=g), (torch.randn(N, generator=g) if bias else None)
    ref = x.double() @ (q.double() * s.double()[:, None]).t() + (b.double() if bias else 0)
    torch.testing.assert_close(kernel(x, q, s, b).double(), ref, atol=1e-6 * K ** 0.5 * 127, rtol=1e-5)


def test_int8_tiles_take_many_rows_at_float32_accuracy(monkeypatch):
    """16 rows go to the AMX tiles: the float32 activations survive their split into bfloat16 parts, so the
    result is as close to float64 as PyTorch's float32 product (measured: 0.0085 against 0.0047, values in the
    thousands; one bfloat16 part: 26), and the sums do come from another path than the AVX-512 kernel's."""
    import musicgen.accel.kernels as kernels

    kernel = kernel_or_skip("int8_gemv")
    monkeypatch.setenv("MUSICGEN_NO_AMX", "0")
    if not kernels.amx_available("bf16"):
        pytest.skip("this CPU (or kernel) has no AMX bfloat16 tiles")
    g = torch.Generator().manual_seed(1)
    x, s = torch.randn(16, 4096, generator=g), torch.rand(48, generator=g)
    q = torch.randint(-127, 128, (48, 4096), dtype=torch.int8, generator=g)
    w = q.double() * s.double()[:, None]
    err = lambda y: (y.double() - x.double() @ w.t()).abs().max().item()  # noqa: E731
    tiles = kernel(x, q, s, None)
    monkeypatch.setenv("MUSICGEN_NO_AMX", "1")
    assert not torch.equal(tiles, kernel(x, q, s, None))
    assert err(tiles) < 3 * err(x @ w.float().t())
    assert err(tiles) * 1000 < err(x.bfloat16().float() @ w.float().t())


@pytest.mark.parametrize("path", ["amx", "vnni", "avx2"])
@pytest.mark.parametrize("M,N,K,bias", [(1, 7, 64, True), (2, 64, 256, False), (3, 33, 320, True),
                                        (5, 130, 1024, True), (8, 96, 4096, False), (16, 40, 6144, True),
                                        (4, 16, 64, True), (7, 48, 192, False), (16, 64, 6144, True),
                                        (21, 32, 128, True)])
def test_int4_kernel_equals_quantised_reference(monkeypatch, M, N, K, bias, path):
    """The kernel computes exactly (to float rounding) dequant(W) @ quant8(x): int8 activations per group of 32.
    Every code path: AMX tiles (from 4 rows, N a multiple of 16; more than 16 rows in blocks of 16), AVX-512
    VNNI (MUSICGEN_NO_AMX=1) and AVX2 (MUSICGEN_NO_AVX512=1)."""
    kernel = kernel_path(monkeypatch, "int4_gemv", path, "int8")
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g) * 3
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    packed, scales = quantize_int4_weight(w)
    xg = x.view(M, K // 32, 32)
    xs = xg.abs().amax(dim=-1, keepdim=True) / 127
    xq = (torch.round(xg / xs) * xs).view(M, K)
    ref = xq.double() @ dequantize_int4_weight(packed, scales).double().t() + (b.double() if bias else 0)
    torch.testing.assert_close(kernel(x, packed, scales, b).double(), ref, atol=1e-5 * K ** 0.5, rtol=1e-5)


def _dense_or_skip():
    from musicgen.accel import kernels

    kernel_or_skip("int8_gemv")            # the extension itself (fails in CI if it does not build)
    native = kernels.dense_gemv()
    if native is None:
        pytest.skip("no AVX-512 on this CPU: dense_gemv is not offered")
    return native


@pytest.mark.parametrize("path", ["amx", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K,bias", [(1, 7, 5, True), (2, 64, 100, False), (3, 33, 64, True),
                                        (5, 130, 1030, True), (8, 96, 4096, False), (13, 40, 6000, True),
                                        (6, 16, 64, True), (16, 48, 1024, False), (40, 80, 160, True)])
def test_dense_kernel_equals_float64_reference(monkeypatch, path, dtype, M, N, K, bias):
    """float32, bfloat16 or float16 weights, widened exactly, times float32 rows: blocks of 8/4/2/1 rows, K
    tails and chunks of K on AVX-512; bfloat16 weights from 6 rows (N % 16 == K % 32 == 0) on AMX tiles, the
    activations split exactly into three bfloat16 parts (float16 weights stay on AVX-512)."""
    native = _dense_or_skip()
    import musicgen.accel.kernels as kernels

    monkeypatch.setenv("MUSICGEN_NO_AMX", "0" if path == "amx" else "1")
    if path == "amx" and not kernels.amx_available("bf16"):
        pytest.skip("this CPU (or kernel) has no AMX bfloat16 tiles")
    g = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g) if bias else None
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    torch.testing.assert_close(native(x, w, b).double(), ref, atol=1e-6 * K ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_kernel_rows_do_not_depend_on_their_batch(monkeypatch, dtype):
    """On the AVX-512 kernel each row's sums are bitwise the same alone, in pairs, or among 5 or 8 rows.
    K = 4096 spans several chunks of K: with the chunk sized by the row count, as it once was, 8 rows and 2
    gave different sums. (From 6 rows bfloat16 weights take AMX tiles, whose sums agree to float32 rounding.)"""
    native = _dense_or_skip()
    monkeypatch.setenv("MUSICGEN_NO_AMX", "1")
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(16, 4096, generator=g), torch.randn(48, 4096, generator=g).to(dtype)
    together = native(x, w, None)
    for lo, hi in ((0, 1), (2, 4), (4, 13), (8, 16)):
        assert torch.equal(native(x[lo:hi], w, None), together[lo:hi])
