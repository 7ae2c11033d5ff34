"""Generation behaviour: delay pattern, sampling rules, seeds, shapes, bad arguments."""
from __future__ import annotations

import pytest
import torch

from musicgen.delay import build_pattern, codebook_delays, pattern_length, revert_pattern, valid_mask
from musicgen.sampling import SamplingParams, apply_cfg, sample


def test_delay_pattern_round_trip_and_layout():
    codes = torch.arange(2 * 4 * 5).view(2, 4, 5)
    seq = build_pattern(codes, frames=5, special=99)
    assert seq.shape == (2, 4, pattern_length(5, 4)) == (2, 4, 9)
    assert seq[0, 0].tolist() == [99, 0, 1, 2, 3, 4, 99, 99, 99]
    assert seq[0, 3].tolist() == [99, 99, 99, 99, 15, 16, 17, 18, 19]
    assert torch.equal(revert_pattern(seq, 5), codes)
    assert torch.equal(valid_mask(4, 5), seq[0] != 99)


def test_delay_pattern_unknown_positions_and_stereo():
    seq = build_pattern(torch.zeros(1, 8, 2, dtype=torch.long), frames=4, special=7, audio_channels=2)
    assert codebook_delays(8, 2) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert seq.shape == (1, 8, 8)
    assert seq[0, 2].tolist() == [7, 7, 0, 0, -1, -1, 7, 7]   # level 1 left: delay 1, two known frames
    assert seq[0, 3].tolist() == seq[0, 2].tolist()          # right channel shares the delay


def test_cfg_formula():
    cond, uncond = torch.randn(2, 4, 10), torch.randn(2, 4, 10)
    rows = torch.stack([cond, uncond], dim=1).flatten(0, 1)                    # c0 u0 c1 u1: the engine's layout
    torch.testing.assert_close(apply_cfg(rows, 3.0), uncond + 3.0 * (cond - uncond))


def test_top_k_never_leaves_the_k_best():
    logits = torch.randn(64, 4, 100, generator=torch.Generator().manual_seed(0))
    allowed = logits.topk(5, dim=-1).indices
    g = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(50):
        tok = sample(logits, SamplingParams(top_k=5), g)
        assert (tok[..., None] == allowed).any(-1).all()
        seen.update(tok[0, 0].tolist() if tok[0, 0].dim() else [tok[0, 0].item()])
    assert len(seen) > 1, "top-k 5 sampling should not be deterministic"


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    toks = {sample(probs.log(), SamplingParams(top_k=0, top_p=0.7), g).item() for _ in range(200)}
    assert toks == {0, 1}


def test_greedy_is_argmax():
    logits = torch.randn(3, 4, 50)
    assert torch.equal(sample(logits, SamplingParams(top_k=1)), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0)), logits.argmax(-1))


def test_seed_reproduces_and_differs(model):
    a = model.generate_codes(["lofi beat"], duration=0.2, seed=7)
    b = model.generate_codes(["lofi beat"], duration=0.2, seed=7)
    c = model.generate_codes(["lofi beat"], duration=0.2, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_frames_are_rounded_down_as_audiocraft(model):
    """audiocraft's total_gen_len = int(duration * frame_rate), float products included."""
    assert [model.frames_for(d) for d in (10, 0.02, 0.58, 1.03, 8.05, 2.76)] == [500, 1, 28, 51, 402, 138]
    assert model.generate_codes(["a"], duration=0.58, top_k=1).shape[-1] == 28
    with pytest.raises(ValueError, match="at least one frame"):
        model.frames_for(0.01)


def test_shapes_and_frames(model):
    codes = model.generate_codes(["a", "b"], duration=0.33, seed=0)
    assert codes.shape == (2, 4, int(0.33 * 50)) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 64
    audio = model.decode(codes)
    assert audio.shape == (2, 1, codes.shape[-1] * 640) and audio.dtype == torch.float32
    assert torch.isfinite(audio).all()
    assert model.sample_rate == 32000


def test_no_guidance_runs_one_row_per_prompt(model):
    codes = model.generate_codes(["ambient pads"], duration=0.1, guidance_scale=1.0, top_k=1)
    assert codes.shape == (1, 4, 5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "at least one"),
    (dict(duration=0), "positive"),
    (dict(duration=-1.0), "positive"),
    (dict(duration=float("inf")), "finite"),
    (dict(duration=31.0, extend_stride=30.0), "extend_stride"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=2), "inconsistent batch"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"),
    (dict(guidance_scale=-2.0), "guidance_scale"),
])
def test_bad_generation_arguments(model, kwargs, message):
    args = dict(prompts=["lofi"], duration=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        model.generate_codes(args.pop("prompts"), **args)


def test_decode_rejects_bad_codes(model):
    with pytest.raises(ValueError, match="codes must"):
        model.decode(torch.zeros(1, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="lie in"):
        model.decode(torch.full((1, 4, 5), 64, dtype=torch.long))


def test_rows_without_text_get_the_null_condition(model):
    """audiocraft takes None or "" descriptions in a batch: those rows are conditioned on nothing (the same null
    condition guidance uses), the others on their text; each row still gets its solo codes."""
    kw = dict(duration=0.3, top_k=1)
    solo = model.generate_codes(["lofi beat"], **kw)
    unconditional = model.generate_codes(None, **kw)
    for missing in (None, ""):
        both = model.generate_codes(["lofi beat", missing], **kw)
        assert torch.equal(both[:1], solo) and torch.equal(both[1:], unconditional), missing
    assert torch.equal(model.generate_codes(["", None], **kw), unconditional.expand(2, -1, -1))
    states, mask = model.encode_text(["lofi beat", ""])
    assert mask[1].sum() == 0 and states[1].abs().sum() == 0
