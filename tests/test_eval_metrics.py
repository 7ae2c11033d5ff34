"""Each metric's protocol against an independent step-by-step computation (resampling, mono mix, peak and
16-bit trip, FAD's windows, chunking, cutting pairs, KL direction, averaging), sets against themselves, pairing,
captions, the embedding cache and bad input. Embedders have random weights (eval_support.py)."""
from __future__ import annotations

import json
import math

import julius
import numpy as np
import pytest
import scipy.linalg
import soundfile as sf
import torch

import eval_support as es
from musicgen.eval import evaluate
from musicgen.eval.clips import attach_captions, list_clips, pair, read_captions


@pytest.fixture(scope="module")
def embedders(tmp_path_factory):
    return {"vggish": es.vggish_embedder(), "passt": es.passt_embedder(),
            "clap": es.clap_embedder(tmp_path_factory.mktemp("bpe"))}


def run(gen, ref, metrics, embedders, **kw):
    kw.setdefault("cache_dir", None)
    return evaluate(gen, ref, metrics=metrics, embedders=embedders, progress=False, **kw)


def mono_at(path, rate):
    """The protocol's conversion, spelled out: julius' resample_frac on the file's channels, then their mean."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    x = torch.from_numpy(data.T.copy())
    return julius.resample_frac(x, sr, rate).mean(0) if sr != rate else x.mean(0)


# -- FAD ----------------------------------------------------------------------------------------------------------
def test_fad_protocol_step_by_step(tmp_path, embedders):
    """Each clip at 16 kHz mono, written as audiocraft writes it (peak -1 dBFS, 16-bit), read as Google's code
    reads it (int16 values) and divided by its positive peak, then one example per 1 s window every 0.5 s:
    4 for a 2.5 s clip, 5 for a 3.1 s one."""
    from musicgen.eval.audio import PEAK

    gen = [es.write(tmp_path / "gen", f"g{i}.wav", es.tone(2.5, 44100, 200 + 150 * i, seed=i, channels=2), 44100)
           for i in range(3)]
    ref = [es.write(tmp_path / "ref", f"r{i}.wav", 0.4 * es.tone(3.1, 32000, 300 + 90 * i, seed=10 + i))
           for i in range(3)]
    report, _ = run(tmp_path / "gen", tmp_path / "ref", ["fad"], embedders)
    model = embedders["vggish"].model

    def embeddings(paths):
        rows = []
        for p in paths:
            x = mono_at(p, 16000)
            x = x * (PEAK / x.abs().max())                                       # audio_write(strategy="peak")
            pcm = torch.clamp(torch.round(x * 32768), -32768, 32767).double()     # pcm_s16le, read by scipy
            x = pcm / max(0.1, float(pcm.max()))                                 # AudioSetModel's normalize
            with torch.no_grad():
                rows.append(model(es.google_fad_examples(x.numpy())).double().numpy())
        return np.concatenate(rows)

    a, b = embeddings(gen), embeddings(ref)
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.trace(scipy.linalg.sqrtm(s_a @ s_b)).real
    expected = (mu_a - mu_b) @ (mu_a - mu_b) + np.trace(s_a) + np.trace(s_b) - 2 * root
    v = report.values["fad"]
    assert v["value"] == pytest.approx(expected, rel=1e-4)
    assert v["embeddings"] == len(a) == 3 * 4 and v["reference_embeddings"] == len(b) == 3 * 5 and v["clips"] == 3


def test_fad_input_is_divided_by_its_positive_peak():
    """Google's reader keeps the int16 values of audiocraft's file (no division by 32768) and AudioSetModel
    divides the whole clip by its largest value, at least 0.1: the positive peak lands on 1 even when the
    negative one is deeper (which then goes below -1), and a clip with no positive sample is scaled by 10."""
    from musicgen.eval.audio import PEAK, fad_waveform

    x = torch.from_numpy(es.tone(3.0, 16000, 300, seed=4)[:, 0])
    for clip in (x - 0.6 * x.abs(), -x.abs()):
        pcm = torch.clamp(torch.round(clip * (PEAK / clip.abs().max()) * 32768), -32768, 32767).double()
        assert -pcm.min() > pcm.max()                  # the negative peak is the larger one
        got = fad_waveform(clip)
        assert got.dtype == torch.float64 and torch.equal(got, pcm / max(0.1, float(pcm.max())))
    assert float(fad_waveform(x - 0.6 * x.abs()).max()) == 1.0
    assert float(fad_waveform(torch.zeros(100)).abs().max()) == 0.0


def test_fad_of_a_set_against_itself_and_with_noise(tmp_path, embedders):
    clean = es.make_set(tmp_path / "ref", 4, 1.0, seed=3)
    fads = []
    for level in (0.0, 0.02, 0.1, 0.4):
        folder = tmp_path / f"noisy{level}"
        for i, p in enumerate(clean):
            x, sr = sf.read(str(p), dtype="float32")
            noise = np.random.default_rng(i).standard_normal(x.shape).astype(np.float32)
            es.write(folder, p.name, x + level * noise, sr)
        report, _ = run(folder, tmp_path / "ref", ["fad"], embedders, cache_dir=tmp_path / "cache")
        fads.append(report.values["fad"]["value"])
    assert abs(fads[0]) < 1e-6 * fads[-1]
    assert fads[0] < fads[1] < fads[2] < fads[3]


def test_fad_options_reference_stats_and_per_clip(tmp_path, embedders):
    from musicgen.eval import frechet

    es.make_set(tmp_path / "gen", 3, 2.0, seed=1)
    es.make_set(tmp_path / "ref", 3, 1.0, seed=2)
    cache = tmp_path / "cache"
    report, _ = run(tmp_path / "gen", tmp_path / "ref", ["fad"], embedders, per_clip_fad=True, fad_inf=True,
                    cache_dir=cache)
    frechet.save_stats(tmp_path / "ref.npz", report.stats, {})
    again, settings = run(tmp_path / "gen", None, ["fad"], embedders, reference_stats=tmp_path / "ref.npz",
                          cache_dir=cache)
    assert again.values["fad"]["value"] == pytest.approx(report.values["fad"]["value"], rel=1e-9)
    assert settings["reference"] is None
    assert set(report.per_clip) == {"clip0", "clip1", "clip2"} and all("fad" in r for r in report.per_clip.values())
    assert math.isfinite(report.values["fad"]["fad_inf"]["value"])


# -- KL -----------------------------------------------------------------------------------------------------------
def test_kl_protocol_step_by_step(tmp_path, embedders):
    """A 22 s generated clip against a 21 s stereo 44.1 kHz reference: both cut to 21 s, then 20 s chunks
    (20 s + 1 s); a 20.1 s pair: its 0.1 s tail chunk is dropped. KL(reference ‖ generated) per chunk pair
    with 1e-6 added to the generated side, averaged over the 3 chunk pairs."""
    g0 = es.write(tmp_path / "gen", "a.wav", es.tone(22.0, 32000, 220, seed=1))
    r0 = es.write(tmp_path / "ref", "a.flac", es.tone(21.0, 44100, 330, seed=2, channels=2), 44100, "PCM_24")
    g1 = es.write(tmp_path / "gen", "b.wav", es.tone(20.1, 32000, 500, seed=3))
    r1 = es.write(tmp_path / "ref", "b.wav", es.tone(20.1, 32000, 700, seed=4))
    report, _ = run(tmp_path / "gen", tmp_path / "ref", ["kl"], embedders)
    model = embedders["passt"].model

    def probs(path, seconds):
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        x = torch.from_numpy(data.T.copy())[:, : round(seconds * sr)]
        x = (julius.resample_frac(x, sr, 32000) if sr != 32000 else x).mean(0)
        chunks = [c for c in torch.split(x, 640000) if c.shape[0] > 4800]
        with torch.no_grad():
            return [torch.softmax(model(c[None]), -1)[0].double().numpy() for c in chunks]

    def kl_div(pred, target):   # audiocraft's metrics.kld.kl_divergence, verbatim in torch
        pred, target = torch.from_numpy(pred), torch.from_numpy(target)
        return float(torch.nn.functional.kl_div((pred + 1e-6).log(), target, reduction="none").sum(-1))

    pq, qp, n = 0.0, 0.0, 0
    for g, r, d in ((g0, r0, 21.0), (g1, r1, 20.1)):
        for p_gen, p_ref in zip(probs(g, d), probs(r, d)):
            pq += kl_div(p_gen, p_ref)
            qp += kl_div(p_ref, p_gen)
            n += 1
    v = report.values["kl"]
    assert n == 3 and v["chunks"] == 3 and v["clips"] == 2
    assert v["value"] == pytest.approx(pq / n, rel=1e-4) and v["kl_gen_ref"] == pytest.approx(qp / n, rel=1e-4)
    assert v["value"] > 0.01 and v["value"] != pytest.approx(v["kl_gen_ref"], rel=1e-3)


def test_kl_and_chroma_of_a_set_against_itself(tmp_path, embedders):
    es.make_set(tmp_path / "ref", 3, 3.0, seed=5)
    report, _ = run(tmp_path / "ref", tmp_path / "ref", ["kl", "chroma"], embedders)
    assert abs(report.values["kl"]["value"]) < 1e-5 and abs(report.values["kl"]["kl_gen_ref"]) < 1e-5
    assert report.values["chroma"]["value"] == pytest.approx(1.0)


# -- CLAP ---------------------------------------------------------------------------------------------------------
def test_clap_protocol_step_by_step(tmp_path, embedders):
    from musicgen.eval.clap import audio_input

    es.write(tmp_path / "gen", "x.wav", es.tone(12.0, 32000, 250, seed=1, channels=2))   # first 10 s
    es.write(tmp_path / "gen", "y.wav", es.tone(3.0, 24000, 600, seed=2), 24000)          # repeated, padded
    es.write(tmp_path / "gen", "z.wav", es.tone(2.0, 32000, 900, seed=3))                 # no caption: skipped
    (tmp_path / "caps.jsonl").write_text(json.dumps({"path": "x.wav", "caption": "80s pop track with synth"}) + "\n"
                                         + json.dumps({"path": "y.wav", "caption": "calm acoustic guitar"}) + "\n")
    report, _ = run(tmp_path / "gen", None, ["clap"], embedders, captions=tmp_path / "caps.jsonl")
    e = embedders["clap"]
    cos = []
    for name, caption in (("x.wav", "80s pop track with synth"), ("y.wav", "calm acoustic guitar")):
        x = audio_input(mono_at(tmp_path / "gen" / name, 48000))
        with torch.no_grad():
            a = e.model.audio_embedding(x[None])[0]
            t = e.model.text_embedding(*e.tokenizer([caption]))[0]
        cos.append(float(torch.nn.functional.cosine_similarity(a, t, dim=0, eps=1e-8)))
    assert report.values["clap"]["value"] == pytest.approx(np.mean(cos), abs=1e-5)
    assert report.values["clap"]["clips"] == 2
    assert [(s["key"], s["reason"]) for s in report.skipped] == [("z", "no caption")]


def test_clap_without_any_caption_is_an_error(tmp_path, embedders):
    es.make_set(tmp_path / "gen", 2, 1.0)
    with pytest.raises(ValueError, match="no generated clip has a caption"):
        run(tmp_path / "gen", None, ["clap"], embedders)


# -- chroma -------------------------------------------------------------------------------------------------------
def test_chroma_protocol_step_by_step(tmp_path, embedders):
    """Pairs cut to the shorter clip, both at 32 kHz, ceil(samples / 4096) frames of the argmax chromagram,
    the frame cosines averaged over all frames of all pairs (not per clip)."""
    from musicgen.chroma import chromagram
    from musicgen.config import MelodyConfig

    es.write(tmp_path / "gen", "a.wav", es.tone(3.0, 32000, 261.6, seed=1))
    es.write(tmp_path / "ref", "a.wav", es.tone(2.0, 48000, 261.6, noise=0.3, seed=2), 48000)
    es.write(tmp_path / "gen", "b.wav", es.tone(5.0, 32000, 440.0, seed=3))
    es.write(tmp_path / "ref", "b.wav", es.tone(5.0, 32000, 392.0, seed=4))
    report, _ = run(tmp_path / "gen", tmp_path / "ref", ["chroma"], embedders)
    total, frames = 0.0, 0
    for name, d in (("a.wav", 2.0), ("b.wav", 5.0)):
        xs = []
        for side in ("gen", "ref"):
            data, sr = sf.read(str(tmp_path / side / name), dtype="float32", always_2d=True)
            x = torch.from_numpy(data.T.copy())[:, : round(d * sr)]
            xs.append(julius.resample_frac(x, sr, 32000).mean(0) if sr != 32000 else x.mean(0))
        t = math.ceil(xs[0].shape[0] / 4096)
        a, b = (chromagram(x[None], MelodyConfig())[0, :t].numpy() for x in xs)
        norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-8)
        total += float(np.sum(np.sum(a * b, 1) / norms))
        frames += t
    v = report.values["chroma"]
    assert v["frames"] == frames == math.ceil(64000 / 4096) + math.ceil(160000 / 4096)
    assert v["value"] == pytest.approx(total / frames)
    assert report.per_clip["b"]["chroma"] < 0.5 < report.per_clip["a"]["chroma"]


# -- sets, pairing, captions ------------------------------------------------------------------------------------
def test_pairing_lists_unpaired_clips(tmp_path, embedders):
    es.write(tmp_path / "gen", "sub/a.wav", es.tone(1.0))
    es.write(tmp_path / "gen", "only_gen.wav", es.tone(1.0))
    es.write(tmp_path / "ref", "sub/a.flac", es.tone(1.0), subtype="PCM_16")
    es.write(tmp_path / "ref", "only_ref.wav", es.tone(1.0))
    pairs, g, r = pair(list_clips(tmp_path / "gen"), list_clips(tmp_path / "ref"))
    assert [(a.key, b.key) for a, b in pairs] == [("sub/a", "sub/a")]
    assert [c.key for c in g] == ["only_gen"] and [c.key for c in r] == ["only_ref"]
    report, _ = run(tmp_path / "gen", tmp_path / "ref", ["chroma"], embedders)
    assert {(s["set"], s["key"]) for s in report.skipped} == {("generated", "only_gen"), ("reference", "only_ref")}
    assert report.values["chroma"]["clips"] == 1


def test_no_pair_at_all_is_an_error(tmp_path, embedders):
    es.write(tmp_path / "gen", "a.wav", es.tone(1.0))
    es.write(tmp_path / "ref", "b.wav", es.tone(1.0))
    with pytest.raises(ValueError, match="no generated clip has a reference clip"):
        run(tmp_path / "gen", tmp_path / "ref", ["kl"], embedders)


def test_manifests_and_captions(tmp_path):
    es.write(tmp_path / "audio", "x1.wav", es.tone(0.5))
    es.write(tmp_path / "audio", "x2.wav", es.tone(0.5))
    es.write(tmp_path / "audio", "x3.wav", es.tone(0.5))
    (tmp_path / "audio" / "x2.txt").write_text("a sidecar caption\n")
    (tmp_path / "audio" / "x3.json").write_text(json.dumps({"description": "audiocraft's sidecar"}))
    (tmp_path / "set.jsonl").write_text("".join(json.dumps({"path": f"audio/x{i}.wav"}) + "\n" for i in (1, 2, 3)))
    clips = list_clips(tmp_path / "set.jsonl")
    assert [c.key for c in clips] == ["audio/x1", "audio/x2", "audio/x3"]
    (tmp_path / "caps.csv").write_text("ytid,start_s,caption\nx1,0,MusicCaps style caption\n")
    attach_captions(clips, [], read_captions(tmp_path / "caps.csv"))
    assert [c.caption for c in clips] == ["MusicCaps style caption", "a sidecar caption", "audiocraft's sidecar"]
    (tmp_path / "bad.csv").write_text("name,text\nx1,hello\n")
    with pytest.raises(ValueError, match="needs a 'caption' and a 'path' or 'ytid'"):
        read_captions(tmp_path / "bad.csv")
    (tmp_path / "dup").mkdir()
    es.write(tmp_path / "dup", "a.wav", es.tone(0.2))
    es.write(tmp_path / "dup", "a.flac", es.tone(0.2), subtype="PCM_16")
    with pytest.raises(ValueError, match="same key 'a'"):
        list_clips(tmp_path / "dup")


# -- the cache ----------------------------------------------------------------------------------------------------
def test_cache_embeds_only_new_clips(tmp_path, embedders):
    es.make_set(tmp_path / "gen", 3, 1.5, seed=1)
    es.make_set(tmp_path / "ref", 3, 1.5, seed=2)
    for i in range(3):
        (tmp_path / "gen" / f"clip{i}.txt").write_text(f"lofi beat {i}")
    first, s1 = run(tmp_path / "gen", tmp_path / "ref", ["fad", "kl", "clap"], embedders, cache_dir=tmp_path / "cache")
    assert s1["cache"]["misses"] == 6 + 6 + 3 + 3 and s1["cache"]["hits"] == 0   # clap: 3 clips and 3 captions
    again, s2 = run(tmp_path / "gen", tmp_path / "ref", ["fad", "kl", "clap"], embedders, cache_dir=tmp_path / "cache")
    assert s2["cache"]["misses"] == 0 and again.values == first.values
    es.write(tmp_path / "gen", "clip9.wav", es.tone(1.5, freq=300, seed=9))
    _, s3 = run(tmp_path / "gen", tmp_path / "ref", ["fad"], embedders, cache_dir=tmp_path / "cache")
    assert s3["cache"]["misses"] == 1
    es.write(tmp_path / "gen", "clip0.wav", es.tone(1.5, freq=301, seed=9))   # changed content: embedded again
    _, s4 = run(tmp_path / "gen", tmp_path / "ref", ["fad"], embedders, cache_dir=tmp_path / "cache")
    assert s4["cache"]["misses"] == 1


def test_an_embedder_s_new_cache_version_keeps_the_others_entries(tmp_path, embedders, monkeypatch):
    """A change to VGGish's protocol re-embeds VGGish's clips only: PaSST's and CLAP's entries stay valid."""
    from musicgen.eval import metrics

    es.make_set(tmp_path / "gen", 2, 1.5, seed=1)
    es.make_set(tmp_path / "ref", 2, 1.5, seed=2)
    for i in range(2):
        (tmp_path / "gen" / f"clip{i}.txt").write_text(f"lofi beat {i}")
    _, s1 = run(tmp_path / "gen", tmp_path / "ref", ["fad", "kl", "clap"], embedders, cache_dir=tmp_path / "cache")
    assert s1["cache"]["misses"] == 4 + 4 + 2 + 2
    monkeypatch.setitem(metrics.CACHE_VERSIONS, "vggish", metrics.cache_version(embedders["vggish"]) + 1)
    _, s2 = run(tmp_path / "gen", tmp_path / "ref", ["fad", "kl", "clap"], embedders, cache_dir=tmp_path / "cache")
    assert s2["cache"]["misses"] == 4 and s2["cache"]["hits"] == 4 + 2 + 2


# -- bad input ----------------------------------------------------------------------------------------------------
def test_empty_folder_and_missing_paths(tmp_path, embedders):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no audio files"):
        run(tmp_path / "empty", tmp_path / "empty", ["fad"], embedders)
    with pytest.raises(ValueError, match="does not exist"):
        run(tmp_path / "nowhere", None, ["fad"], embedders)
    with pytest.raises(ValueError, match="unknown metric 'fid'"):
        run(tmp_path / "empty", None, ["fid"], embedders)


def test_zero_length_short_and_silent_clips_are_listed(tmp_path, embedders):
    es.make_set(tmp_path / "ref", 3, 2.0, seed=2)
    es.make_set(tmp_path / "gen", 3, 2.0, seed=1)
    sf.write(str(tmp_path / "gen" / "empty.wav"), np.zeros((0, 1), np.float32), 32000)
    es.write(tmp_path / "gen", "short.wav", es.tone(0.5))
    es.write(tmp_path / "gen", "under_1s.wav", es.tone(0.99))    # VGGish's first window needs 1 s at 16 kHz
    es.write(tmp_path / "gen", "just_1s.wav", es.tone(1.0))
    es.write(tmp_path / "gen", "silent.wav", np.zeros((64000, 1), np.float32))
    report, _ = run(tmp_path / "gen", tmp_path / "ref", ["fad"], embedders)
    reasons = {s["key"]: s["reason"] for s in report.skipped}
    assert reasons["empty"] == "file is empty" and "too short" in reasons["short"]
    assert "too short" in reasons["under_1s"] and "just_1s" not in reasons
    assert report.notes == [{"key": "silent", "set": "generated", "note": "silent (kept)"}]
    assert report.values["fad"]["clips"] == 5 and math.isfinite(report.values["fad"]["value"])


def test_a_clip_of_one_sample_is_skipped_by_every_metric(tmp_path, embedders):
    """One sample at 48 kHz leaves no sample at VGGish's 16 kHz and no chroma frame: the clip is listed as
    skipped, and every metric is computed over the others."""
    for which, seed in (("gen", 1), ("ref", 2)):
        es.make_set(tmp_path / which, 3, 2.0, seed=seed)
        es.write(tmp_path / which, "tiny.wav", np.full((1, 1), 0.5, np.float32), 48000)
    report, _ = run(tmp_path / "gen", tmp_path / "ref", ["fad", "kl", "chroma"], embedders)
    skipped = {(s["key"], s["set"], s["metric"]) for s in report.skipped}
    assert {("tiny", "generated", m) for m in ("fad", "kl", "chroma")} <= skipped
    assert ("tiny", "reference", "fad") in skipped
    assert all(report.values[m]["clips"] == 3 for m in ("fad", "kl", "chroma"))
    assert all(math.isfinite(report.values[m]["value"]) for m in ("fad", "kl", "chroma"))
    from musicgen.eval.audio import fad_waveform
    assert fad_waveform(torch.zeros(0)).shape == (0,)


def test_mismatched_sample_rates_are_converted_per_clip(tmp_path, embedders):
    """A reference at 48 kHz scores as the same clip converted to 32 kHz beforehand would (to resampling
    precision): each clip is converted at its own rate, nothing assumes one rate per set."""
    es.write(tmp_path / "gen", "a.wav", es.tone(3.0, 32000, 300, seed=1))
    x48 = es.tone(3.0, 48000, 450, seed=2)
    es.write(tmp_path / "ref48", "a.wav", x48, 48000)
    x32 = julius.resample_frac(torch.from_numpy(x48.T.copy()), 48000, 32000).numpy().T
    es.write(tmp_path / "ref32", "a.wav", x32, 32000)
    a, _ = run(tmp_path / "gen", tmp_path / "ref48", ["kl", "chroma"], embedders)
    b, _ = run(tmp_path / "gen", tmp_path / "ref32", ["kl", "chroma"], embedders)
    assert a.values["kl"]["value"] == pytest.approx(b.values["kl"]["value"], rel=1e-3)
    assert a.values["chroma"]["value"] == pytest.approx(b.values["chroma"]["value"], abs=0.05)


def test_missing_weight_file_offline_is_one_line(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from musicgen.eval import load_embedder, weights

    with pytest.raises(ValueError) as err:
        weights.resolve("vggish-10086976.pth", tmp_path)
    assert str(err.value) == (f"vggish-10086976.pth is not in {tmp_path} (it comes from "
                              "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth)")

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("MUSICGEN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"^passt-s-f128-20sec-p16-s10-ap.474-swa.pt is not in the cache .* cannot be "
                                         r"downloaded from https://github.com/kkoutini/.*\(no network\); download it"):
        load_embedder("passt")
    assert not list((tmp_path / "cache").rglob("*.pt")) and "\n" not in str(err.value)
