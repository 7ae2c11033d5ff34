"""The precision modes measured against the exact float32 path: bfloat16, float16, int8 and int4 weight-only,
and the quantised layers' three ways of multiplying (our kernels, PyTorch's packed kernels, widening)."""
from __future__ import annotations

import pytest
import torch

import musicgen
from conftest import kernel_or_skip
from musicgen import accel
from musicgen.accel import quant
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


@pytest.fixture(scope="module")
def ckpt_64(tmp_path_factory, spm_model):
    """A tiny checkpoint whose LM width (64) fits the int4 layout and aten's int4 kernel (N % 16 == 0)."""
    from conftest import build_hf_model, save_checkpoint

    return save_checkpoint(build_hf_model(lm_dim=64), tmp_path_factory.mktemp("tiny64"), spm_model)


@pytest.fixture(scope="module")
def int4_pair(ckpt_64):
    return musicgen.load(ckpt_64), musicgen.load(ckpt_64, quantize="int4")


@pytest.mark.parametrize("mode", ["bfloat16", "float16", "int8"])
def test_logits_within_tolerance_of_float32(model, fast_models, mode):
    err = relative_error(fast_models[mode], model)
    print(f"{mode}: max |logit error| / std = {err:.4f}")
    assert err < TOLERANCE[mode]


@pytest.mark.parametrize("kw", [dict(dtype="bfloat16"), dict(dtype="float16"), dict(quantize="int8"),
                                dict(quantize="int4")])
def test_fast_generation_is_well_formed_on_every_backend(ckpt_64, any_backend, kw):
    """Each mode on each backend this machine runs (the fused step, the layer loop, PyTorch's kernels alone):
    codes in range, greedy codes mostly those of float32, finite audio."""
    m, ref = musicgen.load(ckpt_64, **kw), musicgen.load(ckpt_64)
    codes = m.generate_codes(PROMPTS, duration=0.4, seed=0)
    assert codes.shape == (2, 4, 20) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 64
    greedy = m.generate_codes(PROMPTS, duration=0.4, top_k=1)
    agree = (greedy == ref.generate_codes(PROMPTS, duration=0.4, top_k=1)).float().mean().item()
    print(f"{kw} on {any_backend}: greedy agreement with float32 {agree:.2f}")
    assert agree > 0.8          # greedy paths mostly agree with float32 (ties in a tiny random model may differ)
    assert torch.isfinite(m.decode(codes)).all()
    prompt = torch.randn(2, 1, 6400, generator=torch.Generator().manual_seed(0)) * 0.3     # a continuation:
    cont = m.generate_codes(PROMPTS, duration=0.5, prompt_audio=prompt, top_k=1)            # its prefill too
    assert cont.shape == (2, 4, 25) and torch.equal(cont[:, :, :10], m.encode(prompt))


def test_int8_layers_replace_every_linear(fast_models):
    m = fast_models["int8"]
    linears = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    int8 = [n for n, mod in m.named_modules() if isinstance(mod, Int8Linear)]
    assert not linears
    assert any(n.startswith("lm.") for n in int8) and any(n.startswith("text_encoder.") for n in int8)
    assert m.lm.layers[0].fc1.weight.dtype == torch.int8 and m.precision.weights == "int8"


def test_int4_layers(int4_pair):
    _, m = int4_pair
    layer = m.lm.layers[0]
    for lin in (layer.self_attn.qkv, layer.self_attn.out, layer.cross_attn.q, layer.fc1, layer.fc2):
        assert isinstance(lin, Int4Linear) and lin.weight.dtype == torch.uint8
    assert all(isinstance(h, Int8Linear) for h in m.lm.heads)            # output heads stay in 8 bits
    assert not [n for n, mod in m.named_modules() if type(mod) is torch.nn.Linear and n.startswith("lm.")]
    assert any(isinstance(mod, Int8Linear) for mod in m.text_encoder.modules())
    assert m.precision.weights == "int4" and m.precision.text_kv == torch.bfloat16
    assert int4_pair[0].precision.exact


def test_int4_logits_within_tolerance(int4_pair):
    ref, m = int4_pair
    err = relative_error(m, ref)
    print(f"int4: max |logit error| / std = {err:.4f}")
    assert err < TOLERANCE["int4"]


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


def three_ways(layer_cls, lin, x):
    """A quantised layer's few-row product through our kernel, PyTorch's packed kernel (without our kernels)
    and the widened weight: (kernel or None, packed, widened), and which ran."""
    calls = []
    layer = layer_cls.from_linear(lin, torch.float32)
    with torch.inference_mode():
        kernel = layer(x) if layer._eager_kernel() is not None else None
        with accel.override(kernels=False):
            unkerneled = layer_cls.from_linear(lin, torch.float32)    # made where the kernels are missing
            real = unkerneled._packed_product
            unkerneled._packed_product = lambda: (lambda x2, product=real(): calls.append(1) or product(x2))
            packed = unkerneled(x)
            widened = unkerneled._fallback(x.reshape(-1, x.shape[-1])).view_as(packed)
    return kernel, packed, widened, bool(calls)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_quantised_layers_multiply_alike_every_way(cls):
    """Our kernel (float32 activations; int4: int8 activations per group), PyTorch's packed weight-only kernel
    (bfloat16 activations) and the widened weight compute the same layer, to their activations' rounding;
    all stay near the float layer they came from."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 96)
    x = torch.randn(2, 3, 512)
    kernel, packed, widened, ran_packed = three_ways(cls, lin, x)
    assert ran_packed and packed.shape == widened.shape == (2, 3, 96)
    tol = 0.02 * widened.std().item()
    torch.testing.assert_close(packed, widened, atol=tol, rtol=0)
    if kernel is not None:
        torch.testing.assert_close(kernel, widened, atol=tol, rtol=0)
    exact = lin(x).detach()
    rel = ((widened - exact).std() / exact.std()).item()    # 8 bits: about 0.005; 4 bits of a uniform init: 0.085
    assert 0 < rel < (0.02 if cls is Int8Linear else 0.15)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "no-kernels"])
@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_few_rows_product_is_the_layers_own_and_follows_copies(cls, kernels):
    """The product a decoding step binds (few_rows) computes what the layer's forward computes, in each
    activation dtype; a copy of the layer with other weights binds its own; autograd and many rows get the module."""
    import copy

    torch.manual_seed(0)
    lin, other = torch.nn.Linear(128, 48, bias=False), torch.nn.Linear(128, 48, bias=False)
    x = torch.randn(2, 128)
    with accel.override(kernels=kernels):
        layer = cls.from_linear(lin, torch.float32)
        with torch.inference_mode():
            for dtype in (torch.float32, torch.bfloat16):
                product = layer.few_rows(2, dtype)
                assert product is not layer and layer.few_rows(2, dtype) is product    # made once
                torch.testing.assert_close(product(x.to(dtype)), layer(x.to(dtype)), atol=0, rtol=0)
            layer.few_rows(2, torch.float32)
            twin = copy.deepcopy(layer)
            fresh = cls.from_linear(other, torch.float32)
            twin.weight.copy_(fresh.weight)
            twin.scales.copy_(fresh.scales)
            twin.pack()
            got = twin.few_rows(2, torch.float32)(x)
            torch.testing.assert_close(got, fresh(x), atol=0, rtol=0)
            assert (got - layer(x)).abs().max() > 0.01
            assert layer.few_rows(quant.GEMV_ROWS + 1, torch.float32) is layer
        assert layer.few_rows(2, torch.float32) is layer                      # autograd: forward's general path


def test_aten_int4_layout_only_where_it_applies():
    """Without our kernels, int4 layers keep aten's packed copy where its kernel takes the shape (N % 16 == 0);
    other shapes widen their weight. With our kernels there is no second copy."""
    torch.manual_seed(0)
    with accel.override(kernels=False):
        assert Int4Linear.from_linear(torch.nn.Linear(128, 48), torch.float32).aten is not None
        odd = Int4Linear.from_linear(lin := torch.nn.Linear(128, 40), torch.float32)
        assert odd.aten is None
        x = torch.randn(2, 128)
        with torch.inference_mode():
            torch.testing.assert_close(odd(x), odd._fallback(x))
    if quant.int4_gemv() is not None:
        assert Int4Linear.from_linear(lin, torch.float32).aten is None


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
    from musicgen.accel import kernels
    from musicgen.accel.quant import quantize_int4_weight_reference

    kernel_or_skip("int4_gemv")
    w = awkward_weights(N, K, N + K)
    packed, scales = kernels.int4_quantize()(w)
    ref_packed, ref_scales = quantize_int4_weight_reference(w)
    assert torch.equal(packed, ref_packed) and torch.equal(scales, ref_scales)
    assert torch.equal(quantize_int4_weight(w)[0], ref_packed)        # and the layers use it


@pytest.mark.parametrize("N,K", [(1, 8), (3, 37), (33, 320), (96, 4100)])
def test_native_int8_quantiser_is_bitwise_the_reference(N, K):
    from musicgen.accel import kernels
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
    from musicgen.accel import kernels

    kernel_or_skip("int4_gemv")
    g = torch.Generator().manual_seed(N + K)
    packed, scales = quantize_int4_weight(torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) * 10)
    ref = dequantize_int4_weight(packed, scales)
    assert torch.equal(kernels.int4_dequant()(packed, scales, False), ref)
    assert torch.equal(kernels.int4_dequant()(packed, scales, True), ref.bfloat16())


@pytest.mark.parametrize("bf16", [True, False])
def test_quantised_prefill_in_either_precision(monkeypatch, model, fast_models, int4_pair, bf16):
    """Many-row products of quantised layers (prefill) run as bfloat16 products where the CPU has bfloat16
    matrix instructions, else in float32: both within the mode's tolerance of float32, and the choice is
    really made (the two differ, slightly)."""
    monkeypatch.setattr(quant, "bf16_native", lambda: bf16)
    for mode, (m, ref) in {"int8": (fast_models["int8"], model), "int4": (int4_pair[1], int4_pair[0])}.items():
        err = relative_error(m, ref)                       # 2 prompts x 20 positions: 40 rows per product
        print(f"{mode} prefill in {'bfloat16' if bf16 else 'float32'}: max |logit error| / std = {err:.4f}")
        assert err < TOLERANCE[mode]
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 96)
    x = torch.randn(40, 512)
    for cls in (Int8Linear, Int4Linear):
        layer = cls.from_linear(lin, torch.float32)
        with torch.inference_mode():
            y = layer(x)
            monkeypatch.setattr(quant, "bf16_native", lambda: not bf16)
            other = layer(x)
            monkeypatch.setattr(quant, "bf16_native", lambda: bf16)
        gap = ((y - other).abs().max() / other.std()).item()
        assert 0 < gap < 0.02                              # bfloat16 rounding of activations and output


def test_bad_precision_options(ckpt_dir):
    with pytest.raises(ValueError, match="quantize"):
        musicgen.load(ckpt_dir, quantize="int3")
    with pytest.raises(ValueError, match="dtype"):
        musicgen.load(ckpt_dir, dtype="float8")


def test_parameter_count_counts_quantised_weights(model, fast_models, int4_pair):
    """What /v1/model reports: the same count for a checkpoint whatever its precision."""
    from musicgen.accel.quant import parameter_count

    full = sum(p.numel() for p in model.parameters())
    assert parameter_count(model) == full
    assert parameter_count(fast_models["int8"]) == full
    assert parameter_count(int4_pair[1]) == sum(p.numel() for p in int4_pair[0].parameters())
