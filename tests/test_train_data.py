"""`musicgen prepare` and the training data: codes as inference encodes them, captions, skips, resume, splits,
the rows each step reads, and every bad input as one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from musicgen.audio import convert_channels, load_audio, resample
from musicgen.cli import main
from musicgen.train import encode, prepare
from musicgen.train.dataset import Augment, CodesData, Row, augment_caption
from musicgen.train.encode import validation_files
from train_common import one_thread  # noqa: F401  (autouse)
from train_common import diverse_checkpoint, write_clips


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    """Good files of every kind, and one of each kind of bad file."""
    src = tmp_path_factory.mktemp("songs")
    rng = np.random.default_rng(0)
    noise = lambda sr, sec, ch=1: (0.3 * rng.standard_normal((int(sr * sec), ch))).astype(np.float32)  # noqa: E731
    sf.write(src / "a.wav", noise(32000, 1.3), 32000)
    (src / "a.txt").write_text("lofi hip hop\nbeat  with piano\n")
    sf.write(src / "b.flac", noise(44100, 0.9, 2), 44100)                     # stereo at 44.1 kHz
    (src / "b.json").write_text(json.dumps({"description": "techno track", "genre": "Techno ", "bpm": 128,
                                            "moods": "Dark, driving", "title": "ignored"}))
    sf.write(src / "nested_c.ogg", noise(22050, 0.8), 22050)                   # no caption
    (src / "sub").mkdir()
    sf.write(src / "sub" / "d.mp3", noise(48000, 1.0), 48000)
    (src / "sub" / "d.txt").write_text("epic orchestral soundtrack")
    (src / "broken.wav").write_bytes(b"RIFF not really a wav")
    sf.write(src / "silent.wav", np.zeros((32000, 1), np.float32), 32000)
    sf.write(src / "short.wav", noise(32000, 0.2), 32000)
    sf.write(src / "empty.wav", np.zeros((0, 1), np.float32), 32000)
    return src


@pytest.fixture(scope="module")
def data(songs, ckpt_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "data"
    summary = prepare(songs, out, str(ckpt_dir), segment=0.5, valid_fraction=0.25, progress=False)
    return out, summary


def test_codes_are_what_inference_encodes(songs, data, model):
    out, summary = data
    assert summary["files"] == 4 and 1 <= summary["valid_files"] <= 3
    d = CodesData(out)
    entries = d.splits["train"] + d.splits["valid"]
    by_source = {}
    for e in entries:
        by_source.setdefault(e["source"], []).append(e)
    a = by_source[str(songs / "a.wav")]
    # 1.3 s in 0.5 s segments: 0.5, 0.5, then 0.3 s < 0.8 x 0.5 s, stored for crops but no row of its own
    assert [(e["start"], e["frames"]) for e in a] == [(0.0, 25), (0.5, 25)]
    split = "train" if a[0] in d.splits["train"] else "valid"
    assert [(e["frames"], e.get("short", False)) for e in d.file_of(split, d.splits[split].index(a[0])).segments] \
        == [(25, False), (25, False), (15, True)]
    assert a[0]["caption"] == "lofi hip hop beat with piano"
    wav, sr = load_audio(songs / "b.flac")
    wav = resample(convert_channels(wav, 1), sr, 32000)[:, :16000]
    b = by_source[str(songs / "b.flac")][0]
    split = "train" if b in d.splits["train"] else "valid"
    stored = d.codes(split, d.splits[split].index(b))
    assert stored.dtype == np.uint16 and stored.shape == (4, 25)
    assert torch.equal(torch.from_numpy(stored.astype(np.int64))[None], model.encode(wav[None]))
    assert b["caption"] == "techno track"   # the metadata as audiocraft reads it (the index keeps the sidecar's)
    assert b["meta"] == {"bpm": 128.0, "genre": "techno", "moods": ["dark", "driving"]}
    assert by_source[str(songs / "nested_c.ogg")][0]["caption"] == ""
    assert by_source[str(songs / "sub" / "d.mp3")][0]["caption"] == "epic orchestral soundtrack"


def test_bad_files_are_listed_and_skipped(songs, data):
    out, summary = data
    skipped = dict(summary["skipped"])
    assert set(skipped) == {str(songs / n) for n in ("broken.wav", "silent.wav", "short.wav", "empty.wav")}
    assert skipped[str(songs / "silent.wav")] == "silent"
    assert skipped[str(songs / "short.wav")].startswith("too short (0.2 s")
    assert "empty" in skipped[str(songs / "empty.wav")] and "cannot read" in skipped[str(songs / "broken.wav")]
    assert summary["uncaptioned"] == [str(songs / "nested_c.ogg")]
    report = (out / "report.txt").read_text()
    assert "skipped 4 files" in report and "nested_c.ogg" in report and "unconditional" in report


def test_validation_holds_out_whole_files(data):
    d = CodesData(data[0])
    train, valid = {e["source"] for e in d.splits["train"]}, {e["source"] for e in d.splits["valid"]}
    assert not train & valid and len(train | valid) == 4
    assert valid == validation_files(sorted(train | valid), 0.25) and data[1]["valid_files"] == len(valid)


def test_validation_split_is_stable_as_files_come_and_go():
    """A file's split depends on its own path only: adding files moves none of the others (picking the first n
    by hash moved one out of validation for most additions). The share follows the fraction; a set too small
    for it still holds out one file and keeps one to train on."""
    names = [f"songs/track{i:04d}.wav" for i in range(4000)]
    valid = validation_files(names, 0.05)
    assert 0.04 < len(valid) / len(names) < 0.06
    for extra in ("songs/new_a.wav", "songs/new_b.flac", "songs/zz.mp3"):
        grown = validation_files(names + [extra], 0.05)
        assert grown - {extra} == valid
    assert validation_files(names[:3000], 0.05) == {n for n in valid if n in set(names[:3000])}
    assert len(validation_files(names[:2], 0.05)) == 1 and len(validation_files(names[:2], 0.99)) == 1
    assert validation_files(names[:1], 0.5) == set() and validation_files(names, 0.0) == set()


def test_prepare_resumes_where_a_kill_left_it(songs, ckpt_dir, tmp_path, monkeypatch):
    src = write_clips(tmp_path / "src", seconds=0.5)
    out = tmp_path / "data"
    prepare(src, out, str(ckpt_dir), segment=0.5, progress=False)
    before = CodesData(out)
    old = [before.codes("train", i).copy() for i in range(len(before))]
    size = (out / "parts" / "rank0.codes").stat().st_size
    with open(out / "parts" / "rank0.codes", "ab") as f:     # a kill after the codes of a file, before its line
        f.write(b"\x01\x02" * 77)
    with open(out / "parts" / "rank0.jsonl", "a") as f:      # ... or in the middle of its line
        f.write('{"source": "/half')
    write_clips(tmp_path / "more", seconds=0.5, captions=["a fourth clip"], seed=5)
    for f in (tmp_path / "more").iterdir():
        f.rename(src / f.name.replace("clip0", "clip3"))
    added = []
    real_add = encode.Encoder.add
    monkeypatch.setattr(encode.Encoder, "add", lambda self, s: (added.append(s.path.name), real_add(self, s))[1])
    prepare(src, out, str(ckpt_dir), segment=0.5, progress=False)
    assert added == ["clip3.wav"]                             # clip0..2 were done: not read again
    after = CodesData(out)
    assert len(after) == 4
    assert (out / "parts" / "rank0.codes").stat().st_size == size + 4 * 25 * 2
    for i, e in enumerate(before.splits["train"]):
        j = next(j for j, f in enumerate(after.splits["train"]) if f["source"] == e["source"])
        assert np.array_equal(after.codes("train", j), old[i])


def test_manifests_give_the_same_data(ckpt_dir, tmp_path):
    src = write_clips(tmp_path / "clips", seconds=0.5)
    folder = prepare(src, tmp_path / "from_folder", str(ckpt_dir), segment=0.5, progress=False)
    (tmp_path / "m.csv").write_text("path,caption\n" + "".join(f"clips/clip{i}.wav,\"{c}\"\n" for i, c in
                                                               enumerate(["lofi hip hop beat with mellow piano",
                                                                          "epic orchestral soundtrack",
                                                                          "techno with driving kick drum"])))
    for i in range(3):
        (src / f"clip{i}.txt").rename(src / f"clip{i}.caption")
        (src / f"clip{i}.json").write_text(json.dumps({"description": (src / f"clip{i}.caption").read_text()}))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": str(src / f"clip{i}.wav"), "duration": 0.5,
                                                          "sample_rate": 32000}) + "\n" for i in range(3)))
    for manifest in ("m.csv", "m.jsonl"):
        got = prepare(tmp_path / manifest, tmp_path / manifest.replace(".", "_"), str(ckpt_dir), segment=0.5,
                      progress=False)
        assert got["files"] == folder["files"] == 3 and not got["uncaptioned"]
        a, b = CodesData(tmp_path / "from_folder"), CodesData(tmp_path / manifest.replace(".", "_"))
        assert [e["caption"] for e in a.splits["train"]] == [e["caption"] for e in b.splits["train"]]
        assert all(np.array_equal(a.codes("train", i), b.codes("train", i)) for i in range(3))


def test_more_channels_than_a_stereo_checkpoint_has_keep_the_first_two(tmp_path, spm_model):
    """As audiocraft's convert_audio_channels: a 4-channel file trains a stereo checkpoint on its channels 0
    and 1 (not on a mono mix of all four copied to both)."""
    import musicgen

    ckpt = diverse_checkpoint(tmp_path / "stereo", spm_model, stereo=True)
    rng = np.random.default_rng(3)
    (tmp_path / "src").mkdir()
    sf.write(tmp_path / "src" / "quad.wav", (0.3 * rng.standard_normal((16000, 4))).astype(np.float32), 32000)
    prepare(tmp_path / "src", tmp_path / "data", str(ckpt), segment=0.5, progress=False)
    wav, _ = load_audio(tmp_path / "src" / "quad.wav")
    expected = musicgen.load(ckpt).encode(wav[:2][None])                                  # (1, 8, 25)
    stored = CodesData(tmp_path / "data").codes("train", 0)
    assert torch.equal(torch.from_numpy(stored.astype(np.int64))[None], expected)


def test_melody_data_stores_the_inference_chroma(melody_ckpt_dir, melody_model, tmp_path):
    from musicgen import chroma

    src = write_clips(tmp_path / "src", seconds=1.0, captions=["a tune"])
    prepare(src, tmp_path / "data", str(melody_ckpt_dir), segment=1.0, demucs=False, progress=False)
    d = CodesData(tmp_path / "data")
    wav, _ = load_audio(src / "clip0.wav")
    expected = chroma.chromagram(chroma.prepare_melody(wav, 32000, demucs=False)[None], melody_model.cfg.melody)
    assert np.array_equal(d.chroma("train", 0), expected[0].argmax(-1).numpy())
    rows = [d.valid_rows(50)[0]] if d.splits["valid"] else d.train_rows(1, 1, 50, 0, Augment(0, 0, chroma_dropout=0))
    batch = d.collate(rows, "train", 64, melody_model.cfg.melody)
    assert batch.chroma.shape == (1, melody_model.cfg.melody.chroma_length, 12)
    assert torch.equal(batch.chroma[0, :expected.shape[1]], expected[0])   # the crop's chroma, then looped


def test_rows_are_a_function_of_seed_and_step(data):
    d, other = CodesData(data[0]), CodesData(data[0])
    a = [d.train_rows(s, 4, 20, seed=7, augment=Augment()) for s in (1, 2, 3, 9)]
    b = [other.train_rows(s, 4, 20, seed=7, augment=Augment()) for s in (9, 3, 2, 1)][::-1]
    assert a == b                                             # the order steps are asked in does not matter
    assert a != [d.train_rows(s, 4, 20, seed=8, augment=Augment()) for s in (1, 2, 3, 9)]
    epoch = [r.segment for s in range(1, len(d) + 1) for r in d.train_rows(s, 1, 20, 7, Augment())]
    assert sorted(epoch) == list(range(len(d)))               # an epoch sees every segment once
    for rows in a:
        for r in rows:
            assert 0 <= r.start <= d.file_of("train", r.segment).frames - r.frames and r.frames == 20


def test_metadata_is_read_as_audiocraft_reads_it():
    """MusicInfo.from_dict's preprocessing (get_musical_key, get_bpm, get_keyword, get_keyword_list), in
    MusicInfo's field order, written out for a few sidecars."""
    from musicgen.train.sources import music_meta

    got = music_meta({"instrument": "Piano", "keywords": ["LoFi", " Piano "], "moods": "Chill, Relaxed",
                      "genre": "Hip-Hop ", "bpm": 90, "key": "C Major", "title": "not merged"})
    assert list(got.items()) == [("key", "c major"), ("bpm", 90.0), ("genre", "hip-hop"),
                                 ("moods", ["chill", "relaxed"]), ("keywords", ["lofi", "piano"]),
                                 ("instrument", "piano")]
    assert music_meta({"key": "C major, A minor", "bpm": "120.5", "moods": "dark  driving,sad", "genre": "None",
                       "instrument": "", "keywords": [3, "Fun"]}) == {"bpm": 120.5,
                                                                    "moods": ["dark", "driving", "sad"],
                                                                    "keywords": ["fun"]}
    assert music_meta({"bpm": "fast", "moods": [], "keywords": " , ", "genre": ["rock"], "key": 5}) == {}


def test_captions_are_rebuilt_as_audiocraft_rebuilds_them():
    """augment_music_info_description: a kept description always becomes desc.rstrip(".") + ". " + metadata,
    stripped; a dropped one leaves the metadata, or nothing (the null condition)."""
    def caption(text, meta, merge=1.0, drop=0.0):
        a = Augment(word_dropout=0.0, merge_text=merge, keep_field=1.0, drop_desc=drop)
        return augment_caption(text, meta, np.random.default_rng(0), a)

    assert caption("A lofi beat", {"bpm": 90.0}, merge=0.0) == "A lofi beat."
    assert caption("A lofi beat...", {}, merge=0.0) == "A lofi beat."
    assert caption("", {"bpm": 90.0}, merge=0.0) == ""
    assert caption("A lofi beat.", {"bpm": 90.0}) == "A lofi beat. bpm: 90.0"
    assert caption("A lofi beat", {}) == "A lofi beat."
    assert caption("A lofi beat", {"genre": "techno"}, drop=1.0) == "genre: techno"
    assert caption("A lofi beat", {}, drop=1.0) == ""                 # merged with nothing: the null condition
    assert caption("", {"moods": ["dark", "driving"]}) == "moods: dark, driving"
    meta = {"key": "c major", "bpm": 90.0, "moods": ["dark", "driving"]}
    merged = caption("A lofi beat", meta)
    assert merged.startswith("A lofi beat. ")                          # the fields in a shuffled order
    assert sorted(merged.split(". ")[1:]) == ["bpm: 90.0", "key: c major", "moods: dark, driving"]


@pytest.fixture(scope="module")
def long_files(spm_model, tmp_path_factory):
    """Two 2.3 s files in 1 s segments (1 s, 1 s, then a 0.3 s one stored short), one of them held out."""
    tmp = tmp_path_factory.mktemp("long")
    src = write_clips(tmp / "src", seconds=2.3, captions=["a long one", "another long one"])
    prepare(src, tmp / "data", str(diverse_checkpoint(tmp / "ckpt", spm_model)), segment=1.0, valid_fraction=0.5,
            progress=False)
    return CodesData(tmp / "data")


def test_crops_start_anywhere_in_their_file_and_span_its_segments(long_files):
    """As audiocraft seeks each item at a uniform time of its file: a row's segment picks the file, the crop
    starts anywhere a whole crop fits in it (frames 0..65 of 115 for 50-frame crops), reading across the stored
    segments (the short last one too), its codes those segments' codes joined."""
    d = long_files
    (f,) = d.files["train"]
    assert [e["frames"] for e in d.splits["train"]] == [50, 50] and len(d) == 2
    assert [e["frames"] for e in f.segments] == [50, 50, 15] and f.segments[-1]["short"] and f.frames == 115
    joined = np.concatenate([d._codes(e) for e in f.segments], axis=1)                 # (K, 115)
    rows = [r for step in range(1, 401) for r in d.train_rows(step, 2, 50, seed=0, augment=Augment())]
    starts = np.array([r.start for r in rows])
    assert set(starts) == set(range(66))                                                # 800 draws
    assert 0.18 < np.mean(starts > 50) < 0.28                                           # into the short one: 15/66
    assert 0.18 < np.mean((starts > 0) & (starts < 16)) < 0.28                          # no start preferred
    spanning = [r for r in rows if r.start % 50][:8]
    batch = d.collate(spanning, "train", 64)
    for b, r in enumerate(spanning):
        assert torch.equal(batch.codes[b], torch.from_numpy(joined[:, r.start:r.start + 50].astype(np.int64)))
    assert len(set(map(tuple, joined.T))) > 50                                          # codes that tell crops apart
    caption = d.splits["valid"][0]["caption"]                                           # the first crop of a segment
    assert d.valid_rows(30) == [Row(0, 0, 30, caption), Row(1, 50, 30, caption)]
    batch = d.collate(d.valid_rows(30), "valid", 64)
    for i in range(2):
        assert torch.equal(batch.codes[i], torch.from_numpy(d.codes("valid", i)[:, :30].astype(np.int64)))


def test_segments_are_whole_codec_frames(spm_model, tmp_path):
    """A crop joins consecutive segments, so each ends on a frame: --segment 0.33 s is 16 frames (0.32 s), and 2 s
    of audio is 100 frames however it is cut (0.33 s of samples would encode to 17 frames a segment)."""
    src = write_clips(tmp_path / "src", seconds=2.0, captions=["a tune"])
    prepare(src, tmp_path / "data", str(diverse_checkpoint(tmp_path / "ckpt", spm_model)), segment=0.33,
            progress=False)
    d = CodesData(tmp_path / "data")
    assert d.meta["segment"] == 0.32
    (f,) = d.files["train"]
    assert [e["frames"] for e in f.segments] == [16] * 6 + [4] and f.frames == 100


def test_an_index_that_lists_a_files_segments_apart_is_refused(long_files, tmp_path):
    """Crops read a file's segments as consecutive index lines: an index where they are not is refused."""
    lines = [json.loads(line) for line in (long_files.folder / "index.jsonl").read_text().splitlines()]
    a, b = [[dict(e, split="train") for e in lines if e["source"] == s] for s in sorted({e["source"] for e in lines})]
    (tmp_path / "meta.json").write_text((long_files.folder / "meta.json").read_text())
    (tmp_path / "index.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [a[0], b[0], a[1]]))
    with pytest.raises(ValueError, match="lists a file's segments apart: prepare it again with `musicgen prepare`"):
        CodesData(tmp_path)


def test_a_crop_across_segments_reads_the_chroma_of_each(melody_ckpt_dir, tmp_path):
    from musicgen import chroma
    from musicgen.loading import load

    cfg = load(melody_ckpt_dir).cfg.melody
    prepare(write_clips(tmp_path / "src", seconds=2.0, captions=["a tune"]), tmp_path / "data",
            str(melody_ckpt_dir), segment=1.0, demucs=False, progress=False)
    d = CodesData(tmp_path / "data")
    batch = d.collate([Row(0, 30, 40, "a tune")], "train", 64, cfg)   # frames 30..70: 30..50 of one, 0..20 of the next
    per_frame = chroma.CHROMA_SAMPLE_RATE / cfg.hop_length / d.frame_rate                # 0.15625
    classes = np.concatenate([d.chroma("train", 0)[int(30 * per_frame):int(np.ceil(50 * per_frame))],
                              d.chroma("train", 1)[:int(np.ceil(20 * per_frame))]])
    expected = chroma.fit_length(torch.nn.functional.one_hot(torch.from_numpy(classes.astype(np.int64)), 12)
                                 .float()[None], cfg.chroma_length)
    assert len(classes) == 8 and torch.equal(batch.chroma, expected)


def test_caption_augmentation_rates_follow_audiocraft():
    meta = {"genre": "techno", "bpm": 128.0, "moods": ["dark", "driving"]}
    a = Augment(word_dropout=0.0)
    draws = [augment_caption("techno track", meta, np.random.default_rng([0, g]), a) for g in range(4000)]
    merged = [c for c in draws if c not in ("techno track.", "")]
    assert 0.19 < len(merged) / len(draws) < 0.25             # 0.25 merge, less the draws that kept no field
    assert any(c.startswith("techno track. ") and "moods: dark, driving" in c for c in merged)
    assert any(not c.startswith("techno track") and "genre: techno" in c for c in merged)   # description dropped
    bare = [augment_caption("techno track", {}, np.random.default_rng([0, g]), a) for g in range(4000)]
    assert set(bare) == {"techno track.", ""} and 0.1 < bare.count("") / len(bare) < 0.15   # 0.25 x 0.5
    words = [augment_caption("a b c d e f g h i j", {}, np.random.default_rng([1, g]), Augment(word_dropout=0.3))
             for g in range(1000)]
    assert 0.65 < np.mean([len(w.split()) / 10 for w in words if w]) < 0.75


def _one_line_error(capsys, argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("musicgen: error: ") and "\n" not in err, err
    return err


def test_prepare_errors_are_one_line(ckpt_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no audio files" in _one_line_error(capsys, ["prepare", tmp_path / "empty", "-o", tmp_path / "d",
                                                         "--model", ckpt_dir])
    assert "does not exist" in _one_line_error(capsys, ["prepare", tmp_path / "nope", "-o", tmp_path / "d"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.wav").write_bytes(b"garbage")
    err = _one_line_error(capsys, ["prepare", tmp_path / "bad", "-o", tmp_path / "d2", "--model", ckpt_dir, "-q"])
    assert "no usable audio" in err and "see " in err
    report = (tmp_path / "d2" / "report.txt").read_text()   # the report the error points to lists the file
    assert "skipped 1 files" in report and "x.wav: cannot read" in report
    assert "--valid-fraction" in _one_line_error(capsys, ["prepare", tmp_path / "bad", "-o", tmp_path / "d3",
                                                           "--valid-fraction", "1.5"])


@pytest.fixture(scope="module")
def other_codec_ckpt(tmp_path_factory, spm_model):
    from conftest import build_hf_model, save_checkpoint

    return save_checkpoint(build_hf_model(seed=1), tmp_path_factory.mktemp("other"), spm_model)


def test_train_errors_are_one_line_and_lose_nothing(data, ckpt_dir, other_codec_ckpt, tmp_path, capsys):
    out = data[0]
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    err = _one_line_error(capsys, ["train", out, "--model", ckpt_dir, "-o", run, "--steps", "1"])
    assert "exists; pass --resume" in err and (run / "precious.txt").read_text() == "keep me"
    err = _one_line_error(capsys, ["train", out, "--model", other_codec_ckpt, "-o", tmp_path / "r2", "--steps", "1"])
    assert "does not match the codec" in err and not (tmp_path / "r2").exists()
    assert "not prepared data" in _one_line_error(capsys, ["train", tmp_path, "--model", ckpt_dir, "-o", tmp_path / "r3"])
    assert "does not split" in _one_line_error(capsys, ["train", out, "--model", ckpt_dir, "-o", tmp_path / "r4",
                                                        "--batch-size", "3", "--accumulate", "2"])
    assert "nothing to resume" in _one_line_error(capsys, ["train", out, "-o", tmp_path / "r5", "--resume"])
    assert main(["train", str(out), "--model", str(ckpt_dir), "-o", str(tmp_path / "r6"), "--steps", "1",
                 "--batch-size", "2", "-q"]) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, ["train", out, "-o", tmp_path / "r6", "--resume", "--lr", "0.5"])
    assert "was started with --lr at its default" in err


@pytest.mark.parametrize("option,value,message", [
    ("--valid-every", "0", "--valid-every must be at least 1"),
    ("--sample-every", "-1", "--sample-every must be 0 (off) or more"),
    ("--sample-duration", "0", "--sample-duration must be positive"),
    ("--lr", "-1e-4", "--lr must be positive"),
    ("--warmup", "-5", "--warmup must be 0 or more"),
    ("--weight-decay", "nan", "--weight-decay must be 0 or more"),
    ("--lora-alpha", "0", "--lora-alpha must be positive"),
    ("--ema", "0.99", "--ema averages every 10 steps: it needs --steps 10 or more"),
])
def test_train_options_are_checked_before_anything_starts(data, ckpt_dir, tmp_path, capsys, option, value, message):
    run = tmp_path / "run"
    err = _one_line_error(capsys, ["train", data[0], "--model", ckpt_dir, "-o", run, "--steps", "2",
                                   "--batch-size", "2", f"{option}={value}"])
    assert message in err and not run.exists()


def test_resume_can_drop_fsdp_and_grad_checkpoint_and_quiet(tmp_path):
    """Options that do not change the weights a run ends with may change on --resume, switches included: a run
    started with --fsdp (torchrun) can go on in one process with --no-fsdp, and -q holds for one session."""
    import json
    from dataclasses import asdict

    from musicgen.cli import build_parser
    from musicgen.train.cli import train_config
    from musicgen.train.options import TrainConfig

    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    run.mkdir()
    saved = TrainConfig(data=str(data.resolve()), model="m", run=str(run), fsdp=True, grad_checkpoint=True,
                        progress=False)
    (run / "config.json").write_text(json.dumps(asdict(saved)))

    def config(*flags):
        return train_config(build_parser().parse_args(["train", str(data), "-o", str(run), "--resume", *flags]))
    kept = config()
    assert kept.fsdp and kept.grad_checkpoint and kept.progress
    dropped = config("--no-fsdp", "--no-grad-checkpoint", "-q")
    assert not dropped.fsdp and not dropped.grad_checkpoint and not dropped.progress
    assert config("--fsdp").fsdp and not TrainConfig(data="d", model="m", run="r").fsdp
    # a RUN copied or moved elsewhere goes on where it is now, not in the folder it was started in
    moved = tmp_path / "moved"
    run.rename(moved)
    resumed = train_config(build_parser().parse_args(["train", str(data), "-o", str(moved), "--resume"]))
    assert resumed.run == str(moved)


def test_one_training_per_run(data, ckpt_dir, tmp_path, capsys):
    """A training holds RUN while it writes there: a second one on the same RUN is refused in one line."""
    from musicgen.train import state

    run = tmp_path / "run"
    held = state.lock_run(run)
    args = ["train", data[0], "--model", ckpt_dir, "-o", run, "--steps", "1", "--batch-size", "2", "-q"]
    try:
        assert "is in use by another training" in _one_line_error(capsys, args)
        assert [p.name for p in run.iterdir()] == [".lock"]
    finally:
        held.close()
    assert main([str(a) for a in args]) == 0 and (run / "final").is_dir()

