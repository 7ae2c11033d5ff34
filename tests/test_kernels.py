"""The native CPU kernels (musicgen/accel/kernels) at every instruction-set level this host runs, each against a
plain PyTorch computation: the products at row counts that cover every row block and AMX threshold, at shapes
with remainders; the quantisers bitwise; the LSTM layer against torch.nn.LSTM; the fused decoder step against
one decoder layer step written out in float64. A level the CPU (or OS) lacks is skipped; where the kernels cannot
be built at all, every test skips (and fails in CI, MUSICGEN_REQUIRE_KERNEL=1)."""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import kernel_or_skip

from musicgen.accel import kernels
from musicgen.accel.quant import (dequantize_int4_weight, quantize_int4_weight_reference,
                                  quantize_per_channel_reference)

# every row block of the row kernels (8 / 6 / 4, 4, 2, 1 and their remainders), the AMX thresholds (int4 from 4
# rows, int8 and bfloat16 from 6), blocks of 16 rows on the tiles and one past them
ROWS = (1, 2, 3, 4, 5, 6, 8, 16, 17, 33)
AMX_FROM = {"int8": 6, "int4": 4, "bfloat16": 6}   # kernels.h: AMX_*_MIN_ROWS
DENSE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The path each kernel takes at each level with 8 rows (int8.cpp, int4.cpp, dense.cpp): the same path gives
# bitwise the same result, another path another order of float sums.
PATH = {"int8": ("avx2", "avx512", "avx512", "tiles"), "int4": ("avx2", "avx2", "vnni", "tiles"),
        "float32": ("avx2", "avx512", "avx512", "avx512"), "bfloat16": ("avx2", "avx512", "avx512", "tiles"),
        "float16": ("avx2", "avx512", "avx512", "avx512")}


@pytest.fixture(params=kernels.LEVELS)
def level(request):
    """Each instruction-set level in turn, as the kernels' cap for the test; skipped where the host lacks it."""
    kernel_or_skip("int8_gemv")
    if request.param not in kernels.isa_levels():
        pytest.skip(f"this CPU (or OS) does not run the {request.param} kernels")
    kernels.limit_isa(request.param)   # conftest lifts it after the test
    return request.param


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """What int4_gemv does to its float32 rows: int8 codes per group of 32, round(x * (127 / max|x|)) to nearest
    even, times max|x| / 127 (float32 arithmetic, as the kernel's)."""
    g = x.view(x.shape[0], -1, 32)
    mx = g.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(mx > 0, 127 / mx, torch.zeros_like(mx))
    return (torch.round(g * inv) * (mx / 127)).view_as(x)


def product(kind: str, n: int, k: int, bias: bool, seed: int):
    """(kernel call x -> y, float64 reference x -> y) of a random (n, k) weight of `kind`."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 2
    b = torch.randn(n, generator=g) if bias else None
    b64 = b.double() if bias else 0
    if kind == "int8":
        q, s = quantize_per_channel_reference(w)
        w64 = q.double() * s.double()[:, None]
        return (lambda x: kernels.int8_gemv()(x, q, s, b)), (lambda x: x.double() @ w64.t() + b64)
    if kind == "int4":
        packed, scales = quantize_int4_weight_reference(w)
        w64 = dequantize_int4_weight(packed, scales).double()
        return ((lambda x: kernels.int4_gemv()(x, packed, scales, b)),
                (lambda x: quantize_activations(x).double() @ w64.t() + b64))
    wd = w.to(DENSE[kind])
    return (lambda x: kernels.dense_gemv()(x, wd, b)), (lambda x: x.double() @ wd.double().t() + b64)


# (N, K): AMX-eligible (N % 16 == 0, K % 32 == 0) across two chunks of K (1024 + 32); remainders everywhere
# (N % 16, K % 8 and K % 16 left over after a whole chunk); K below one vector. int4: K % 64 == 0, with groups
# left over after blocks of 8 (1344 = 42 groups) and a single pair.
SHAPES = {"int8": [(48, 1056), (37, 1030), (7, 5)], "int4": [(48, 1344), (37, 1344), (16, 64)]}


@pytest.mark.parametrize("kind", ["int8", "int4", "float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", [0, 1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_products_equal_the_float64_reference(level, kind, shape, bias):
    """y = x W^T + b to float32 rounding for every row count, with W int8 (times per-row scales), 4-bit (times
    group scales; the activations quantised per group of 32 as the kernel does) or float32 / bfloat16 / float16
    widened exactly."""
    n, k = SHAPES["int4" if kind == "int4" else "int8"][shape]
    kernel, reference = product(kind, n, k, bias, seed=n * k + bias)
    g = torch.Generator().manual_seed(k)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=g) * 3
        y, ref = kernel(x), reference(x)
        assert y.dtype == torch.float32 and y.shape == (rows, n)
        torch.testing.assert_close(y.double(), ref, atol=1e-5 * math.sqrt(k) * x.abs().max().item(), rtol=1e-5,
                                   msg=lambda m: f"{rows} rows: {m}")


@pytest.mark.parametrize("kind", ["int8", "int4", "float32", "bfloat16", "float16"])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(level, kind):
    """The service batches requests and promises each its solo codes: a row's result is bitwise the same alone or
    among any number of rows, on each path. Only where a row count crosses an AMX threshold does the path change
    (the sums then agree to float32 rounding)."""
    for n, k in [(48, 1344)] if kind == "int4" else [(48, 1056), (37, 1030)]:   # AMX-eligible, and remainders
        kernel, _ = product(kind, n, k, True, seed=3)
        x = torch.randn(33, k, generator=torch.Generator().manual_seed(4))
        together = kernel(x)
        tiles = lambda rows: level == "amx" and kind in AMX_FROM and rows >= AMX_FROM[kind] and n % 16 == 0  # noqa
        for rows in ROWS:
            for lo in (0, 33 - rows):
                alone = kernel(x[lo:lo + rows])
                if tiles(rows) == tiles(33):
                    assert torch.equal(alone, together[lo:lo + rows]), f"{n}x{k}, {rows} rows from {lo}"
                else:
                    torch.testing.assert_close(alone, together[lo:lo + rows], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "int4", "float32", "bfloat16", "float16"])
def test_each_level_takes_its_own_path(kind):
    """limit_isa does switch paths: at 8 rows two levels give bitwise the same result exactly where the dispatch
    (PATH) has them take the same kernel."""
    kernel_or_skip("int8_gemv")
    host = kernels.isa_levels()
    kernel, _ = product(kind, 48, 1344, False, seed=5)
    x = torch.randn(8, 1344, generator=torch.Generator().manual_seed(6))
    results = {}
    for level in host:
        with kernels.limit_isa(level):
            assert kernels.isa_level() == level
            results[level] = kernel(x)
    for i, a in enumerate(host):
        for b in host[i + 1:]:
            same = PATH[kind][kernels.LEVELS.index(a)] == PATH[kind][kernels.LEVELS.index(b)]
            assert torch.equal(results[a], results[b]) == same, (a, b)


def test_isa_levels_and_the_limit():
    kernel_or_skip("int8_gemv")
    host = kernels.isa_levels()
    assert host and host[0] == "avx2" and tuple(host) == kernels.LEVELS[:len(host)]
    assert kernels.isa_level() == host[-1]                       # the best by default
    with kernels.limit_isa("avx2") as cap:
        assert isinstance(cap, kernels.limit_isa) and kernels.isa_level() == "avx2"
        assert not kernels.amx_available("int8") and not kernels.amx_available("bf16")
        with kernels.limit_isa(None):
            assert kernels.isa_level() == host[-1]
        assert kernels.isa_level() == "avx2"                     # restored on leaving the inner block
    assert kernels.isa_level() == host[-1]
    kernels.limit_isa("amx")                                     # above the host's best: the host's best
    assert kernels.isa_level() == host[-1]
    assert kernels.amx_available("bf16") == (host[-1] == "amx")
    with pytest.raises(ValueError, match="avx2, avx512"):
        kernels.limit_isa("sse4")
    with pytest.raises(ValueError, match="int8"):
        kernels.amx_available("fp8")


def test_each_installed_copy_builds_in_its_own_folder(monkeypatch, tmp_path):
    """Two copies of the package (two environments, a checkout beside an install) sharing one build folder would
    rebuild the kernels, minutes each time, whenever the other had loaded them."""
    name = kernels.build_name()
    assert name == kernels.build_name() and name.startswith("musicgen_kernels_")
    monkeypatch.setattr(kernels, "HERE", tmp_path)
    assert kernels.build_name() != name


def test_a_killed_build_does_not_hang_the_next_load(tmp_path, monkeypatch):
    """PyTorch marks a build in progress with a `lock` file and waits, with no limit, for it to go; a killed build
    leaves it behind (a CI run hung on one). A copy of the built kernels with such a file loads, and the file goes."""
    import torch.utils.cpp_extension as ext

    kernel_or_skip("int8_gemv")
    built = Path(ext._get_build_directory(kernels.build_name(), verbose=False))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("MUSICGEN_NO_KERNELS", raising=False)
    copy = Path(ext._get_build_directory(kernels.build_name(), verbose=False))
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("lock", "*.flock"), dirs_exist_ok=True)
    (copy / "lock").touch()
    code = "import sys; from musicgen.accel import kernels; sys.exit(kernels.fused_decoder() is None)"
    # a rebuild, if the copy needs one, takes a few minutes at most; the bug waits forever
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "lock file of an unfinished kernel build" in run.stderr
    assert not (copy / "lock").exists()


def awkward_weights(n: int, k: int, seed: int) -> torch.Tensor:
    """Rows of different ranges, plus an all-zero row, a row of tiny values and exact rounding ties."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    w[0] = 0.0
    w[1] = 1e-30 * torch.randn(k, generator=g)
    w[2] = (torch.arange(k) % 14 - 7) * 0.5 + 0.25    # int4: group max 3.5 -> step 0.5, so +-0.25 are half steps
    w[2, ::32] = 3.5
    return w


@pytest.mark.parametrize("n,k", [(3, 64), (33, 1344)])
def test_quantisers_and_dequantiser_are_bitwise_the_references(level, n, k):
    """One path at every level (AVX2): int8 and int4 quantisers bitwise quant.py's Python references, the int4
    dequantiser bitwise the float32 weight and its bfloat16 rounding."""
    w = awkward_weights(n, k, seed=n + k)
    q, s = kernels.int8_quantize()(w)
    ref_q, ref_s = quantize_per_channel_reference(w)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    q, s = kernels.int8_quantize()(w[:, :k - 3])                 # rows with a remainder after blocks of 32
    ref_q, ref_s = quantize_per_channel_reference(w[:, :k - 3])
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    packed, scales = kernels.int4_quantize()(w)
    ref_packed, ref_scales = quantize_int4_weight_reference(w)
    assert torch.equal(packed, ref_packed) and torch.equal(scales, ref_scales)
    dense = dequantize_int4_weight(packed, scales)
    assert torch.equal(kernels.int4_dequant()(packed, scales, False), dense)
    assert torch.equal(kernels.int4_dequant()(packed, scales, True), dense.bfloat16())


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_lstm_layer_equals_torch_lstm(level, batch):
    """Two layers of 40 units (40 = 32 + 8: vector remainders), 7 steps, from a given state."""
    torch.manual_seed(batch)
    lstm = torch.nn.LSTM(24, 40, num_layers=2)
    x, h0, c0 = torch.randn(7, batch, 24), torch.randn(2, batch, 40), torch.randn(2, batch, 40)
    with torch.no_grad():
        ref_y, (ref_h, ref_c) = lstm(x, (h0, c0))
        y = x
        for i in range(2):
            w_ih, w_hh = getattr(lstm, f"weight_ih_l{i}"), getattr(lstm, f"weight_hh_l{i}")
            bias = getattr(lstm, f"bias_ih_l{i}") + getattr(lstm, f"bias_hh_l{i}")
            xw = (y.reshape(-1, y.shape[-1]) @ w_ih.t() + bias).view(7, batch, 160)
            y, h, c = kernels.lstm_layer()(xw, w_hh, h0[i], c0[i])
            torch.testing.assert_close(h, ref_h[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(c, ref_c[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5)


# -- the fused decoder step ----------------------------------------------------------------------------------
D, HEADS, FFN, EPS, MAX_LEN, TEXT = 128, 2, 256, 1e-5, 12, 5   # head size 64, as every published MusicGen


def decoder_layers(weights: str, cross: bool, seed: int) -> list[dict]:
    """Two layers of random norms and linears (qkv, out, fc1, fc2(, cross q, cross out)), each linear as
    (kind, weight, scales, bias) for FusedDecoder.add_layer and its float64 weight as "w64"."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3 * D, D), (D, D), (FFN, D), (D, FFN)] + ([(D, D), (D, D)] if cross else [])
    layers = []
    for _ in range(2):
        norms = [t for _ in range(3 if cross else 2) for t in (1 + 0.1 * torch.randn(D, generator=g),
                                                                0.1 * torch.randn(D, generator=g))]
        linears = []
        for n, k in shapes:
            w, b = torch.randn(n, k, generator=g) / math.sqrt(k), 0.1 * torch.randn(n, generator=g)
            if weights == "int8":
                q, s = quantize_per_channel_reference(w)
                linears.append(("int8", q, s, b, q.double() * s.double()[:, None]))
            elif weights == "int4":
                packed, s = quantize_int4_weight_reference(w)
                linears.append(("int4", packed, s, b, dequantize_int4_weight(packed, s).double()))
            else:
                wd = w.to(DENSE[weights])
                linears.append(("dense", wd, None, b, wd.double()))
        layers.append({"norms": norms, "linears": linears})
    return layers


def random_cache(dtype: str, rows: int, g: torch.Generator) -> torch.Tensor:
    """(rows, heads, MAX_LEN, 64) of random keys or values; int8 rows: 64 codes and their float32 scale."""
    if dtype != "int8":
        return torch.randn(rows, HEADS, MAX_LEN, D // HEADS, generator=g).to(DENSE[dtype])
    codes = torch.randint(-127, 128, (rows, HEADS, MAX_LEN, D // HEADS), dtype=torch.int8, generator=g)
    scales = (0.5 + torch.rand(rows, HEADS, MAX_LEN, 1, generator=g)) / 127
    return torch.cat([codes, scales.view(torch.int8)], dim=-1)


def cache_values(cache: torch.Tensor) -> torch.Tensor:
    """A cache as float64 (rows, heads, length, 64)."""
    if cache.dtype != torch.int8:
        return cache.double()
    hd = D // HEADS
    return cache[..., :hd].double() * cache[..., hd:].contiguous().view(torch.float32).double()


def reference_step(layers, act: str, x, positions, caches, text, text_bias, tol: float):
    """One decoding step of the decoder layers (musicgen/lm.py's eager path for one position) in float64. Row r
    attends to positions 0..positions[r] of the caches as the kernel left them (its keys and values of this step
    included, checked here against this computation's: equal to the cache's rounding, plus `tol` of their
    largest value); int4 products see their rows quantised as the kernel's."""
    def linear(i, h):
        kind, _, _, b, w64 = layer["linears"][i]
        h = quantize_activations(h.float()).double() if kind == "int4" else h
        return h @ w64.t() + b.double()

    def attend(q, k, v, bias):   # (H, hd) against (H, n, hd) -> (H * hd)
        scores = (q[:, None] @ k.transpose(-1, -2))[:, 0] / math.sqrt(D // HEADS) + bias
        return (torch.softmax(scores, dim=-1)[:, None] @ v)[:, 0].reshape(-1)

    x = x.double()
    for i, layer in enumerate(layers):
        n = [t.double() for t in layer["norms"]]
        k_cache, v_cache = (cache_values(c[i]) for c in caches)
        q, k, v = linear(0, F.layer_norm(x, (D,), n[0], n[1], EPS)).split(D, dim=-1)
        rows = []
        for r, pos in enumerate(positions):
            for new, cache in ((k[r], k_cache), (v[r], v_cache)):   # what the kernel wrote: within its rounding
                written = cache[r, :, pos].reshape(-1)
                step = written.abs().max() / 127 if caches[0][i].dtype == torch.int8 else written.abs().max() / 256
                assert (written - new).abs().max() <= step + tol * new.abs().max()
            rows.append(attend(q[r].view(HEADS, -1), k_cache[r, :, :pos + 1], v_cache[r, :, :pos + 1], 0))
        x = x + linear(1, torch.stack(rows))
        if len(n) == 6:
            q = linear(4, F.layer_norm(x, (D,), n[4], n[5], EPS))
            tk, tv = (cache_values(t[i]) for t in text)
            rows = [attend(q[r].view(HEADS, -1), tk[r], tv[r], text_bias[r].double()) for r in range(len(x))]
            x = x + linear(5, torch.stack(rows))
        h = linear(2, F.layer_norm(x, (D,), n[2], n[3], EPS))
        x = x + linear(3, F.gelu(h) if act == "gelu" else F.relu(h))
    return x


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "float16", "int8", "int4"])
@pytest.mark.parametrize("cache", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize("cross", [True, False])
def test_fused_decoder_step_equals_the_layer_step(level, weights, cache, cross):
    """Two layers, one step: 3 rows at their own positions (0 included), then 6 rows at one position (where int8,
    int4 and bfloat16 products take AMX tiles); keys and values written at each row's position; text models with
    a text bias that masks a padded position. Each of the 3 rows alone gives bitwise its batched result."""
    act = "gelu" if cross else "relu"   # MusicGen's activation with text, the other one without
    layers = decoder_layers(weights, cross, seed=len(weights) + len(cache))
    decoder = kernels.fused_decoder()(D, HEADS, FFN, EPS, act)
    for layer in layers:
        kinds, ws, scales, biases, _ = zip(*layer["linears"])
        decoder.add_layer(layer["norms"], list(kinds), list(ws), list(scales), list(biases))
    assert decoder.num_layers == 2
    g = torch.Generator().manual_seed(7)
    for positions, rows in (([5, 0, 9], 3), ([7], 6)):
        caches = [[random_cache(cache, rows, g) for _ in layers] for _ in range(2)]   # keys, values per layer
        text = [[random_cache(cache, rows, g)[:, :, :TEXT] for _ in layers] for _ in range(2)] if cross else [[], []]
        text_bias = torch.zeros(rows, TEXT)
        text_bias[0, -1] = -math.inf                                  # row 0's text is one token shorter
        x = torch.randn(rows, D, generator=g)
        before = [[c.clone() for c in cs] for cs in caches]
        y = decoder.step(x, positions, *caches, *text, text_bias if cross else None)
        pos = positions * rows if len(positions) == 1 else positions
        tol = 2e-2 if weights == "int4" else 1e-4   # int4: an activation code can round the other way
        ref = reference_step(layers, act, x, pos, caches, text, text_bias, tol)
        torch.testing.assert_close(y.double(), ref, atol=tol * ref.std().item(), rtol=0)
        if rows == 3:
            for r in range(rows):
                alone = decoder.step(x[r:r + 1], [pos[r]], *[[c[r:r + 1].clone() for c in cs] for cs in before],
                                     *[[t[r:r + 1] for t in ts] for ts in text],
                                     text_bias[r:r + 1] if cross else None)
                assert torch.equal(alone, y[r:r + 1]), f"row {r}"
