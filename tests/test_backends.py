"""The decoding step's backends held to the reference layer loop: the fused native CPU step, the compiled
layer loop, and the layer loop without our kernels; the caches they read and write; how one is chosen."""
from __future__ import annotations

import copy

import pytest
import torch

import musicgen
from conftest import kernel_or_skip
from musicgen import accel, conditions
from musicgen import lm as lm_mod
from musicgen.engine import Cache, Reference

PROMPTS = ["80s pop track with bassy drums and synth", "lofi"]
TOLERANCE = {"bfloat16": 0.05, "float16": 0.01, "int8": 0.08, "int4": 0.12}   # as tests/test_quant.py


def fused_or_skip(model):
    kernel_or_skip("fused_decoder")
    assert model.backend.name == "fused", "the kernels built, so this model decodes in the fused step"
    return model.backend


def step_logits(m, backend, text_kv=None, self_kv=None, steps: int = 12, keep: list | None = None):
    """Logits of `steps` one-position steps after a 6-position prefill, from the same codes and conditions, with
    `backend` running the layers: (steps, rows, K, V). text_kv: the text keys/values' dtype (default the model's);
    self_kv: the self-attention cache's (default text_kv; torch.int8: rows with scales). keep: gets the cache."""
    lm = m.lm
    K, R = lm.cfg.num_codebooks, 4
    codes = torch.randint(0, 64, (R, K, 6 + steps), generator=torch.Generator().manual_seed(1))
    text_kv = text_kv or m.dtype
    cache = Cache(lm, R, self_kv or text_kv, text_kv, text_kv)
    prefix, cond = None, conditions.Conditions()
    if lm.cfg.prefix_conditioning:   # melody models: condition tokens before the codes
        prefix = torch.randn(R, 5, lm.cfg.dim, generator=torch.Generator().manual_seed(2)).to(m.dtype)
    else:
        states, mask = m.encode_text(PROMPTS)
        cond = conditions.cross_attention(lm, states, mask, cfg_rows=True)
    P, S = 0 if prefix is None else prefix.shape[1], 0 if cond.cross_bias is None else cond.cross_bias.shape[-1]
    cache.grow(P + 6 + steps, S, exact=True)
    with torch.inference_mode():
        kv = bias = None
        if cond.cross_kv is not None:
            cache.put_text(0, cond)
            kv, bias = [(k[:R, :, :S], v[:R, :, :S]) for k, v in zip(cache.ck, cache.cv)], cache.bias[:R, ..., :S]
        lm(codes[:, :, :6], kv, bias, prefix=prefix, stores=cache.stores(slice(0, R)))
        out = []
        for p in range(6, 6 + steps):
            positions = [P + p] * R
            pos = torch.tensor(positions)
            x = backend.layers(lm, lm.embed_step(codes[:, :, p], pos), pos, positions, cache)
            out.append(lm.logits(x)[:, :, 0].float())
    if keep is not None:
        keep.append(cache)
    return torch.stack(out)


def gap(a, b) -> float:
    return ((a - b).abs().max() / b.std()).item()


# -- the choice -------------------------------------------------------------------------------------------
def test_backend_follows_what_the_machine_can_do(ckpt_dir, capsys):
    from musicgen.accel import kernels

    fused_here = kernels.fused_decoder() is not None
    for kw in (dict(), dict(dtype="bfloat16"), dict(dtype="float16"), dict(quantize="int8"), dict(quantize="int4")):
        m = musicgen.load(ckpt_dir, **kw)
        assert m.backend.name == ("fused" if fused_here else "reference"), kw
        assert m.precision.self_kv == (torch.int8 if fused_here and kw else m.precision.text_kv)
    with accel.override(backend="reference"):
        assert musicgen.load(ckpt_dir).backend.name == "reference"
    with accel.override(kernels=False):
        m = musicgen.load(ckpt_dir, quantize="int8")
        assert m.backend.name == "reference" and m.precision.self_kv == torch.bfloat16
        assert musicgen.load(ckpt_dir, compile=True).backend.name == "compiled"
    if fused_here:
        assert musicgen.load(ckpt_dir, compile=True).backend.name == "fused"
        assert "compile skipped" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown backend"), accel.override(backend="cuda-graphs"):
        musicgen.load(ckpt_dir)
    with pytest.raises(TypeError, match="no setting"), accel.override(fused=False):
        pass


def test_precision_is_one_value_fixed_at_load():
    from musicgen.precision import Precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    f32, bf16, f16, i8 = torch.float32, torch.bfloat16, torch.float16, torch.int8
    table = [  # dtype, quantize, device, fused, kernels built -> weights, compute, text_kv, self_kv
        ("float32", None, cpu, True, True, "float32", f32, f32, f32),                # the exact path, fused or not
        ("float32", None, cpu, False, False, "float32", f32, f32, f32),
        ("bfloat16", None, cpu, True, True, "bfloat16", bf16, bf16, i8),
        ("float16", None, cpu, False, True, "float16", f16, f16, f16),
        ("float32", "int8", cpu, True, True, "int8", f32, bf16, i8),
        ("float32", "int4", cpu, False, False, "int4", bf16, bf16, bf16),           # PyTorch's packed kernels
        ("float16", "int8", cpu, True, True, "int8", f16, f16, i8),
        ("float16", "int8", cpu, False, False, "int8", f16, f16, f16),
        ("bfloat16", "int8", cuda, False, False, "int8", bf16, bf16, bf16),
        ("float32", "int4", cuda, False, False, "int4", f32, f32, f32),
    ]
    for dtype, quantize, device, fused, built, *want in table:
        p = Precision.choose(dtype, quantize, device, fused, kernels=built)
        assert (p.weights, p.compute, p.text_kv, p.self_kv) == tuple(want), (dtype, quantize, device, fused, built)
    assert Precision.choose("float32", None, cpu).exact and not Precision.choose("float32", "int8", cpu).exact
    with pytest.raises(ValueError, match="quantize"):
        Precision.choose("float32", "int3", cpu)


# -- every backend gives the reference's codes ----------------------------------------------------------
@pytest.mark.parametrize("mode", ["text", "batch", "continuation", "unconditional", "melody", "stream"])
def test_float32_greedy_codes_equal_on_every_backend(ckpt_dir, melody_ckpt_dir, any_backend, mode):
    """float32 greedy decoding gives the same codes on every backend this machine runs as on the reference
    layer loop, in every mode."""
    folder = melody_ckpt_dir if mode == "melody" else ckpt_dir
    m = musicgen.load(folder)
    with accel.override(backend="reference"):
        ref = musicgen.load(folder)
    assert ref.backend.name == "reference"
    if any_backend == "fused":
        fused_or_skip(m)
    tune = torch.sin(torch.arange(32000) / 32000 * 2 * torch.pi * 330.0)
    args = {"text": (PROMPTS[:1], {}), "batch": (PROMPTS, {}),
            "continuation": (PROMPTS, dict(prompt_audio=torch.randn(1, 6400, generator=torch.Generator().manual_seed(0)) * 0.3)),
            "unconditional": (None, dict(batch_size=2)),
            "melody": (PROMPTS, dict(melody=tune, demucs=False)), "stream": (PROMPTS[:1], {})}[mode]
    want = ref.generate_codes(args[0], duration=0.5, top_k=1, **args[1])
    if mode == "stream":
        from musicgen.streaming import stream_codes

        got = torch.cat([c for c, _ in stream_codes(m, args[0], 0.5, 4, top_k=1)], dim=-1)
    else:
        got = m.generate_codes(args[0], duration=0.5, top_k=1, **args[1])
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["text", "melody"])
def test_fused_float32_steps_are_the_reference_to_float_rounding(ckpt_dir, melody_ckpt_dir, family):
    m = musicgen.load(ckpt_dir if family == "text" else melody_ckpt_dir)
    backend = fused_or_skip(m)
    err = gap(step_logits(m, backend), step_logits(m, Reference()))
    print(f"float32 {family}: fused vs layer loop max |error| / std = {err:.2e}")
    assert err < 1e-5


@pytest.fixture(scope="module")
def int8_models(ckpt_dir, melody_ckpt_dir):
    kernel_or_skip("int8_gemv")
    return {"text": musicgen.load(ckpt_dir, quantize="int8"), "melody": musicgen.load(melody_ckpt_dir, quantize="int8")}


@pytest.mark.parametrize("family", ["text", "melody"])
@pytest.mark.parametrize("text_kv,self_kv", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                             (torch.bfloat16, torch.int8)])
def test_fused_steps_equal_the_layer_loop_over_every_cache(int8_models, family, text_kv, self_kv):
    """One native call per step computes what the Python layer loop computes, text and melody models, over a
    float32 cache (to float rounding), a 16-bit cache (float32 arithmetic over 16-bit keys, where SDPA also
    rounds the query and the output to the cache's dtype) and int8 rows (bfloat16 text keys)."""
    m = int8_models[family]
    backend = fused_or_skip(m)
    err = gap(step_logits(m, backend, text_kv, self_kv), step_logits(m, Reference(), text_kv, self_kv))
    print(f"{family}, cache {text_kv}/{self_kv}: fused vs layer loop max |error| / std = {err:.2e}")
    assert err < (1e-5 if text_kv == torch.float32 else 2e-3)


def test_fused_step_writes_int8_cache_rows_as_kv_quantize(int8_models):
    """The native decoder quantises the keys and values it writes as lm.kv_quantize does: after the same steps
    from the same prefill, the fused and layer-loop caches hold the same codes (but for rare ties, where the two
    paths' float32 keys differ in the last bit) and scales equal to float rounding."""
    m = int8_models["text"]
    backend = fused_or_skip(m)
    caches = []
    for b in (backend, Reference()):
        step_logits(m, b, torch.float32, torch.int8, steps=18, keep=caches)
    a, b = (torch.cat([torch.cat([k, v]) for k, v in zip(c.k, c.v)]) for c in caches)
    hd = m.lm.cfg.head_dim
    same = (a[..., :hd] == b[..., :hd]).float().mean().item()
    step = (a[..., :hd].int() - b[..., :hd].int()).abs().max().item()
    print(f"int8 cache rows: {same:.4%} codes equal, max code difference {step}")
    assert same > 0.99 and step <= 1
    sa, sb = (t[..., hd:].contiguous().view(torch.float32) for t in (a, b))
    torch.testing.assert_close(sa, sb, rtol=1e-5, atol=0)


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


@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_int8_cache_attention_at_head_dim_64(tmp_path_factory, spm_model, level):
    """Head size 64 (every published MusicGen) takes the AVX-512 int8-cache attention (16 keys summed at a
    time); at AVX2 the generic one: both equal the layer loop over the same int8 cache."""
    from conftest import build_hf_model, save_checkpoint
    from musicgen.accel import kernels

    kernel_or_skip("fused_decoder")
    if level not in kernels.isa_levels():
        pytest.skip(f"this CPU has no {level}")
    folder = save_checkpoint(build_hf_model(lm_dim=256), tmp_path_factory.mktemp("tiny256"), spm_model)
    m = musicgen.load(folder, quantize="int8")
    assert m.lm.cfg.head_dim == 64 and m.precision.self_kv == torch.int8
    with kernels.limit_isa(level):
        fused = step_logits(m, m.backend, torch.bfloat16, torch.int8, steps=30)   # 36 keys: 2 blocks of 16 + 4
    loop = step_logits(m, Reference(), torch.bfloat16, torch.int8, steps=30)
    err = gap(fused, loop)
    print(f"head_dim 64, {level}: fused vs layer loop {err:.2e}")
    assert err < 2e-3


def test_int8_decodes_over_compact_caches_within_tolerance(model, int8_models):
    """load(quantize="int8") on CPU keeps its text keys/values in bfloat16 and its self-attention cache in int8
    rows: a quarter of float32's memory traffic in attention, and the step logits move by far less than the
    int8 weights move them."""
    m = int8_models["text"]
    backend = fused_or_skip(m)
    assert (m.precision.text_kv, m.precision.self_kv) == (torch.bfloat16, torch.int8)
    exact = step_logits(model, Reference())
    errs = {name: gap(step_logits(m, backend, text, kv), exact)
            for name, text, kv in (("float32", torch.float32, None), ("bfloat16", torch.bfloat16, None),
                                   ("int8", torch.bfloat16, torch.int8))}
    print(f"int8 steps vs float32, max |error| / std, by cache: {errs}")
    assert max(errs.values()) < TOLERANCE["int8"]
    assert max(errs.values()) - min(errs.values()) < 0.005      # the caches' share is small


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def half_models(request, ckpt_dir, melody_ckpt_dir):
    kernel_or_skip("fused_decoder")
    return {"text": musicgen.load(ckpt_dir, dtype=request.param),
            "melody": musicgen.load(melody_ckpt_dir, dtype=request.param)}


@pytest.mark.parametrize("family", ["text", "melody"])
def test_16bit_models_decode_over_an_int8_cache_within_tolerance(half_models, model, melody_model, family):
    """bfloat16 and float16 models in the fused step keep their self-attention cache in int8 rows, as the
    quantised ones do: 40 steps over it move the logits by far less than the 16-bit weights do (mean and max
    error against float32 within a tenth of the 16-bit cache's own, and within the mode's tolerance)."""
    m = half_models[family]
    backend = fused_or_skip(m)
    name = "bfloat16" if m.dtype == torch.bfloat16 else "float16"
    assert m.precision.self_kv == torch.int8 and m.precision.text_kv == m.dtype
    exact = step_logits(model if family == "text" else melody_model, Reference(), steps=40)
    errs = {}
    for cache, kv in (("16-bit", None), ("int8", torch.int8)):
        d = step_logits(m, backend, m.dtype, kv, steps=40) - exact
        errs[cache] = (d.abs().mean().item() / exact.std().item(), d.abs().max().item() / exact.std().item())
    print(f"{name} {family} steps vs float32 (mean, max |error| / std), by cache: {errs}")
    assert errs["int8"][1] < TOLERANCE[name]
    for i in (0, 1):
        assert abs(errs["int8"][i] - errs["16-bit"][i]) < 0.1 * errs["16-bit"][i]


def test_fused_16bit_steps_are_closer_to_float32_than_the_layer_loop(model, half_models):
    """The fused step keeps float32 activations and rounds only its output and the cache to the model's dtype,
    so it departs from float32 no more than the 16-bit layer loop."""
    m = half_models["text"]
    backend = fused_or_skip(m)
    mode = str(m.dtype).removeprefix("torch.")
    exact = step_logits(model, Reference())
    errs = {name: gap(step_logits(m, b), exact) for name, b in (("fused", backend), ("layer loop", Reference()))}
    print(f"{mode} vs float32: {errs}")
    assert max(errs.values()) < TOLERANCE[mode]
    assert errs["fused"] <= errs["layer loop"]


@pytest.mark.parametrize("family", ["text", "melody"])
def test_fused_16bit_layers_are_the_float32_loop_on_the_same_weights(half_models, family):
    """The dense kind widens bfloat16 and float16 weights exactly and keeps float32 activations, so the native
    layers compute what the float32 layer loop computes with the weights' 16-bit values: outputs, and the keys
    and values written at the step's position, to float32 rounding (float32 caches and text keys here)."""
    m = half_models[family]
    backend = fused_or_skip(m)
    lm, twin = m.lm, copy.deepcopy(m.lm).float()
    cfg, R, pos = lm.cfg, 4, 9
    g = torch.Generator().manual_seed(0)
    x = torch.randn(R, 1, cfg.dim, generator=g)
    cache = Cache(lm, R, torch.float32, torch.float32, torch.float32)
    S = 7
    cache.grow(16, S if lm.layers[0].cross_attn is not None else 0, exact=True)
    for t in cache.k + cache.v + cache.ck + cache.cv:   # earlier positions: anything; later ones unread
        t.normal_(generator=g)
    if cache.ck:
        mask = torch.tensor([[1.0] * 7] * 2 + [[1.0] * 5 + [0.0] * 2] * 2)
        cache.bias.copy_(lm.cross_bias(mask, torch.float32))
    twin_cache = copy.deepcopy(cache)
    twin_cache.lm = twin
    positions = [pos] * R
    text = [t[:R] for t in cache.ck], [t[:R] for t in cache.cv], cache.bias[:R] if cache.ck else None
    with torch.inference_mode():   # the native step itself: float32 rows in and out, whatever the weights
        fused = backend.native.step(x[:, 0], positions, cache.k, cache.v, *text)[:, None]
        loop = Reference().layers(twin, x, torch.tensor(positions), positions, twin_cache)
    assert fused.dtype == torch.float32
    err = gap(fused, loop)
    print(f"{family}: fused {lm.norm.weight.dtype} vs float32 loop, max |error| / std = {err:.2e}")
    assert err < 1e-5
    for a, b in zip(cache.k + cache.v, twin_cache.k + twin_cache.v):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_float16_int8_model_decodes_in_the_fused_step(model, ckpt_dir):
    """dtype="float16" with quantize="int8": int8 weights, float16 activations between steps, float16 text
    keys, int8 cache rows, through the fused step (float32 inside it), within int8's tolerance of float32."""
    m = musicgen.load(ckpt_dir, dtype="float16", quantize="int8")
    backend = fused_or_skip(m)
    assert (m.precision.text_kv, m.precision.self_kv) == (torch.float16, torch.int8)
    fused, loop = step_logits(m, backend), step_logits(m, Reference())
    exact = step_logits(model, Reference())
    print(f"float16 int8: fused vs layer loop {gap(fused, loop):.2e}, fused vs float32 {gap(fused, exact):.4f}")
    assert gap(fused, loop) < 1e-2 and gap(fused, exact) < TOLERANCE["int8"]
    codes = m.generate_codes(PROMPTS, duration=0.4, seed=0)
    assert codes.shape == (2, 4, 20) and codes.min() >= 0 and codes.max() < 64


@pytest.fixture(scope="module")
def int4_pair(tmp_path_factory, spm_model):
    """A tiny checkpoint whose LM width (64) fits the int4 layout, loaded in float32 and in int4."""
    from conftest import build_hf_model, save_checkpoint

    folder = save_checkpoint(build_hf_model(lm_dim=64), tmp_path_factory.mktemp("tiny64"), spm_model)
    return musicgen.load(folder), musicgen.load(folder, quantize="int4")


def test_fused_int4_steps_within_tolerance(int4_pair):
    """int4 quantises activations per group, a step function of its input: float-rounding differences flip
    some codes, so the fused path is held to the int4 tolerance against float32 and to greedy agreement."""
    ref, m = int4_pair
    backend = fused_or_skip(m)
    fused, loop = step_logits(m, backend, torch.bfloat16), step_logits(m, Reference(), torch.bfloat16)
    exact = step_logits(ref, Reference())
    for name, logits in (("fused", fused), ("layer loop", loop)):
        print(f"int4 {name} vs float32: max |error| / std = {gap(logits, exact):.4f}")
        assert gap(logits, exact) < TOLERANCE["int4"]
    assert (fused.argmax(-1) == loop.argmax(-1)).float().mean() > 0.9


# -- the fused step's bindings, copies and threads ------------------------------------------------------
def test_16bit_model_converted_to_float32_leaves_the_fused_step(half_models):
    """The fused step was built for the model's dtype: after model.float() the steps go through the layer loop
    on the float32 weights instead, and back in its dtype they use it again."""
    twin = copy.deepcopy(half_models["text"])
    backend = fused_or_skip(twin)
    dtype = twin.dtype
    calls = []
    native = backend.native
    backend.native = type("Spy", (), {"step": lambda self, *a: calls.append(1) or native.step(*a)})()
    twin.lm.float()
    codes = twin.generate_codes(PROMPTS, duration=0.2, top_k=1)
    assert codes.shape == (2, 4, 10) and not calls
    twin.lm.to(dtype)
    twin.generate_codes(PROMPTS, duration=0.2, top_k=1)
    assert calls


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
def test_layers_changed_after_load_leave_the_fused_step(ckpt_dir, capsys, change):
    """The native decoder holds the tensors it was built from. A module or parameter put in their place after
    load (an adapter around fc1, a new qkv weight) must not be ignored: the steps go back to the layer loop,
    which computes the changed model, and it is said once."""
    m = musicgen.load(ckpt_dir)
    backend = fused_or_skip(m)
    layer = m.lm.layers[0]
    if change == "adapter":
        layer.fc1 = _Adapter(layer.fc1)
    else:
        qkv = layer.self_attn.qkv
        qkv.weight = torch.nn.Parameter(qkv.weight.detach() * 1.5, requires_grad=False)
    reference = copy.deepcopy(m)
    reference.backend = Reference()                            # the PyTorch layer loop over the changed layers
    capsys.readouterr()
    codes = m.generate_codes(PROMPTS, duration=0.4, top_k=1)
    assert torch.equal(codes, reference.generate_codes(PROMPTS, duration=0.4, top_k=1))
    assert backend.stale
    m.generate_codes(PROMPTS, duration=0.2, top_k=1)
    assert capsys.readouterr().err.count("the LM's layers changed after load") == 1


def test_fused_step_from_two_threads(int4_pair):
    """The native step releases the GIL; generations on one model from two threads still get their own codes."""
    from concurrent.futures import ThreadPoolExecutor

    _, m = int4_pair
    prompts = [[p] for p in PROMPTS] * 2
    alone = [m.generate_codes(p, duration=0.6, seed=i) for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda a: m.generate_codes(a[1], duration=0.6, seed=a[0]), enumerate(prompts)))
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_copied_model_chooses_its_own_backend(int4_pair):
    _, m = int4_pair
    twin = copy.deepcopy(m)
    assert twin.backend.name == m.backend.name
    if m.backend.name == "fused":
        assert twin.backend is not m.backend and twin.backend.native is not m.backend.native
    codes = [x.generate_codes(PROMPTS, duration=0.4, seed=3) for x in (twin, m)]
    assert torch.equal(*codes)


# -- the compiled layer loop ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_equals_eager_and_reads_a_growing_window_with_one_graph(ckpt_dir, model, monkeypatch,
                                                                           backend, capsys):
    """The compiled layer loop gives the eager codes. It attends over a bucketed window of its static cache:
    with buckets of 8 positions a 0.6 s generation crosses several windows, yet compiles one graph (the
    window's length is dynamic), and the cache is kept for the next generation of as many rows."""
    from musicgen.accel import compiled

    monkeypatch.setattr(compiled, "WINDOW_BUCKET", 8)
    with accel.override(backend="compiled"):
        m = musicgen.load(ckpt_dir)
    assert m.backend.name == "compiled"
    m.backend.backend = backend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()   # compiled code is cached per function: count this test's graphs from none
    graphs = counters["stats"]["unique_graphs"]
    for prompts in (PROMPTS, ["jazz trio with brushed drums", "x"]):           # two text lengths, one bucket
        assert torch.equal(m.generate_codes(prompts, duration=0.6, top_k=1),
                           model.generate_codes(prompts, duration=0.6, top_k=1))
    assert counters["stats"]["unique_graphs"] - graphs == 1           # texts padded to one bucket: one graph
    assert len(m.backend.caches) == 1
    err = capsys.readouterr().err
    assert err.count("compiled the decoding step for 4 rows") == 1
    assert "CUDA graphs are not used" not in err                      # the default mode on CPU asks for none
    assert compiled.window(30, 2048) == 32 and compiled.window(32, 2048) == 32 and compiled.window(2047, 2048) == 2048


def test_compile_says_when_cuda_graphs_are_not_used(ckpt_dir, model, capsys):
    """Inductor tells why it skips CUDA graphs only under TORCH_LOGS=cudagraphs, and without them a GPU step is
    bound by kernel launches: the first compiled step says so in one line. On CPU a mode that records CUDA
    graphs cannot record any, so the line must appear there; the codes are eager's either way."""
    torch._dynamo.reset()
    with accel.override(backend="compiled"):
        m = musicgen.load(ckpt_dir)
    m.backend.mode = "reduce-overhead"
    codes = m.generate_codes(PROMPTS, duration=0.3, top_k=1)
    err = capsys.readouterr().err
    assert "compiled the decoding step" in err and "CUDA graphs are not used for the decoding step" in err
    assert torch.equal(codes, model.generate_codes(PROMPTS, duration=0.3, top_k=1))


@pytest.mark.parametrize("family", ["melody", "int8"])
def test_compiled_step_equals_eager_for_melody_and_quantised_models(ckpt_dir, melody_ckpt_dir, family):
    """Prefix conditioning (the prefill fills the static cache) and int8 layers (our kernel as a custom op
    inside the graph, where built) under the compiled loop: the eager layer loop's codes over the same caches."""
    folder, kw = (melody_ckpt_dir, {}) if family == "melody" else (ckpt_dir, dict(quantize="int8"))
    with accel.override(backend="compiled"):
        m = musicgen.load(folder, **kw)
    m.backend.backend = "aot_eager"
    with accel.override(backend="reference"):
        ref = musicgen.load(folder, **kw)
    tune = torch.sin(torch.arange(32000) / 32000 * 2 * torch.pi * 330.0)
    extra = dict(melody=tune, demucs=False) if family == "melody" else {}
    assert torch.equal(m.generate_codes(PROMPTS, duration=0.4, top_k=1, **extra),
                       ref.generate_codes(PROMPTS, duration=0.4, top_k=1, **extra))


# -- attention on CUDA ------------------------------------------------------------------------------------
def _sdp_flags(device):
    with lm_mod.attention_backends(torch.device(device)):
        return torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(), \
            torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()


def test_attention_backends_keep_eager_cuda_attention_off_cudnn():
    """The switches are process-wide flags, so this runs without a GPU: the context turns cuDNN attention off
    for CUDA and leaves the rest on, does nothing elsewhere, and puts the flags back."""
    before = _sdp_flags("cpu")
    assert before[0]                                                   # PyTorch's default: cuDNN allowed
    assert _sdp_flags("cuda") == (False, True, True, True)
    assert torch.backends.cuda.cudnn_sdp_enabled()                    # restored on exit


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kw", [dict(dtype="bfloat16"), dict(dtype="bfloat16", quantize="int8"),
                                dict(dtype="bfloat16", compile=True), dict(compile=True)])
def test_cuda_paths_agree_with_cpu_float32(ckpt_dir, model, kw):
    m = musicgen.load(ckpt_dir, device="cuda", **kw)
    if kw.get("dtype") is None:   # float32 compiled on the GPU: the reference's greedy codes
        assert torch.equal(m.generate_codes(PROMPTS, duration=0.4, top_k=1).cpu(),
                           model.generate_codes(PROMPTS, duration=0.4, top_k=1))
    codes = m.generate_codes(PROMPTS, duration=0.4, seed=0)
    assert codes.device.type == "cuda" and codes.shape == (2, 4, 20)
