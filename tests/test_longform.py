"""Long-form generation: the window loop, seams, alignment of conditions, and memory flat in the duration."""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from musicgen import MusicGen, preset
from musicgen.config import replace
from musicgen.longform import generate_long


# -- the loop, with a fake window ------------------------------------------------------------------------
def test_windows_continue_from_the_previous_tail_and_follow_the_melody():
    calls = []

    def window(known, frames, melodies):
        calls.append((known.clone(), frames, None if melodies is None else melodies[0][:3].tolist()))
        start = known[0, 0, 0].item() if known.shape[2] else 0    # codes count frames: code value = frame index
        return (torch.arange(frames) + start).expand(1, 2, frames).clone()

    melody = torch.arange(1000.0)
    codes = generate_long(window, torch.zeros(1, 2, 0, dtype=torch.long), 25, 10, 6, [melody], 10.0, 50)
    assert torch.equal(codes[0, 0], torch.arange(25))                          # seamless, right length
    assert [c[1] for c in calls] == [10, 10, 10, 7]                           # last window only what is left
    for i, (known, _, mel) in enumerate(calls):
        assert known.shape[2] == (0 if i == 0 else 4)                          # window - stride frames of prompt
        if i:
            assert known[0, 0].tolist() == list(range(6 * i, 6 * i + 4))       # the tail of what came before
        assert mel == [60.0 * i, 60.0 * i + 1, 60.0 * i + 2]                   # melody read from the window start


def test_melody_shorter_than_a_window_is_looped():
    seen = []

    def window(known, frames, melodies):
        seen.append(melodies[0])
        return torch.zeros(1, 1, frames, dtype=torch.long)

    generate_long(window, torch.zeros(1, 1, 0, dtype=torch.long), 15, 10, 5, [torch.arange(7.0)], 2.0, 20)
    assert seen[1][:9].tolist() == [3, 4, 5, 6, 0, 1, 2, 3, 4]                 # starts at 5 frames * 2 = sample 10


# -- a real model -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_codec_model():
    """Tiny random model with a 5 Hz codec (hop 6400), so two minutes are 600 frames."""
    cfg = preset("debug")
    cfg = replace(cfg, codec=replace(cfg.codec, ratios=(8, 5, 4, 4, 10)))
    torch.manual_seed(0)
    model = MusicGen(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for layer in model.codec.quantizer.layers:
            layer.codebook.embed.normal_()
    return model


def test_long_duration_has_no_seam_at_the_window_joins(slow_codec_model):
    m = slow_codec_model
    assert m.frame_rate == 5
    audio = m.generate(None, duration=40.0, seed=0, top_k=50)[0, 0]           # windows join at 18 s, 36 s
    assert audio.shape == (40 * 32000,) and torch.isfinite(audio).all()
    jumps = (audio[1:] - audio[:-1]).abs()
    joins = [int(t * 32000) for t in (18.0, 30.0, 36.0)]               # new windows start / old ones end
    at_joins = max(jumps[j - 6400:j + 6400].max().item() for j in joins)
    inside = jumps[int(3 * 32000):int(15 * 32000)].max().item()               # well inside the first window
    assert at_joins <= 1.5 * inside


class PeakBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once, for tensors created inside the mode."""

    def __init__(self):
        super().__init__()
        self.counts: dict[int, list[int]] = {}
        self.current = self.peak = 0

    def _release(self, ptr):
        entry = self.counts.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.counts[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                ptr = t.untyped_storage().data_ptr()
                entry = self.counts.setdefault(ptr, [t.untyped_storage().nbytes(), 0])
                if entry[1] == 0:
                    self.current += entry[0]
                    self.peak = max(self.peak, self.current)
                entry[1] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def test_memory_is_flat_in_the_duration(slow_codec_model):
    peaks = {}
    for seconds in (60.0, 120.0):
        with PeakBytes() as meter:
            codes = slow_codec_model.generate_codes(None, duration=seconds, seed=0)
        assert codes.shape == (1, 4, int(seconds * 5))
        peaks[seconds] = meter.peak
    print("peak bytes by duration:", peaks)
    # one window's caches and activations dominate; only the int64 codes grow (+10 kB per extra minute here)
    assert peaks[120.0] < 1.15 * peaks[60.0], peaks
    assert peaks[120.0] - peaks[60.0] < 40_000, peaks


@pytest.mark.parametrize("prompt_seconds, duration", [(0.0, 1.0), (0.1, 1.0), (0.4, 1.0), (0.4, 0.4)])
def test_one_progress_bar_covers_every_window(ckpt_dir, monkeypatch, prompt_seconds, duration):
    """A long-form generation shows one bar, whose total is every window's steps (audiocraft's callback adds the
    windows' offsets the same way): it ends exactly full."""
    import dataclasses

    import musicgen
    from musicgen import model as model_mod

    m = musicgen.load(ckpt_dir)
    m.cfg = dataclasses.replace(m.cfg, max_duration=0.4)                    # 20-frame windows
    bars, make = [], model_mod._progress
    monkeypatch.setattr(model_mod, "_progress", lambda total, enabled: bars.append(make(total, True)) or bars[-1])
    prompt = {} if not prompt_seconds else dict(prompt_audio=0.1 * torch.randn(1, int(32000 * prompt_seconds)))
    codes = m.generate_codes(["lofi"], duration=duration, extend_stride=0.2, top_k=1, progress=True, **prompt)
    assert codes.shape[-1] == int(duration * 50)   # 0.4 s of prompt: it fills the first window
    assert len(bars) == 1 and bars[0].total > 0 and bars[0].n == bars[0].total, (bars[0].n, bars[0].total)
