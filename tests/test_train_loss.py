"""The training objective against transformers' MusicGen loss, the delay-pattern targets, LoRA and the schedule."""
from __future__ import annotations

import math

import pytest
import torch

import musicgen
from musicgen.train.loss import IGNORE, batch_loss, delayed_batch, target_counts
from musicgen.train.lora import LoRALinear, add_lora, merge_lora
from musicgen.train.loop import lr_factor
from musicgen.train.network import Network, text_states
from train_common import one_thread  # noqa: F401  (autouse)

PROMPTS = ["80s pop track with bassy drums and synth", "lofi", ""]   # the last one: the null condition


def _codes(B, K, T, V, seed=0):
    return torch.randint(0, V, (B, K, T), generator=torch.Generator().manual_seed(seed))


def _hf_labels(targets, pad):
    labels = targets.clone()
    labels[labels == IGNORE] = pad            # transformers ignores its pad id in labels
    return labels.transpose(1, 2)             # (B, L, K)


def test_delayed_targets_are_audiocraft_valid_steps():
    """Codebook k predicts frames 0 .. n - 1 - k of a row of n frames, each once, delayed by k: audiocraft's LM
    reads the pattern only up to the last step where every codebook is defined (keep_only_valid_steps)."""
    codes = torch.arange(2 * 4 * 5).reshape(2, 4, 5) % 60
    lengths = torch.tensor([5, 3])
    inputs, targets = delayed_batch(codes, lengths, special=64)
    assert inputs.shape == targets.shape == (2, 4, 5 + 3)
    assert (inputs[:, :, 0] == 64).all()                                   # the start token
    for b, n in enumerate(lengths.tolist()):
        for k in range(4):
            real = targets[b, k][targets[b, k] != IGNORE]
            assert real.tolist() == codes[b, k, :max(0, n - k)].tolist()   # delayed by k, each frame once
            assert (targets[b, k, :k] == IGNORE).all()
            seen = inputs[b, k, 1 + k:1 + k + n]                           # the LM still reads the frames
            assert torch.equal(seen, codes[b, k, :len(seen)])
    assert (inputs[1, 0, 4:] == 64).all()          # frames past a row's length are special tokens on input
    assert target_counts([5, 3], 4).tolist() == [8, 6, 4, 2]
    assert torch.equal((targets != IGNORE).sum(dim=(0, 2)), target_counts([5, 3], 4).long())
    stereo_in, stereo_t = delayed_batch(codes.repeat(1, 2, 1), lengths, special=64, audio_channels=2)
    assert stereo_t.shape == (2, 8, 5 + 3)
    pads = stereo_t == IGNORE                                              # L0 R0 L1 R1 ...: delays 0 0 1 1 2 2 3 3
    assert all(torch.equal(pads[:, 2 * i], pads[:, 2 * i + 1]) for i in range(4))
    assert torch.equal(pads[:, ::2], targets == IGNORE)
    assert target_counts([5, 3], 8, audio_channels=2).tolist() == [8, 8, 6, 6, 4, 4, 2, 2]


def test_loss_averages_each_codebook_over_its_own_targets():
    """audiocraft's _compute_cross_entropy: the mean CE of each codebook over its valid targets, then the mean
    over codebooks (written out here position by position)."""
    B, K, T, V = 2, 4, 6, 16
    codes = _codes(B, K, T, V)
    lengths = torch.tensor([6, 4])
    _, targets = delayed_batch(codes, lengths, special=V)
    logits = torch.randn(B, K, T + 3, V, generator=torch.Generator().manual_seed(3))
    loss, per_codebook = batch_loss(logits, targets)
    expected = []
    for k in range(K):
        terms = [torch.nn.functional.cross_entropy(logits[b, k, f + k], codes[b, k, f])
                 for b, n in enumerate(lengths.tolist()) for f in range(n - k)]   # frame f: logits at f + k
        expected.append(torch.stack(terms).mean())
    torch.testing.assert_close(per_codebook, torch.stack(expected))
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_loss_and_gradients_equal_transformers(ckpt_dir):
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    model = musicgen.load(ckpt_dir)
    hf = MusicgenForConditionalGeneration.from_pretrained(ckpt_dir).train()
    V = model.cfg.lm.vocab_size
    hf.config.decoder.decoder_start_token_id = V
    net = Network(model).requires_grad_(True)
    inputs, targets = delayed_batch(_codes(3, 4, 11, V), torch.tensor([11, 7, 11]), V)
    states, mask = text_states(model, PROMPTS)
    loss, per_codebook = batch_loss(net(inputs, states, mask), targets)
    loss.backward()

    enc = AutoTokenizer.from_pretrained(ckpt_dir)(PROMPTS, padding=True, return_tensors="pt")
    enc["attention_mask"][2] = 0                 # "": the null condition, as text_states masks it
    ref = hf(**enc, labels=_hf_labels(targets, V))
    ref.loss.backward()
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert per_codebook.shape == (4,) and math.isclose(per_codebook.mean().item(), loss.item(), rel_tol=1e-6)

    layers = hf.decoder.model.decoder.layers
    pairs = [(net.lm.layers[0].fc1, layers[0].fc1.weight.grad), (net.lm.layers[1].fc2, layers[1].fc2.weight.grad),
             (net.lm.embed[2], hf.decoder.model.decoder.embed_tokens[2].weight.grad),
             (net.lm.heads[3], hf.decoder.lm_heads[3].weight.grad), (net.text_proj, hf.enc_to_dec_proj.weight.grad),
             (net.lm.layers[0].self_attn.qkv, torch.cat([getattr(layers[0].self_attn, f"{p}_proj").weight.grad
                                                         for p in "qkv"])),
             (net.lm.layers[1].cross_attn.kv, torch.cat([getattr(layers[1].encoder_attn, f"{p}_proj").weight.grad
                                                         for p in "kv"]))]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours.weight.grad, theirs, atol=1e-6, rtol=1e-4)

def test_cpu_autocast_attends_in_float32(ckpt_dir, monkeypatch):
    """Mixed-precision training on CPU runs the products in bfloat16 and attention in float32 (PyTorch's bfloat16
    flash attention is the slower one there); loss and gradients stay near float32's."""
    model = musicgen.load(ckpt_dir)
    net = Network(model).requires_grad_(True)
    V = model.cfg.lm.vocab_size
    inputs, targets = delayed_batch(_codes(3, 4, 11, V), torch.tensor([11, 7, 11]), V)
    states, mask = text_states(model, PROMPTS)
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q.dtype, k.dtype, v.dtype)) or sdpa(q, k, v, **kw))

    def grads(dtype):
        net.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = net(inputs, states, mask, mask_dtype=dtype)
        loss, _ = batch_loss(logits, targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.lm.layers[0].parameters()]

    exact, exact_grads = grads(torch.float32)
    seen.clear()
    loss, mixed_grads = grads(torch.bfloat16)
    assert len(seen) == 2 * len(net.lm.layers) and set(seen) == {(torch.float32,) * 3}
    assert abs(loss - exact) < 0.02 * exact
    for g, ref in zip(mixed_grads, exact_grads):
        assert ((g - ref).norm() / ref.norm()).item() < 0.05


def test_melody_loss_equals_transformers(melody_ckpt_dir):
    from transformers import AutoTokenizer, MusicgenMelodyForConditionalGeneration

    model = musicgen.load(melody_ckpt_dir)
    hf = MusicgenMelodyForConditionalGeneration.from_pretrained(melody_ckpt_dir).train()
    V, L = model.cfg.lm.vocab_size, model.cfg.melody.chroma_length
    hf.config.decoder.decoder_start_token_id = V
    chroma = torch.nn.functional.one_hot(torch.randint(0, 12, (2, L), generator=torch.Generator().manual_seed(1)),
                                         12).float()
    inputs, targets = delayed_batch(_codes(2, 4, 9, V, seed=2), torch.tensor([9, 6]), V)
    states, mask = text_states(model, PROMPTS[:2])
    loss, _ = batch_loss(Network(model).requires_grad_(True)(inputs, states, mask, chroma), targets)
    enc = AutoTokenizer.from_pretrained(melody_ckpt_dir)(PROMPTS[:2], padding=True, return_tensors="pt")
    ref = hf(**enc, input_features=chroma, labels=_hf_labels(targets, V))
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_lora_merged_equals_unmerged(ckpt_dir):
    model = musicgen.load(ckpt_dir)
    names = set(model.state_dict())
    params = add_lora(model.lm, rank=4, alpha=8)
    wrapped = [m for m in model.lm.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * 7 and len(params) == 2 * len(wrapped)      # 7 linears per layer, 2 layers
    assert all(not p.requires_grad for n, p in model.lm.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)                                               # a trained adapter: B no longer 0
    V = model.cfg.lm.vocab_size
    inputs, _ = delayed_batch(_codes(2, 4, 10, V), torch.tensor([10, 10]), V)
    states, mask = text_states(model, PROMPTS[:2])
    net = Network(model)
    with torch.no_grad():
        unmerged = net(inputs, states, mask)
        assert merge_lora(model.lm) == len(wrapped)
        merged = net(inputs, states, mask)
    torch.testing.assert_close(merged, unmerged, atol=2e-5, rtol=1e-5)
    assert set(model.state_dict()) == names                                  # the checkpoint's names again


def test_schedule_warms_up_then_decays_to_a_tenth():
    factors = [lr_factor(i, warmup=4, steps=20) for i in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert factors[-1] == pytest.approx(0.1)
