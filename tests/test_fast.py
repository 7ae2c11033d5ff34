"""Fast paths measured against the exact float32 path: bfloat16, int8 and int4 weight-only, compiled step."""
from __future__ import annotations

import pytest
import torch

import musicgen
from musicgen import lm as lm_mod
from conftest import kernel_or_skip
from musicgen.accel.quant import (Int4Linear, Int8Linear, dequantize_int4_weight, quantize_int4_weight,
                            quantize_per_channel)

PROMPTS = ["80s pop track with bassy drums and synth", "lofi"]
# error of the guided logits relative to their spread, on the tiny random model (measured: see test output)
TOLERANCE = {"bfloat16": 0.05, "float16": 0.01, "int8": 0.08, "int4": 0.12}   # measured 0.025, 0.004, 0.026, 0.051


def relative_error(model, ref):
    codes = torch.randint(0, 65, (2, 4, 20), generator=torch.Generator().manual_seed(0))

    def logits(m):
        states, mask = m.encode_text(PROMPTS)
        with torch.inference_mode():
            return m.lm(codes.to(m.device), m.lm.cross_kv(states.to(m.dtype)),
                        m.lm.cross_bias(mask, m.dtype)).float().cpu()

    a, b = logits(model), logits(ref)
    return ((a - b).abs().max() / b.std()).item()


@pytest.fixture(scope="module")
def fast_models(ckpt_dir):
    return {"bfloat16": musicgen.load(ckpt_dir, dtype="bfloat16"), "float16": musicgen.load(ckpt_dir, dtype="float16"),
            "int8": musicgen.load(ckpt_dir, quantize="int8")}


@pytest.mark.parametrize("mode", ["bfloat16", "float16", "int8"])
def test_logits_within_tolerance_of_float32(model, fast_models, mode):
    err = relative_error(fast_models[mode], model)
    print(f"{mode}: max |logit error| / std = {err:.4f}")
    assert err < TOLERANCE[mode]


@pytest.mark.parametrize("mode", ["bfloat16", "float16", "int8"])
def test_fast_generation_is_well_formed(model, fast_models, mode):
    m = fast_models[mode]
    codes = m.generate_codes(PROMPTS, duration=0.4, seed=0)
    assert codes.shape == (2, 4, 20) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 64
    greedy = m.generate_codes(PROMPTS, duration=0.4, top_k=1)
    agree = (greedy == model.generate_codes(PROMPTS, duration=0.4, top_k=1)).float().mean().item()
    assert agree > 0.8          # greedy paths mostly agree with float32 (ties in a tiny random model may differ)
    audio = m.decode(codes)
    assert audio.dtype == torch.float32 and torch.isfinite(audio).all()


def test_int8_layers_replace_every_linear(fast_models):
    m = fast_models["int8"]
    linears = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    int8 = [n for n, mod in m.named_modules() if isinstance(mod, Int8Linear)]
    assert not linears
    assert any(n.startswith("lm.") for n in int8) and any(n.startswith("text_encoder.") for n in int8)
    assert m.lm.layers[0].fc1.weight.dtype == torch.int8


def test_int8_linear_equals_dequantised_matmul():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=True)
    q, scales = quantize_per_channel(lin.weight)
    assert (q.float() * scales[:, None] - lin.weight).abs().max() <= scales.max() / 2 + 1e-7
    x = torch.randn(3, 5, 64)
    for dtype in (torch.float32, torch.bfloat16):
        m = Int8Linear.from_linear(lin, dtype)
        ref = x.to(dtype).float() @ (q.float() * m.scales.float()[:, None]).t() + m.bias.float()
        torch.testing.assert_close(m(x.to(dtype)).float(), ref, atol=0.05, rtol=0.02)


def kernel_path(monkeypatch, name: str, path: str, tiles: str):
    """The kernel `name` with one code path allowed: "amx" (AMX tiles of kind `tiles` where the shape suits
    them), "avx512"/"vnni" (level avx512_vnni) or "avx2" (level avx2)."""
    import musicgen.accel.kernels as kernels

    kernel = kernel_or_skip(name)
    kernels.limit_isa({"amx": "amx", "avx2": "avx2"}.get(path, "avx512_vnni"))   # conftest lifts the cap
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
    16), else the AVX-512 kernel (blocks of 6, 4, 2, 1 rows over chunks of K, four accumulators per row; level
    avx512_vnni), and AVX2 (level avx2)."""
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
    if not kernels.amx_available("bf16"):
        pytest.skip("this CPU (or kernel) has no AMX bfloat16 tiles")
    g = torch.Generator().manual_seed(1)
    x, s = torch.randn(16, 4096, generator=g), torch.rand(48, generator=g)
    q = torch.randint(-127, 128, (48, 4096), dtype=torch.int8, generator=g)
    w = q.double() * s.double()[:, None]
    err = lambda y: (y.double() - x.double() @ w.t()).abs().max().item()  # noqa: E731
    tiles = kernel(x, q, s, None)
    kernels.limit_isa("avx512_vnni")
    assert not torch.equal(tiles, kernel(x, q, s, None))
    assert err(tiles) < 3 * err(x @ w.float().t())
    assert err(tiles) * 1000 < err(x.bfloat16().float() @ w.float().t())


@pytest.mark.parametrize("amx", [False, True])
def test_int8_linear_without_the_kernel_agrees(monkeypatch, amx):
    """The fallback (PyTorch's kernels, float32 activations here) and the kernel compute the same layer: to
    float rounding with float32 activations, on AVX-512 rows or (12 rows) on AMX tiles."""
    import musicgen.accel.quant as quant

    kernel_or_skip("int8_gemv")
    quant.kernels.limit_isa(None if amx else "avx512_vnni")   # conftest lifts the cap
    lin = torch.nn.Linear(256, 96)
    m = Int8Linear.from_linear(lin, torch.float32)
    x = torch.randn(4, 3, 256)
    with torch.inference_mode():
        fast = m(x)
        monkeypatch.setattr(quant, "int8_gemv", lambda: None)
        slow = m(x)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def _compiled(folder, monkeypatch, backend="aot_eager", mode=None, gemv=None, **kw):
    """A model whose decoding step is torch.compile'd: loaded with the layer loop (MUSICGEN_FUSED=0), since
    compile() keeps a fused CPU decoder where one is attached (float32 too, on CPUs where it applies)."""
    monkeypatch.setenv("MUSICGEN_FUSED", "0")
    m = musicgen.load(folder, **kw).compile(mode=mode, backend=backend, gemv=gemv)
    assert m.lm.fused is None and m._compiled_step is not None
    return m


def test_compiled_step_equals_eager(ckpt_dir, model, monkeypatch):
    m = _compiled(ckpt_dir, monkeypatch)   # aot_eager: graph capture with static shapes, no C++ toolchain run
    for prompts in (PROMPTS, ["a much longer prompt about jazz, brushed drums and an upright bass", "x"]):
        assert torch.equal(m.generate_codes(prompts, duration=0.3, top_k=1),
                           model.generate_codes(prompts, duration=0.3, top_k=1))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_reads_a_growing_window_with_one_graph(ckpt_dir, model, monkeypatch, backend, capsys):
    """The compiled step attends over a bucketed window of the cache: with buckets of 8 positions a 0.6 s
    generation crosses four windows, through one graph per batch size (the window length is dynamic)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(lm_mod, "WINDOW_BUCKET", 8)
    torch._dynamo.reset()   # compiled code is cached per function: count this test's graphs from none
    m = _compiled(ckpt_dir, monkeypatch, backend)
    graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(m.generate_codes(PROMPTS, duration=0.6, top_k=1),
                       model.generate_codes(PROMPTS, duration=0.6, top_k=1))
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert "CUDA graphs are not used" not in capsys.readouterr().err   # the default mode asks for none
    assert lm_mod.window(30, 2048) == 32 and lm_mod.window(32, 2048) == 32 and lm_mod.window(2047, 2048) == 2048


@pytest.mark.parametrize("gemv", [False, True])   # gemv passes the mode as options of its own
def test_compile_says_when_cuda_graphs_are_not_used(ckpt_dir, model, monkeypatch, capsys, gemv):
    """Inductor tells why it skips CUDA graphs only under TORCH_LOGS=cudagraphs, and without them a GPU step is
    bound by kernel launches: the first compiled step says so in one line. On CPU a mode that records CUDA
    graphs cannot record any, so the line must appear there (the inductor test above checks that the default
    mode, which asks for none, stays quiet); the codes are eager's either way."""
    torch._dynamo.reset()
    m = _compiled(ckpt_dir, monkeypatch, backend="inductor", mode="reduce-overhead", gemv=gemv)
    codes = m.generate_codes(PROMPTS, duration=0.3, top_k=1)
    err = capsys.readouterr().err
    assert "compiled the decoding step" in err and "CUDA graphs are not used for the decoding step" in err
    assert torch.equal(codes, model.generate_codes(PROMPTS, duration=0.3, top_k=1))


# -- compiled steps with their few-row products as reductions (compile(gemv=True), lm.row_linear) ----------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_products_replace_few_row_linears(dtype, monkeypatch):
    """Under RowProducts, F.linear of 1..ROW_PRODUCT_ROWS rows runs as row_linear (float32 sums, rounded once
    to the input's dtype) and agrees with F.linear; more rows, and every other function, pass through."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 160, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    calls = []
    real = lm_mod.row_linear
    monkeypatch.setattr(lm_mod, "row_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    for shape in ((1, 160), (2, 1, 160), (4, 2, 160), (9, 160), (3, 5, 160)):
        x = torch.randn(*shape, generator=g).to(dtype)
        for b in (None, bias):
            with lm_mod.RowProducts():
                y = torch.nn.functional.linear(x, weight, b)
                z = torch.relu(x)                                            # not a linear: untouched
                assert torch.equal(torch.nn.functional.linear(input=x, weight=weight, bias=b), y)
            ref = (x.double() @ weight.double().t() + (0 if b is None else b.double()))
            assert y.shape == ref.shape and y.dtype == dtype and torch.equal(z, torch.relu(x))
            tol = 1e-5 if dtype == torch.float32 else 8e-3                   # bfloat16: one rounding of the output
            assert ((y.double() - ref).abs() / ref.abs().clamp(min=1)).max() < tol
    rows = [s.numel() // 160 for s in calls]
    assert rows == [1, 1, 1, 1, 2, 2, 2, 2, 8, 8, 8, 8]                      # 9 and 15 rows took F.linear


def _products_per_step(lm) -> int:
    """Linear products in one decoding step: each layer's (fused._layer_parts lists them) and the heads."""
    from musicgen.accel import fused

    return sum(len(fused._layer_parts(layer)[1]) for layer in lm.layers) + len(lm.heads)


def _graph_targets(monkeypatch):
    """A torch.compile backend that runs the captured graph as it is and records what it calls."""
    seen = []

    def spy(gm, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes if node.op in ("call_function", "call_method"))
        return gm.forward
    return spy, seen


@pytest.mark.parametrize("gemv", [False, True])
def test_compiled_gemv_step_traces_products_as_reductions(ckpt_dir, model, monkeypatch, gemv):
    """compile(gemv=True): the captured step holds no linear call (every product of the step is a
    multiply-and-sum for inductor to write); without it the same step holds one per layer linear and head.
    Either way the step gives eager decoding's codes."""
    torch._dynamo.reset()
    spy, seen = _graph_targets(monkeypatch)
    m = _compiled(ckpt_dir, monkeypatch, backend=spy, gemv=gemv)
    assert m.lm.row_products is gemv
    assert torch.equal(m.generate_codes(PROMPTS, duration=0.3, top_k=1),
                       model.generate_codes(PROMPTS, duration=0.3, top_k=1))
    linears = seen.count(torch.nn.functional.linear)
    expected = _products_per_step(m.lm)
    assert linears == (0 if gemv else expected)
    assert seen.count("sum") == (expected if gemv else 0)                   # row_linear's .sum(-1)
    stored = sum("inductor_force_stride_order" in str(t) for t in seen)     # each product's rows stored first
    assert stored == (expected if gemv else 0)


def test_compile_gemv_from_the_environment(ckpt_dir, monkeypatch):
    monkeypatch.setenv("MUSICGEN_COMPILE_GEMV", "1")
    assert _compiled(ckpt_dir, monkeypatch).lm.row_products
    monkeypatch.setenv("MUSICGEN_COMPILE_GEMV", "0")
    assert not _compiled(ckpt_dir, monkeypatch).lm.row_products


def test_compiled_gemv_step_with_inductor_equals_eager(ckpt_dir, model, monkeypatch):
    """Inductor compiles the reductions (C++ on CPU, where coordinate-descent tuning has nothing to tune), and
    the codes are eager's, greedy and sampled."""
    torch._dynamo.reset()
    m = _compiled(ckpt_dir, monkeypatch, backend="inductor", gemv=True)
    for kw in (dict(top_k=1), dict(seed=2)):
        assert torch.equal(m.generate_codes(PROMPTS, duration=0.3, **kw),
                           model.generate_codes(PROMPTS, duration=0.3, **kw))


def test_compiled_gemv_int8_step_widens_inside_the_reduction(ckpt_dir, monkeypatch):
    """Where no CPU kernel takes an int8 product (as on a GPU), the layer widens its weight and calls F.linear;
    under gemv that widening feeds the reduction, and the codes are those of the same model decoding eagerly."""
    from musicgen.accel import kernels

    kernels.int8_gemv()   # built (or not) before OPS is emptied: building registers the custom ops into it
    monkeypatch.setattr(kernels, "OPS", {})                                  # compiled steps: no custom ops
    monkeypatch.setattr(musicgen.accel.quant, "int8_gemv", lambda: None)          # eager steps: no kernel
    monkeypatch.setenv("MUSICGEN_FUSED", "0")
    eager = musicgen.load(ckpt_dir, quantize="int8")
    eager.cache_dtype = eager.kv_dtype = None   # the compiled step's cache is in the model's dtype
    torch._dynamo.reset()
    spy, seen = _graph_targets(monkeypatch)
    m = musicgen.load(ckpt_dir, quantize="int8").compile(backend=spy, gemv=True)
    assert m.dtype == torch.float32   # float32 activations: the fallback widens and calls F.linear
    assert torch.equal(m.generate_codes(PROMPTS, duration=0.3, top_k=1),
                       eager.generate_codes(PROMPTS, duration=0.3, top_k=1))
    assert torch.nn.functional.linear not in seen
    assert seen.count("sum") == _products_per_step(m.lm)                     # each one a reduction


@pytest.mark.parametrize("static", ["compiled", "graphed"])
def test_static_steps_equal_eager_for_melody_models(melody_ckpt_dir, melody_model, monkeypatch, static):
    """Prefix-conditioned checkpoints: the static-shape step (compiled, or the one CUDA graphs record) sees
    positions shifted by the condition tokens."""
    m = (_compiled if static == "compiled" else _graphed)(melody_ckpt_dir, monkeypatch)
    tune = torch.sin(torch.arange(32000) / 32000 * 2 * torch.pi * 440.0)
    for kw in ({}, {"melody": tune, "melody_sample_rate": 32000, "demucs": False}):
        assert torch.equal(m.generate_codes(PROMPTS, duration=0.3, top_k=1, **kw),
                           melody_model.generate_codes(PROMPTS, duration=0.3, top_k=1, **kw))


# -- CUDA graphs of the eager step (musicgen/graphs.py); without CUDA, the same static step run directly -------
def _graphed(folder, monkeypatch, **kw):
    monkeypatch.setenv("MUSICGEN_FUSED", "0")   # float32 models on CPU otherwise decode in the fused decoder
    return musicgen.load(folder, **kw).cuda_graphs(capture=False)


def test_graphed_step_equals_eager(ckpt_dir, model, monkeypatch):
    """Static buffers, window buckets (8 positions here: a 0.6 s generation crosses five), text buckets and batch
    sizes: the step the graphs record gives eager decoding's codes, greedy and sampled."""
    monkeypatch.setattr(lm_mod, "WINDOW_BUCKET", 8)
    m = _graphed(ckpt_dir, monkeypatch)
    long = ["a much longer prompt about jazz, brushed drums and an upright bass", "x"]
    for prompts, kw in ((PROMPTS, dict(top_k=1)), (["techno", "epic orchestra"], dict(top_k=1)),
                        (long, dict(top_k=1)), (PROMPTS, dict(seed=3)),
                        (PROMPTS, dict(seed=4, top_p=0.9)), (["solo"], dict(top_k=1))):
        assert torch.equal(m.generate_codes(prompts, duration=0.6, **kw),
                           model.generate_codes(prompts, duration=0.6, **kw))
    # rows 2 (one prompt with guidance) at the end: its caches replaced the 4-row ones and their recordings
    assert sorted(m._graphs.graphs) == [(2, 32, w) for w in (8, 16, 24, 32, 40)]
    recorded = m._graphs.recorded
    m.generate_codes(["again"], duration=0.6, top_k=1)
    assert m._graphs.recorded == recorded                                 # the same shapes: replayed


@torch.inference_mode()
def test_step_graphs_take_each_generations_inputs(ckpt_dir, monkeypatch):
    """Text keys, values and mask are copied into the recorded step's buffers at each generation's start; codes,
    position and window at each step. Here each changes between calls, strongly (keys scaled by 30)."""
    m = _graphed(ckpt_dir, monkeypatch)
    caches = m._static_caches(4)
    cond = m._conditions(*m.encode_text(PROMPTS), None, True)
    window = m._window_mask(caches, 3)[..., :lm_mod.window(3, caches[0].k.shape[2])]
    g = torch.Generator().manual_seed(0)
    for scale, masked in ((1.0, 0), (30.0, 0), (30.0, 3)):
        kv = [(k * scale, v * scale) for k, v in cond.cross_kv]
        bias = cond.cross_bias.clone()
        bias[..., :masked] = torch.finfo(bias.dtype).min
        m._graphs.start(caches, kv, bias)
        for p in (0, 1, 2):
            codes, pos = torch.randint(0, 64, (4, 4, 1), generator=g), torch.tensor([p])
            out = m._graphs(codes, pos, window)     # both write the same key and value at pos
            assert torch.equal(out, m.lm.step(codes, pos, kv, bias, caches, window))
    assert m._graphs.recorded == 1


def test_graphed_step_streams_and_continues(ckpt_dir, model, monkeypatch):
    m = _graphed(ckpt_dir, monkeypatch)
    audio = model.generate(PROMPTS, duration=0.3, top_k=1)
    kw = dict(duration=0.6, top_k=1, prompt_audio=audio, prompt_sample_rate=model.sample_rate)
    assert torch.equal(m.generate_codes(PROMPTS, **kw), model.generate_codes(PROMPTS, **kw))
    chunks = list(m.stream(PROMPTS, duration=0.5, chunk_seconds=0.2, top_k=1))
    torch.testing.assert_close(torch.cat(chunks, dim=-1), model.generate(PROMPTS, duration=0.5, top_k=1),
                               rtol=0, atol=1e-4)


def test_graphs_record_again_when_weights_move(ckpt_dir, monkeypatch):
    """A graph reads weights at the addresses it was recorded with: a replaced parameter records again (at the
    next generation); an in-place copy keeps the recordings."""
    m = _graphed(ckpt_dir, monkeypatch)
    m.generate_codes(PROMPTS, duration=0.3, top_k=1)
    recorded = m._graphs.recorded
    fc1 = m.lm.layers[0].fc1
    with torch.no_grad():
        fc1.weight.copy_(fc1.weight * 0.5)
    m.generate_codes(PROMPTS, duration=0.3, top_k=1)
    assert m._graphs.recorded == recorded
    fc1.weight = torch.nn.Parameter(fc1.weight * 2.0, requires_grad=False)
    codes = m.generate_codes(PROMPTS, duration=0.3, top_k=1)
    assert m._graphs.recorded > recorded
    assert torch.equal(codes, m.cuda_graphs(False).generate_codes(PROMPTS, duration=0.3, top_k=1))


def test_compile_takes_precedence_over_graphs(ckpt_dir, model, monkeypatch):
    m = _graphed(ckpt_dir, monkeypatch).compile(backend="aot_eager")
    assert torch.equal(m.generate_codes(PROMPTS, duration=0.3, top_k=1),
                       model.generate_codes(PROMPTS, duration=0.3, top_k=1))
    assert m._graphs.recorded == 0 and m.__dict__.get("_warmed")   # the compiled step ran, the graphs did not


def test_copied_graphed_model_records_its_own(ckpt_dir, model, monkeypatch):
    import copy

    m = _graphed(ckpt_dir, monkeypatch)
    m.generate_codes(PROMPTS, duration=0.3, top_k=1)
    twin = copy.deepcopy(m)
    assert twin._graphs.lm is twin.lm and not twin._graphs.graphs
    assert torch.equal(twin.generate_codes(PROMPTS, duration=0.3, top_k=1),
                       model.generate_codes(PROMPTS, duration=0.3, top_k=1))
    assert twin._graphs._caches is not m._graphs._caches


def test_graph_recording_failure_leaves_the_direct_step(ckpt_dir, model, monkeypatch, capsys):
    from musicgen.graphs import StepGraphs

    m = _graphed(ckpt_dir, monkeypatch)
    m._graphs = StepGraphs(m.lm, capture=True)           # what cuda_graphs() makes on a GPU

    def fail(self, step):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(StepGraphs, "_capture", fail)
    for _ in range(2):
        assert torch.equal(m.generate_codes(PROMPTS, duration=0.3, top_k=1),
                           model.generate_codes(PROMPTS, duration=0.3, top_k=1))
    err = capsys.readouterr().err
    assert err.count("musicgen: recording a CUDA graph failed (RuntimeError: operation not permitted when "
                     "stream is capturing); decoding steps run without graphs") == 1


def test_cuda_graphs_need_a_cuda_model_without_the_fused_decoder(ckpt_dir, model, monkeypatch):
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device, not cpu"):
        musicgen.load(ckpt_dir).cuda_graphs()
    if model.lm.fused is not None:
        with pytest.raises(ValueError, match="fused CPU decoder"):
            model.cuda_graphs(capture=False)
    monkeypatch.setenv("MUSICGEN_CUDA_GRAPHS", "1")   # only CUDA models take it at load
    assert musicgen.load(ckpt_dir)._graphs is None


def test_bad_precision_options(ckpt_dir):
    with pytest.raises(ValueError, match="quantize"):
        musicgen.load(ckpt_dir, quantize="int3")
    with pytest.raises(ValueError, match="dtype"):
        musicgen.load(ckpt_dir, dtype="float8")


def _cudnn_flags(device, compiled=False):
    with lm_mod.attention_backends(torch.device(device), compiled=compiled):
        return torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(), \
            torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()


def test_attention_backends_keep_eager_cuda_attention_off_cudnn(monkeypatch):
    """The switches are process-wide flags, so this runs without a GPU: the context turns cuDNN attention
    off for CUDA and leaves the rest on, does nothing elsewhere, and puts the flags back."""
    monkeypatch.delenv("MUSICGEN_CUDNN_ATTENTION", raising=False)
    before = _cudnn_flags("cpu")
    assert before[0]                                                   # PyTorch's default: cuDNN allowed
    assert _cudnn_flags("cuda") == (False, True, True, True)
    assert _cudnn_flags("cuda", compiled=True) == before              # compiled steps keep PyTorch's choice
    assert torch.backends.cuda.cudnn_sdp_enabled()                    # restored on exit
    monkeypatch.setenv("MUSICGEN_CUDNN_ATTENTION", "0")
    assert _cudnn_flags("cuda", compiled=True) == (False, True, True, True)
    monkeypatch.setenv("MUSICGEN_CUDNN_ATTENTION", "1")
    assert _cudnn_flags("cuda") == before


def test_decoding_and_serving_attention_runs_inside_the_backend_context(ckpt_dir, monkeypatch):
    """Every attention call of an eager generation (text encoder, prefill, steps) and of the service's
    batched step runs with cuDNN attention off when the context is the CUDA one. On CPU the device is
    faked: the context under test is given 'cuda' whatever the model's device."""
    from musicgen.batching import Request, Scheduler

    real = lm_mod.attention_backends
    monkeypatch.delenv("MUSICGEN_CUDNN_ATTENTION", raising=False)
    monkeypatch.setattr(lm_mod, "attention_backends",
                        lambda device, compiled=False: real(torch.device("cuda"), compiled))
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setenv("MUSICGEN_FUSED", "0")   # the PyTorch layer loop, as on CUDA (the fused decoder is CPU's)
    model = musicgen.load(ckpt_dir)
    layers = len(model.lm.layers)
    model.generate_codes(PROMPTS, duration=0.2, top_k=1)               # 10 frames: 13 decoding positions
    assert len(seen) >= 2 * layers * 13 and not any(seen)
    seen.clear()
    sched = Scheduler(model, max_batch=2)
    req = sched.submit(Request("lofi", frames=5, params=musicgen.sampling.SamplingParams(top_k=1)))
    for _ in range(100):
        if req.done.is_set():
            break
        sched.step()
    assert req.status == "done"
    assert len(seen) >= 2 * layers * 5 and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decoding_attention_is_not_cudnn():
    """On the GPU itself: a bfloat16 one-query step inside the context picks flash or memory-efficient
    attention, whatever PyTorch would pick outside it."""
    q = torch.randn(2, 24, 1, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 24, 37, 64, device="cuda", dtype=torch.bfloat16)
    with lm_mod.attention_backends(torch.device("cuda")):
        choice = torch._fused_sdp_choice(q, k, k)
    assert choice in (int(torch.nn.attention.SDPBackend.FLASH_ATTENTION),
                      int(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_record_and_equal_eager(ckpt_dir, model, dtype, monkeypatch, capsys):
    monkeypatch.setattr(lm_mod, "WINDOW_BUCKET", 8)   # several windows, so several graphs
    eager = musicgen.load(ckpt_dir, device="cuda", dtype=dtype)
    m = musicgen.load(ckpt_dir, device="cuda", dtype=dtype).cuda_graphs()
    for kw in (dict(top_k=1), dict(seed=0)):
        codes, ref = m.generate_codes(PROMPTS, duration=0.6, **kw), eager.generate_codes(PROMPTS, duration=0.6, **kw)
        if dtype == "float32":   # the graphs' masked window and eager attention differ by rounding only
            assert torch.equal(codes, ref)
        else:                    # bfloat16 rounding may flip a near tie; stale inputs would change most codes
            assert codes.shape == ref.shape and (codes == ref).float().mean() > 0.9
    if dtype == "float32":
        assert torch.equal(m.generate_codes(PROMPTS, duration=0.6, top_k=1).cpu(),
                           model.generate_codes(PROMPTS, duration=0.6, top_k=1))
    assert m._graphs.capture and m._graphs.recorded == len(m._graphs.graphs) >= 4
    assert "recording a CUDA graph failed" not in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kw", [dict(dtype="float32"), dict(dtype="bfloat16"), dict(dtype="bfloat16", quantize="int8")])
def test_cuda_compiled_gemv_step_equals_eager(ckpt_dir, kw, capsys):
    """compile(gemv=True) on a GPU: Triton reductions tuned by coordinate descent, inside CUDA graphs."""
    eager = musicgen.load(ckpt_dir, device="cuda", **kw)
    m = musicgen.load(ckpt_dir, device="cuda", **kw).compile(gemv=True)
    codes, ref = m.generate_codes(PROMPTS, duration=0.4, top_k=1), eager.generate_codes(PROMPTS, duration=0.4, top_k=1)
    if kw["dtype"] == "float32":
        assert torch.equal(codes, ref)
    else:   # 16-bit rounding may flip a near tie
        assert codes.shape == ref.shape and (codes == ref).float().mean() > 0.9
    assert "CUDA graphs are not used" not in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kw", [dict(dtype="bfloat16"), dict(dtype="bfloat16", quantize="int8"),
                                dict(dtype="bfloat16", compile=True)])
def test_cuda_fast_paths_agree_with_cpu_float32(ckpt_dir, model, kw):
    m = musicgen.load(ckpt_dir, device="cuda", **kw)
    assert relative_error(m, model) < TOLERANCE["int8" if "quantize" in kw else "bfloat16"]
    codes = m.generate_codes(PROMPTS, duration=0.4, seed=0)
    assert codes.device.type == "cuda" and codes.shape == (2, 4, 20)


# -- int4 ------------------------------------------------------------------------------------------------
def test_int4_weight_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 192, generator=g) * torch.rand(40, 1, generator=g)   # rows of different ranges
    w[3] = 0.0                                                               # an all-zero row stays zero
    packed, scales = quantize_int4_weight(w)
    assert packed.shape == (40, 96) and packed.dtype == torch.uint8
    assert scales.shape == (40, 6) and scales.dtype == torch.float16
    lo, hi = packed & 15, packed >> 4
    assert lo.min() >= 1 and hi.min() >= 1 and lo.max() <= 15 and hi.max() <= 15   # codes -7..7, offset 8
    back = dequantize_int4_weight(packed, scales)
    err = (back - w).abs().reshape(40, 6, 32).amax(dim=-1)
    assert (err <= scales.float() / 2 + 1e-6).all()                                 # half a step per group
    assert back[3].abs().max() == 0
    with pytest.raises(ValueError, match="divisible by 64"):
        quantize_int4_weight(torch.randn(4, 96))


@pytest.mark.parametrize("path", ["amx", "vnni", "avx2"])
@pytest.mark.parametrize("M,N,K,bias", [(1, 7, 64, True), (2, 64, 256, False), (3, 33, 320, True),
                                        (5, 130, 1024, True), (8, 96, 4096, False), (16, 40, 6144, True),
                                        (4, 16, 64, True), (7, 48, 192, False), (16, 64, 6144, True),
                                        (21, 32, 128, True)])
def test_int4_kernel_equals_quantised_reference(monkeypatch, M, N, K, bias, path):
    """The kernel computes exactly (to float rounding) dequant(W) @ quant8(x): int8 activations per group of 32.
    Every code path: AMX tiles (from 4 rows, N a multiple of 16; more than 16 rows in blocks of 16), AVX-512
    VNNI (level avx512_vnni) and AVX2 (level avx2)."""
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


def test_int4_linear_kernel_and_fallback_agree(monkeypatch):
    """Kernel (int8-quantised activations) and fallback (dequantised weight, float activations) agree to the
    activation rounding; both stay near the float layer they came from."""
    import musicgen.accel.quant as quant

    kernel_or_skip("int4_gemv")
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 96)
    m = Int4Linear.from_linear(lin, torch.float32)
    x = torch.randn(2, 3, 512)
    with torch.inference_mode():
        fast, exact = m(x), lin(x)
        monkeypatch.setattr(quant, "int4_gemv", lambda: None)
        slow = m(x)
    assert fast.shape == slow.shape == (2, 3, 96)
    torch.testing.assert_close(fast, slow, atol=0.02 * slow.std().item(), rtol=0)
    rel = ((slow - exact).std() / exact.std()).item()    # 4-bit weights of a uniform init: measured 0.085
    assert 0 < rel < 0.15


def awkward_weights(N: int, K: int, seed: int) -> torch.Tensor:
    """Random rows of different ranges, plus an all-zero row, a row of tiny values and exact rounding ties."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) * 3
    w[0] = 0.0
    if N > 1:
        w[1] = 1e-30 * torch.randn(K, generator=g)
    if N > 2:                            # group max 3.5 -> int4 step 0.5: +-0.25, +-0.75 ... are half steps
        w[2] = (torch.arange(K) % 14 - 7) * 0.5 + 0.25
        w[2, ::32] = 3.5
    return w


@pytest.mark.parametrize("N,K", [(1, 64), (3, 64), (33, 320), (96, 4096)])
def test_native_int4_quantiser_is_bitwise_the_reference(N, K):
    import musicgen.accel.kernels as kernels
    from musicgen.accel.quant import quantize_int4_weight_reference

    kernel_or_skip("int4_gemv")
    w = awkward_weights(N, K, N + K)
    packed, scales = kernels.int4_quantize()(w)
    ref_packed, ref_scales = quantize_int4_weight_reference(w)
    assert torch.equal(packed, ref_packed) and torch.equal(scales, ref_scales)
    assert torch.equal(quantize_int4_weight(w)[0], ref_packed)        # and the layers use it


@pytest.mark.parametrize("N,K", [(1, 8), (3, 37), (33, 320), (96, 4100)])
def test_native_int8_quantiser_is_bitwise_the_reference(N, K):
    import musicgen.accel.kernels as kernels
    from musicgen.accel.quant import quantize_per_channel_reference

    kernel_or_skip("int8_gemv")
    w = awkward_weights(N, K, N * K)
    q, scales = kernels.int8_quantize()(w)
    ref_q, ref_scales = quantize_per_channel_reference(w)
    assert torch.equal(q, ref_q) and torch.equal(scales, ref_scales)
    assert torch.equal(quantize_per_channel(w)[0], ref_q)


@pytest.mark.parametrize("N,K", [(1, 64), (7, 128), (33, 320), (96, 4096)])
def test_int4_dequant_kernel_is_bitwise_the_reference(N, K):
    """The native dequantisation (prefill's weights) gives exactly what the Python reference gives, in float32
    and rounded to bfloat16."""
    import musicgen.accel.kernels as kernels

    kernel_or_skip("int4_gemv")
    g = torch.Generator().manual_seed(N + K)
    packed, scales = quantize_int4_weight(torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) * 10)
    ref = dequantize_int4_weight(packed, scales)
    assert torch.equal(kernels.int4_dequant()(packed, scales, False), ref)
    assert torch.equal(kernels.int4_dequant()(packed, scales, True), ref.bfloat16())


@pytest.mark.parametrize("bf16", [True, False])
def test_quantised_prefill_in_either_precision(monkeypatch, model, fast_models, int4_pair, bf16):
    """Many-row products of quantised layers (prefill) run as bfloat16 products where the CPU makes those fast
    (quant.bf16_gemm_wins), else in float32: both within the mode's tolerance of float32, and the choice is
    really made (the two differ, slightly)."""
    import musicgen.accel.quant as quant

    monkeypatch.setattr(quant, "_BF16_PREFILL", bf16)
    for mode, (m, ref) in {"int8": (fast_models["int8"], model), "int4": (int4_pair[1], int4_pair[0])}.items():
        err = relative_error(m, ref)                       # 2 prompts x 20 positions: 40 rows per product
        print(f"{mode} prefill in {'bfloat16' if bf16 else 'float32'}: max |logit error| / std = {err:.4f}")
        assert err < TOLERANCE[mode]
    from musicgen.accel import kernels

    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 96)
    x = torch.randn(40, 512)
    # int4's fallback has a bfloat16 prefill only through the native dequantiser (MUSICGEN_NO_KERNELS=1: none)
    for cls in (Int8Linear, Int4Linear) if kernels.int4_dequant() is not None else (Int8Linear,):
        layer = cls.from_linear(lin, torch.float32)
        with torch.inference_mode():
            y = layer(x)
            monkeypatch.setattr(quant, "_BF16_PREFILL", not bf16)
            other = layer(x)
            monkeypatch.setattr(quant, "_BF16_PREFILL", bf16)
        gap = ((y - other).abs().max() / other.std()).item()
        assert 0 < gap < 0.02                              # bfloat16 rounding of activations and output


@pytest.fixture(scope="module")
def int4_pair(tmp_path_factory, spm_model):
    """A tiny checkpoint whose LM width (64) fits the int4 layout, loaded in float32 and in int4."""
    from conftest import build_hf_model, save_checkpoint

    folder = save_checkpoint(build_hf_model(lm_dim=64), tmp_path_factory.mktemp("tiny64"), spm_model)
    return musicgen.load(folder), musicgen.load(folder, quantize="int4")


def test_int4_layers(int4_pair):
    _, m = int4_pair
    layer = m.lm.layers[0]
    for lin in (layer.self_attn.qkv, layer.self_attn.out, layer.cross_attn.q, layer.fc1, layer.fc2):
        assert isinstance(lin, Int4Linear) and lin.weight.dtype == torch.uint8
    assert all(isinstance(h, Int8Linear) for h in m.lm.heads)            # output heads stay in 8 bits
    assert not [n for n, mod in m.named_modules() if type(mod) in (torch.nn.Linear,) and n.startswith("lm.")]
    assert any(isinstance(mod, Int8Linear) for mod in m.text_encoder.modules())
    assert m.cache_dtype == torch.bfloat16 and int4_pair[0].cache_dtype is None   # float32 keeps its cache
    # the int8 self-attention cache comes with the fused decoder (without the kernels: bfloat16, as text)
    assert m.kv_dtype == (torch.int8 if m.lm.fused is not None else None) and int4_pair[0].kv_dtype is None


def test_int4_logits_within_tolerance_and_generation_well_formed(int4_pair):
    ref, m = int4_pair
    err = relative_error(m, ref)
    print(f"int4: max |logit error| / std = {err:.4f}")
    assert err < TOLERANCE["int4"]
    codes = m.generate_codes(PROMPTS, duration=0.4, seed=0)
    assert codes.shape == (2, 4, 20) and codes.min() >= 0 and codes.max() < 64
    greedy = m.generate_codes(PROMPTS, duration=0.4, top_k=1)
    agree = (greedy == ref.generate_codes(PROMPTS, duration=0.4, top_k=1)).float().mean().item()
    print(f"int4: greedy agreement with float32 {agree:.2f}")
    assert agree > 0.8
    assert torch.isfinite(m.decode(codes)).all()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_compiled_quantised_step_equals_eager(tmp_path_factory, int4_pair, quantize, monkeypatch, capsys):
    """With the fused CPU decoder, compile() keeps it and says so; without it (MUSICGEN_FUSED=0), a compiled step
    keeps the CPU kernels (registered as custom ops) and gives the eager codes. The compiled step's static cache
    is in the model's dtype (the bfloat16 text keys and int8 cache of quantised models are eager-only), so eager
    decodes over the same float32 caches here."""
    kernel_or_skip("int8_gemv")
    folder = next(tmp_path_factory.getbasetemp().glob("tiny64*"))   # the checkpoint int4_pair wrote
    eager = musicgen.load(folder, quantize=quantize)
    assert eager.lm.fused is not None and eager.compile()._compiled_step is None
    assert "fused CPU decoder is faster" in capsys.readouterr().err
    eager.cache_dtype = eager.kv_dtype = None
    monkeypatch.setenv("MUSICGEN_FUSED", "0")
    compiled = musicgen.load(folder, quantize=quantize).compile(backend="aot_eager")
    assert compiled._compiled_step is not None
    assert torch.equal(compiled.generate_codes(PROMPTS, duration=0.3, top_k=1),
                       eager.generate_codes(PROMPTS, duration=0.3, top_k=1))


@pytest.mark.parametrize("skinny", [True, False])
def test_skinny_linear_both_formulations_equal_linear(monkeypatch, skinny):
    """Whichever product the timing picks on this CPU, SkinnyLinear computes the same layer."""
    import musicgen.accel.quant as quant

    monkeypatch.setattr(quant, "_SKINNY", skinny)
    torch.manual_seed(0)
    for bias in (True, False):
        lin = torch.nn.Linear(96, 40, bias=bias)
        ref = lin(x := torch.randn(2, 1, 96)).detach()
        quant.use_skinny_linear(lin)
        assert type(lin) is quant.SkinnyLinear
        with torch.inference_mode():
            torch.testing.assert_close(lin(x), ref, atol=1e-5, rtol=1e-5)


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

    kernels.limit_isa(None if path == "amx" else "avx512_vnni")
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
    import musicgen.accel.kernels as kernels

    kernels.limit_isa("avx512_vnni")
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(16, 4096, generator=g), torch.randn(48, 4096, generator=g).to(dtype)
    together = native(x, w, None)
    for lo, hi in ((0, 1), (2, 4), (4, 13), (8, 16)):
        assert torch.equal(native(x[lo:hi], w, None), together[lo:hi])


@pytest.mark.parametrize("dtype,rows", [(torch.float32, 8), (torch.float32, 5), (torch.bfloat16, 2),
                                        (torch.bfloat16, 7), (torch.float16, 2), (torch.float16, 8)])
def test_skinny_linear_native_path_equals_linear(monkeypatch, dtype, rows):
    """Where dense_policy picks our kernel (float32 from 4 rows, bfloat16 and float16 up to 8), SkinnyLinear
    calls it and computes F.linear's layer: to float32 rounding, or for 16-bit weights to the rounding of its
    output."""
    import musicgen.accel.quant as quant
    from musicgen.accel import kernels

    native = _dense_or_skip()
    calls = []
    monkeypatch.setattr(kernels, "dense_gemv", lambda: (lambda *a: calls.append(1) or native(*a)))
    monkeypatch.setattr(quant, "_DENSE", (True, True, True, True))
    torch.manual_seed(0)
    for bias in (True, False):
        lin = torch.nn.Linear(96, 40, bias=bias).to(dtype)
        ref = lin(x := torch.randn(rows, 1, 96, dtype=dtype)).detach()
        quant.use_skinny_linear(lin)
        with torch.inference_mode():
            out = lin(x)
        assert out.dtype == dtype and out.shape == ref.shape
        tol = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
               torch.float16: dict(atol=2e-3, rtol=2e-3)}[dtype]
        torch.testing.assert_close(out, ref, **tol)
    assert len(calls) == 2
    monkeypatch.setattr(quant, "_DENSE", (False, False, False, False))    # and not where it is not picked
    with torch.inference_mode():
        lin(x)
    assert len(calls) == 2


# -- fused decoder (musicgen/fused.py) ------------------------------------------------------------------
def _step_logits(m, fused: bool, cache_dtype, steps: int = 12, kv_dtype=None) -> torch.Tensor:
    """Logits of `steps` one-position decoding steps after a 6-position prefill, with the fused decoder on
    or off, from the same codes and conditions: (steps, rows, K, 1, V). cache_dtype: the text keys/values'
    and the self-attention cache's; kv_dtype (torch.int8) the self-attention cache's instead."""
    from musicgen import conditions

    lm = m.lm
    K = lm.cfg.num_codebooks
    codes = torch.randint(0, 64, (4, K, 6 + steps), generator=torch.Generator().manual_seed(1))
    kv = bias = prefix = None
    if lm.cfg.prefix_conditioning:   # melody models: condition tokens before the codes
        prefix = torch.randn(4, 5, lm.cfg.dim, generator=torch.Generator().manual_seed(2))
    else:
        states, mask = m.encode_text(PROMPTS)
        cond = conditions.cross_attention(lm, states, mask, cfg_rows=True)
        kv, bias = cond.cross_kv, cond.cross_bias
        if cache_dtype is not None:
            kv, bias = [(k.to(cache_dtype), v.to(cache_dtype)) for k, v in kv], bias.to(cache_dtype)
    P = 0 if prefix is None else prefix.shape[1]
    saved, lm.fused = lm.fused, (lm.fused if fused else None)
    try:
        with torch.inference_mode():
            caches = lm.new_caches(4, P + 6 + steps, dtype=kv_dtype or cache_dtype)
            lm(codes[:, :, :6], kv, bias, 0, caches, prefix=prefix)
            return torch.stack([lm(codes[:, :, p:p + 1], kv, bias, P + p, caches) for p in range(6, 6 + steps)])
    finally:
        lm.fused = saved


@pytest.fixture(scope="module")
def int8_models(ckpt_dir, melody_ckpt_dir):
    kernel_or_skip("int8_gemv")
    return {"text": musicgen.load(ckpt_dir, quantize="int8"), "melody": musicgen.load(melody_ckpt_dir, quantize="int8")}


@pytest.mark.parametrize("family", ["text", "melody"])
@pytest.mark.parametrize("cache_dtype", [None, torch.bfloat16, torch.float16, torch.int8])
def test_fused_decoder_equals_the_layer_loop(int8_models, family, cache_dtype):
    """One native call per step computes what the Python layer loop computes, text and melody models, with the
    model's float32 cache (to float rounding), a 16-bit cache (float32 arithmetic over 16-bit keys, where
    SDPA also rounds the query and the output to the cache's dtype) and an int8 cache (bfloat16 text keys)."""
    m = int8_models[family]
    assert m.lm.fused is not None
    text, kv = (torch.bfloat16, torch.int8) if cache_dtype == torch.int8 else (cache_dtype, None)
    fused, loop = _step_logits(m, True, text, kv_dtype=kv), _step_logits(m, False, text, kv_dtype=kv)
    err = ((fused - loop).abs().max() / loop.std()).item()
    print(f"{family}, cache {cache_dtype}: fused vs layer loop max |error| / std = {err:.2e}")
    assert err < (1e-5 if cache_dtype is None else 2e-3)   # measured 9e-7, 3e-4 (16-bit) and 4e-5 (int8)


def test_kv_quantize_rows():
    """An int8 cache row: the codes round(x / s) with s = max(max|x|, 1e-12) / 127 (nearest even), s's float32
    bytes after them, as int8 weights are quantised per row (bitwise the reference quantiser); every element
    within s / 2 of its dequantized value, the largest at +-127, zero vectors zero."""
    from musicgen.accel.quant import quantize_per_channel_reference

    x = torch.randn(3, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0] = 0
    x[1, 1, 1, 3] = 2.5 * x[1, 1, 1].abs().max()   # one outlier sets its vector's scale
    rows = lm_mod.kv_quantize(x)
    assert rows.shape == (3, 2, 5, 16 + lm_mod.KV_SCALE_BYTES) and rows.dtype == torch.int8
    codes, scale = quantize_per_channel_reference(x.reshape(-1, 16))
    assert torch.equal(rows[..., :16].reshape(-1, 16), codes)
    assert torch.equal(rows[..., 16:].contiguous().view(torch.float32).reshape(-1), scale)
    scale = scale.view(3, 2, 5, 1)
    assert (lm_mod.kv_dequantize(rows) - x).abs().le(scale / 2 * (1 + 1e-6)).all()
    assert rows[..., :16].abs().amax(-1)[1:].eq(127).all()
    assert not rows[0, 0, 0, :16].any() and not lm_mod.kv_dequantize(rows)[0, 0, 0].any()
    assert lm_mod.kv_dequantize(rows, torch.bfloat16).dtype == torch.bfloat16
    cache = lm_mod.KVCache(3, 2, 8, 16, torch.int8, "cpu")
    k, v = cache.update(2, x, -x)                                    # writes positions 2..6, returns 0..6
    assert k.shape == (3, 2, 7, 16) and k.dtype == torch.float32
    assert torch.equal(cache.k[:, :, 2:7], rows) and torch.equal(k[:, :, 2:], lm_mod.kv_dequantize(rows))
    assert torch.equal(v[:, :, 2:], -k[:, :, 2:]) and not k[:, :, :2].any()


def test_fused_decoder_writes_int8_cache_rows_as_kv_quantize(int8_models):
    """The native decoder quantises the keys and values it writes as lm.kv_quantize does: after the same steps
    from the same prefill, the fused and layer-loop caches hold the same codes (but for rare ties, where the two
    paths' float32 keys differ in the last bit) and scales equal to float rounding."""
    from musicgen import conditions

    m = int8_models["text"]
    lm = m.lm
    codes = torch.randint(0, 64, (4, lm.cfg.num_codebooks, 24), generator=torch.Generator().manual_seed(3))
    states, mask = m.encode_text(PROMPTS)
    cond = conditions.cross_attention(lm, states, mask, cfg_rows=True)
    written = []
    for fused in (True, False):
        saved, lm.fused = lm.fused, (lm.fused if fused else None)
        try:
            with torch.inference_mode():
                caches = lm.new_caches(4, 24, dtype=torch.int8)
                lm(codes[:, :, :4], cond.cross_kv, cond.cross_bias, 0, caches)
                for p in range(4, 24):
                    lm(codes[:, :, p:p + 1], cond.cross_kv, cond.cross_bias, p, caches)
        finally:
            lm.fused = saved
        written.append(torch.cat([torch.cat([c.k, c.v]) for c in caches]))
    hd = lm.cfg.head_dim
    a, b = written
    same = (a[..., :hd] == b[..., :hd]).float().mean().item()
    step = (a[..., :hd].int() - b[..., :hd].int()).abs().max().item()
    sa, sb = (t[..., hd:].contiguous().view(torch.float32) for t in (a, b))
    print(f"int8 cache rows: {same:.4%} codes equal, max code difference {step}")
    assert same > 0.99 and step <= 1
    torch.testing.assert_close(sa, sb, rtol=1e-5, atol=0)


@pytest.mark.parametrize("no_avx512", ["0", "1"])
def test_int8_cache_attention_at_head_dim_64(tmp_path_factory, spm_model, monkeypatch, no_avx512):
    """Head size 64 (every published MusicGen) takes the AVX-512 int8-cache attention (16 keys summed at a
    time); level avx2 the generic one: both equal the layer loop over the same int8 cache."""
    from conftest import build_hf_model, save_checkpoint

    kernel_or_skip("fused_decoder")
    folder = save_checkpoint(build_hf_model(lm_dim=256), tmp_path_factory.mktemp("tiny256"), spm_model)
    m = musicgen.load(folder, quantize="int8")
    assert m.lm.cfg.head_dim == 64 and m.kv_dtype == torch.int8
    import musicgen.accel.kernels as kernels

    kernels.limit_isa("avx2" if no_avx512 == "1" else None)
    fused = _step_logits(m, True, torch.bfloat16, steps=30, kv_dtype=torch.int8)   # 36 keys: 2 blocks of 16 + 4
    loop = _step_logits(m, False, torch.bfloat16, steps=30, kv_dtype=torch.int8)
    err = ((fused - loop).abs().max() / loop.std()).item()
    print(f"head_dim 64, {'AVX2' if no_avx512 == '1' else 'best'} kernels: fused vs layer loop {err:.2e}")
    assert err < 2e-3


def test_int8_decodes_over_compact_caches_within_tolerance(model, int8_models, monkeypatch, ckpt_dir):
    """load(quantize="int8") on CPU keeps its text keys/values in bfloat16 and its self-attention cache in int8
    rows (as int4 does): a quarter of float32's memory traffic in attention, and the step logits move by far
    less than the int8 weights move them. MUSICGEN_KV_INT8=0 at load keeps a bfloat16 cache."""
    m = int8_models["text"]
    assert m.cache_dtype == torch.bfloat16 and model.cache_dtype is None   # float32 keeps its caches
    assert m.kv_dtype == torch.int8 and model.kv_dtype is None
    exact = _step_logits(model, False, None)
    errs = {name: ((_step_logits(m, True, text, kv_dtype=kv) - exact).abs().max() / exact.std()).item()
            for name, text, kv in (("float32", None, None), ("bfloat16", torch.bfloat16, None),
                                   ("int8", torch.bfloat16, torch.int8))}
    print(f"int8 steps vs float32, max |error| / std, by cache: {errs}")
    assert max(errs.values()) < TOLERANCE["int8"]
    assert max(errs.values()) - min(errs.values()) < 0.005      # the caches' share is small
    monkeypatch.setenv("MUSICGEN_KV_INT8", "0")
    assert musicgen.load(ckpt_dir, quantize="int8").kv_dtype is None


@pytest.mark.parametrize("family", ["text", "melody"])
def test_16bit_models_decode_over_an_int8_cache_within_tolerance(half_models, model, melody_model, ckpt_dir,
                                                                 monkeypatch, family):
    """bfloat16 and float16 models with a fused decoder keep their self-attention cache in int8 rows, as the
    quantised ones do: 40 steps over it move the logits by far less than the 16-bit weights do (mean and max
    error against float32 within a tenth of the 16-bit cache's own, and within the mode's tolerance), and the
    greedy choices stay. MUSICGEN_KV_INT8=0 at load keeps the 16-bit cache; float32 keeps float32."""
    import musicgen.accel.quant as quant

    m = half_models[family]
    name = "bfloat16" if m.dtype == torch.bfloat16 else "float16"
    assert m.kv_dtype == torch.int8 and m.cache_dtype is None and model.kv_dtype is None
    exact = _step_logits(model if family == "text" else melody_model, False, None, steps=40)
    errs = {}
    for cache, kv in (("16-bit", None), ("int8", torch.int8)):
        d = _step_logits(m, True, m.dtype, steps=40, kv_dtype=kv).float() - exact
        errs[cache] = (d.abs().mean().item() / exact.std().item(), d.abs().max().item() / exact.std().item())
    print(f"{name} {family} steps vs float32 (mean, max |error| / std), by cache: {errs}")
    assert errs["int8"][1] < TOLERANCE[name]
    for i in (0, 1):
        assert abs(errs["int8"][i] - errs["16-bit"][i]) < 0.1 * errs["16-bit"][i]
    monkeypatch.setattr(quant, "_DENSE", (True, True, True, True))
    monkeypatch.setenv("MUSICGEN_KV_INT8", "0")
    assert musicgen.load(ckpt_dir, dtype=name).kv_dtype is None


def test_float16_int8_model_decodes_in_the_fused_decoder(model, ckpt_dir):
    """dtype="float16" with quantize="int8": int8 weights, float16 activations between steps and a float16
    cache, through the fused decoder (float32 inside it), within int8's tolerance of float32. (generate()
    keeps the self-attention cache in int8 rows, as for every quantised model on CPU; the text keys/values
    stay float16.)"""
    kernel_or_skip("fused_decoder")
    m = musicgen.load(ckpt_dir, dtype="float16", quantize="int8")
    assert m.lm.fused is not None and m.cache_dtype is None                 # text keys/values in float16
    assert m.kv_dtype == torch.int8
    fused, loop = _step_logits(m, True, None).float(), _step_logits(m, False, None).float()
    exact = _step_logits(model, False, None)
    gap = ((fused - loop).abs().max() / loop.std()).item()
    err = ((fused - exact).abs().max() / exact.std()).item()
    print(f"float16 int8: fused vs layer loop {gap:.2e}, fused vs float32 {err:.4f}")
    assert gap < 1e-2 and err < TOLERANCE["int8"]
    codes = m.generate_codes(PROMPTS, duration=0.4, seed=0)
    assert codes.shape == (2, 4, 20) and codes.min() >= 0 and codes.max() < 64


def test_fused_decoder_int4(int4_pair):
    """int4 quantises activations per group, a step function of its input: float-rounding differences flip
    some codes, so the fused path is held to the int4 tolerance against float32 and to greedy agreement."""
    kernel_or_skip("fused_decoder")
    ref, m = int4_pair
    assert m.lm.fused is not None
    fused, loop = _step_logits(m, True, m.cache_dtype), _step_logits(m, False, m.cache_dtype)
    exact = _step_logits(ref, False, None)
    for name, logits in (("fused", fused), ("layer loop", loop)):
        err = ((logits - exact).abs().max() / exact.std()).item()
        print(f"int4 {name} vs float32: max |error| / std = {err:.4f}")
        assert err < TOLERANCE["int4"]
    assert (fused.argmax(-1) == loop.argmax(-1)).float().mean() > 0.9


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def half_models(request, ckpt_dir, melody_ckpt_dir):
    """The 16-bit test models with their fused decoders: our dense kernel picked (dense_policy picks it on
    AVX-512 CPUs where it beats PyTorch's 16-bit products, as on the Xeon of the README)."""
    import musicgen.accel.quant as quant
    from musicgen.accel import kernels

    kernel_or_skip("fused_decoder")
    if kernels.dense_gemv() is None:
        pytest.skip("no AVX-512 here: 16-bit models keep the layer loop")
    saved, quant._DENSE = quant._DENSE, (True, True, True, True)
    try:
        models = {"text": musicgen.load(ckpt_dir, dtype=request.param),
                  "melody": musicgen.load(melody_ckpt_dir, dtype=request.param)}
    finally:
        quant._DENSE = saved
    assert all(m.lm.fused is not None for m in models.values())
    return models


@pytest.mark.parametrize("family", ["text", "melody"])
def test_fused_16bit_layers_are_the_float32_loop_on_the_same_weights(half_models, family):
    """The dense kind widens bfloat16 and float16 weights exactly and keeps float32 activations, so the native
    layers compute what the float32 layer loop computes with the weights' 16-bit values: outputs, and the keys
    and values written at the step's position, to float32 rounding (float32 caches and text keys here)."""
    import copy

    lm = half_models[family].lm
    twin = copy.deepcopy(lm).float()
    twin.fused = None
    cfg, R, pos = lm.cfg, 4, 9
    g = torch.Generator().manual_seed(0)
    x = torch.randn(R, 1, cfg.dim, generator=g)
    caches = twin.new_caches(R, 16)
    for c in caches:   # earlier positions: anything; later ones are neither read nor written
        c.k.normal_(generator=g), c.v.normal_(generator=g)
    kv = bias = None
    if lm.layers[0].cross_attn is not None:
        kv = [tuple(torch.randn(R, cfg.num_heads, 7, cfg.head_dim, generator=g) for _ in "kv") for _ in lm.layers]
        bias = lm.cross_bias(torch.tensor([[1.0] * 7] * 2 + [[1.0] * 5 + [0.0] * 2] * 2), torch.float32)
    loop_caches = copy.deepcopy(caches)
    with torch.inference_mode():
        fused = lm.fused(x, pos, caches, kv, bias)
        loop = x
        for i, layer in enumerate(twin.layers):
            loop = layer(loop, pos, loop_caches[i], kv[i] if kv else None, bias)
    assert fused.dtype == torch.float32
    err = ((fused - loop).abs().max() / loop.std()).item()
    print(f"{family}: fused {lm.norm.weight.dtype} vs float32 loop, max |error| / std = {err:.2e}")
    assert err < 1e-5
    for a, b in zip(caches, loop_caches):
        torch.testing.assert_close(a.k, b.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.v, b.v, rtol=1e-5, atol=1e-5)


def test_fused_16bit_steps_stay_within_tolerance(model, half_models):
    """Decoding steps of the 16-bit model, fused and through the layer loop, against float32. The fused path
    rounds only its output and the cache to the model's dtype, so it departs from float32 no more than the loop."""
    m = half_models["text"]
    mode = str(m.dtype).removeprefix("torch.")
    exact = _step_logits(model, False, None)
    errs = {}
    for name, fused in (("fused", True), ("layer loop", False)):
        logits = _step_logits(m, fused, None).float()
        errs[name] = ((logits - exact).abs().max() / exact.std()).item()
        print(f"{mode} {name} vs float32: max |error| / std = {errs[name]:.4f}")
        assert errs[name] < TOLERANCE[mode]
    assert errs["fused"] <= errs["layer loop"]


def test_16bit_model_converted_to_float32_leaves_the_fused_decoder(half_models, monkeypatch):
    """The fused decoder was built for the model's dtype: after model.float() the steps go through the layer
    loop on the float32 weights instead."""
    import copy

    import musicgen.accel.quant as quant

    monkeypatch.setattr(quant, "_DENSE", (True, True, True, True))   # the copy builds its own fused decoder
    twin = copy.deepcopy(half_models["text"])
    dtype = twin.dtype
    twin.lm.float()
    calls = []
    native = twin.lm.fused.native
    twin.lm.fused.native = type("Spy", (), {"step": lambda self, *a: calls.append(1) or native.step(*a)})()
    codes = twin.generate_codes(PROMPTS, duration=0.2, top_k=1)
    assert codes.shape == (2, 4, 10) and not calls
    twin.lm.to(dtype)
    twin.generate_codes(PROMPTS, duration=0.2, top_k=1)
    assert calls   # back in its dtype, the steps use it again


@pytest.fixture(scope="module")
def float32_models(ckpt_dir, melody_ckpt_dir):
    """float32 test models with their fused decoders: our dense kernel picked for float32 steps (dense_policy
    picks it where it reads float32 weights about as fast as PyTorch's products, as on the README's Xeon)."""
    import musicgen.accel.quant as quant
    from musicgen.accel import kernels

    kernel_or_skip("fused_decoder")
    if kernels.dense_gemv() is None:
        pytest.skip("no AVX-512 here: float32 models keep the layer loop")
    saved, quant._DENSE = quant._DENSE, (True, True, True, True)
    try:
        return {"text": musicgen.load(ckpt_dir), "melody": musicgen.load(melody_ckpt_dir)}
    finally:
        quant._DENSE = saved


@pytest.mark.parametrize("family", ["text", "melody"])
def test_float32_fused_decoder_equals_the_layer_loop(float32_models, family, monkeypatch):
    """A float32 model's fused steps compute the layer loop's logits to float32 rounding (only the order of the
    sums differs), and greedy generation gives the layer loop's codes: with text, and with a melody."""
    m = float32_models[family]
    assert m.lm.fused is not None and m.kv_dtype is None and m.cache_dtype is None   # float32 caches
    fused, loop = _step_logits(m, True, None), _step_logits(m, False, None)
    err = ((fused - loop).abs().max() / loop.std()).item()
    print(f"float32 {family}: fused vs layer loop max |error| / std = {err:.2e}")
    assert err < 1e-5
    calls = []
    native = m.lm.fused.native
    spy = type("Spy", (), {"step": lambda self, *a: calls.append(1) or native.step(*a)})()
    monkeypatch.setattr(m.lm.fused, "native", spy)
    kw = {"melody": torch.sin(torch.arange(32000) / 32000 * 2 * torch.pi * 440.0), "melody_sample_rate": 32000,
          "demucs": False} if family == "melody" else {}
    codes = m.generate_codes(PROMPTS, duration=0.4, top_k=1, **kw)
    assert calls                                   # the steps went through the native decoder
    monkeypatch.setattr(m.lm, "fused", None)
    assert torch.equal(codes, m.generate_codes(PROMPTS, duration=0.4, top_k=1, **kw))


class _Adapter(torch.nn.Module):
    """A low-rank update around a linear layer, as adapter libraries put in its place."""

    def __init__(self, base, rank=2):
        super().__init__()
        self.base = base
        g = torch.Generator().manual_seed(rank)
        self.a = torch.nn.Parameter(torch.randn(base.in_features, rank, generator=g) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(rank, base.out_features, generator=g) * 0.3)

    def forward(self, x):
        return self.base(x) + (x @ self.a.to(x.dtype)) @ self.b.to(x.dtype)


@pytest.mark.parametrize("change", ["adapter", "weight"])
def test_layers_changed_after_load_leave_the_fused_decoder(ckpt_dir, monkeypatch, capsys, change):
    """The native decoder holds the tensors it was built from. A module or parameter put in their place after
    load (an adapter around fc1, a new qkv weight) must not be ignored: the steps go back to the layer loop,
    which computes the changed model, and it is said once."""
    import copy

    import musicgen.accel.quant as quant

    monkeypatch.setattr(quant, "_DENSE", (True, True, True, True))
    kernel_or_skip("fused_decoder")
    m = musicgen.load(ckpt_dir)
    if m.lm.fused is None:
        pytest.skip("no fused decoder on this CPU")
    layer = m.lm.layers[0]
    if change == "adapter":
        layer.fc1 = _Adapter(layer.fc1)
    else:
        qkv = layer.self_attn.qkv
        qkv.weight = torch.nn.Parameter(qkv.weight.detach() * 1.5, requires_grad=False)
    reference = copy.deepcopy(m)
    reference.lm.fused = None                                   # the PyTorch layer loop over the changed layers
    capsys.readouterr()
    codes = m.generate_codes(PROMPTS, duration=0.4, top_k=1)
    assert torch.equal(codes, reference.generate_codes(PROMPTS, duration=0.4, top_k=1))
    assert m.lm.fused.stale
    m.generate_codes(PROMPTS, duration=0.2, top_k=1)
    assert capsys.readouterr().err.count("the LM's layers changed after load") == 1
    from musicgen.accel import fused
    assert fused.attach(m.lm) == (change == "weight")           # a plain new weight: built again over it
    if change == "weight":
        assert torch.equal(m.generate_codes(PROMPTS, duration=0.4, top_k=1), codes)
        assert not m.lm.fused.stale


def test_float32_decodes_fused_where_the_policy_picks_it(model, ckpt_dir, monkeypatch):
    """The default float32 model takes the fused decoder exactly where dense_policy picks our kernel for float32
    steps (so the conformance tests against transformers run the path users get); MUSICGEN_DENSE=0 keeps the
    layer loop."""
    import musicgen.accel.quant as quant

    assert (model.lm.fused is not None) == quant.dense_picked(torch.float32)
    monkeypatch.setattr(quant, "_DENSE", None)
    monkeypatch.setenv("MUSICGEN_DENSE", "0")
    assert musicgen.load(ckpt_dir).lm.fused is None


def test_fused_decoder_can_be_turned_off(monkeypatch, ckpt_dir):
    kernel_or_skip("int8_gemv")
    monkeypatch.setenv("MUSICGEN_FUSED", "0")
    assert musicgen.load(ckpt_dir, quantize="int8").lm.fused is None


def test_fused_decoder_from_two_threads(int4_pair):
    """The native step releases the GIL; generations on one model from two threads still get their own codes."""
    from concurrent.futures import ThreadPoolExecutor

    _, m = int4_pair
    prompts = [[p] for p in PROMPTS] * 2
    alone = [m.generate_codes(p, duration=0.6, seed=i) for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda a: m.generate_codes(a[1], duration=0.6, seed=a[0]), enumerate(prompts)))
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_parameter_count_counts_quantised_weights(model, fast_models, int4_pair):
    """What /v1/model reports: the same count for a checkpoint whatever its precision."""
    from musicgen.accel.quant import parameter_count

    full = sum(p.numel() for p in model.parameters())
    assert parameter_count(model) == full
    assert parameter_count(fast_models["int8"]) == full
    assert parameter_count(int4_pair[1]) == sum(p.numel() for p in int4_pair[0].parameters())


def test_copied_quantised_model_has_its_own_fused_decoder(int4_pair):
    import copy

    kernel_or_skip("fused_decoder")
    _, m = int4_pair
    twin = copy.deepcopy(m)
    assert twin.lm.fused is not None and twin.lm.fused is not m.lm.fused
    codes = [x.generate_codes(PROMPTS, duration=0.4, seed=3) for x in (twin, m)]
    assert torch.equal(*codes)
