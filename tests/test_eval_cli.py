"""`musicgen eval` end to end: outputs, one-line errors with exit status 2, saved statistics, and --generate
(resumable) with a tiny random MusicGen checkpoint. Embedders are the tiny random ones of eval_support."""
from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET

import pytest
import soundfile as sf

import eval_support as es
import musicgen.eval
from musicgen.cli import main


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    """Downloads, hashes and embeddings go to a temporary folder, not ~/.cache."""
    monkeypatch.setenv("MUSICGEN_CACHE", str(tmp_path / "musicgen-cache"))


@pytest.fixture
def tiny_embedders(monkeypatch, tmp_path_factory):
    made = {"vggish": es.vggish_embedder, "passt": es.passt_embedder,
            "clap": lambda: es.clap_embedder(tmp_path_factory.mktemp("bpe"))}
    loaded = []

    def fake(name, weights_dir=None, device="cpu", progress=True):
        loaded.append(name)
        return made[name]()
    monkeypatch.setattr(musicgen.eval, "load_embedder", fake)
    return loaded


@pytest.fixture
def sets(tmp_path):
    es.make_set(tmp_path / "gen", 3, 2.0, seed=1)
    es.make_set(tmp_path / "ref", 3, 2.0, seed=2)
    (tmp_path / "caps.csv").write_text("ytid,caption\n" + "".join(f"clip{i},lofi hip hop beat {i}\n" for i in range(3)))
    return tmp_path


def test_eval_writes_table_json_csv_and_plot(sets, tiny_embedders, capsys):
    out = sets / "report.json"
    rc = main(["eval", str(sets / "gen"), "--reference", str(sets / "ref"), "--captions", str(sets / "caps.csv"),
               "--metrics", "fad,kl,clap,chroma", "--json", str(out), "--no-cache", "-q", "--per-clip-fad"])
    assert rc == 0
    text = capsys.readouterr().out
    for label in ("FAD (VGGish)", "KL (PaSST)", "CLAP score", "chroma cosine"):
        assert label in text
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {"fad", "kl", "clap", "chroma"} and report["skipped"] == []
    assert report["settings"]["versions"]["torch"] and report["settings"]["embedders"]["vggish"] == "random-vggish"
    rows = list(csv.DictReader(out.with_suffix(".csv").read_text().splitlines()))
    assert [r["key"] for r in rows] == ["clip0", "clip1", "clip2"] and set(rows[0]) == {"key", "fad", "kl", "clap",
                                                                                        "chroma"}
    svg = ET.fromstring(out.with_suffix(".svg").read_text())
    assert svg.tag.endswith("svg") and len(svg.findall("{http://www.w3.org/2000/svg}rect")) > 4
    assert sorted(set(tiny_embedders)) == ["clap", "passt", "vggish"]
    # an existing report is not overwritten without --force
    rc = main(["eval", str(sets / "gen"), "--reference", str(sets / "ref"), "--metrics", "chroma", "--json", str(out)])
    assert rc == 2 and "exists; pass --force" in capsys.readouterr().err


def test_save_and_reuse_reference_stats(sets, tiny_embedders, capsys, monkeypatch):
    stats = sets / "ref.npz"
    assert main(["eval", str(sets / "gen"), "--reference", str(sets / "ref"), "--metrics", "fad", "--save-stats",
                 str(stats), "--no-cache", "-q"]) == 0
    first = capsys.readouterr().out
    assert main(["eval", str(sets / "gen"), "--reference-stats", str(stats), "--metrics", "fad", "--no-cache",
                 "-q"]) == 0
    second = capsys.readouterr().out
    assert first.splitlines()[2] == second.splitlines()[2]   # the FAD row
    other = es.vggish_embedder()
    other.fingerprint = "other-weights"
    monkeypatch.setattr(musicgen.eval, "load_embedder", lambda *a, **k: other)
    rc = main(["eval", str(sets / "gen"), "--reference-stats", str(stats), "--metrics", "fad", "--no-cache", "-q"])
    assert rc == 2 and "was computed with other vggish weights" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["eval"], "give the GENERATED folder"),
    (["eval", "{gen}"], "give --reference"),
    (["eval", "{gen}", "--reference", "{tmp}/missing"], "missing does not exist"),
    (["eval", "{gen}", "--reference", "{ref}", "--metrics", "fad,fid"], "unknown metric 'fid'"),
    (["eval", "{gen}", "--reference", "{empty}"], "holds no audio files"),
    (["eval", "--generate", "--captions", "{caps}", "--reference", "{ref}"], "--generate needs"),
    (["eval", "{gen}", "--reference", "{ref}", "--metrics", "fad", "--weights", "{empty}", "--no-cache"],
     "vggish-10086976.pth is not in"),
    (["eval", "{gen}", "--reference", "{ref}", "--metrics", "clap", "--weights", "{empty}"],
     "music_audioset_epoch_15_esc_90.14.pt is not in"),
    (["eval", "{gen}", "--reference", "{ref}", "--captions", "{gen}/clip0.wav"], "cannot read captions file"),
    (["eval", "{gen}", "--reference", "{ref}", "--device", "tpu9"], "unknown device 'tpu9'"),
    (["eval", "{gen}", "--reference", "{ref}", "--metrics", "fad", "--weights", "{bad}", "--no-cache"],
     "vggish-10086976.pth: not a PyTorch checkpoint"),
])
def test_bad_input_is_one_line_and_exit_2(sets, capsys, args, message):
    (sets / "empty").mkdir()
    (sets / "bad").mkdir()
    (sets / "bad" / "vggish-10086976.pth").write_text("not a checkpoint")
    names = {"gen": sets / "gen", "ref": sets / "ref", "tmp": sets, "empty": sets / "empty", "caps": sets / "caps.csv",
             "bad": sets / "bad"}
    rc = main([a.format(**names) for a in args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and err.startswith("musicgen: error: ")


class RunsCode:
    """Unpickling this runs a shell command: what a hostile weights file can hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_weights_that_pickle_code_are_refused_and_numpy_numbers_load(sets, capsys):
    """Weight files are read with weights_only=True: one that pickles a callable is refused before anything
    runs; training state kept as NumPy numbers (as laion_clap's file keeps it) loads."""
    import numpy as np
    import torch

    from musicgen.eval.weights import read_state

    marker = sets / "ran"
    hostile = sets / "hostile"
    (hostile / "roberta-base").mkdir(parents=True)
    for name in ("config.json", "vocab.json", "merges.txt"):
        (hostile / "roberta-base" / name).write_text("{}")
    torch.save({"state_dict": {}, "epoch": RunsCode(marker)}, hostile / "music_audioset_epoch_15_esc_90.14.pt")
    rc = main(["eval", str(sets / "gen"), "--reference", str(sets / "ref"), "--metrics", "clap", "--weights",
               str(hostile), "--no-cache", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to load" in err and "posix.system" in err and err.count("\n") == 1
    assert not marker.exists()

    state = {"epoch": np.int64(15), "state_dict": {"w": torch.ones(2)},
             "optimizer": {"state": {0: {"step": np.float64(3)}}, "param_groups": [{"lr": np.float32(1e-4)}]},
             "metrics": np.array([0.5, 0.9])}
    torch.save(state, sets / "trained.pt")
    loaded = read_state(sets / "trained.pt")
    assert loaded["epoch"] == 15 and torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    assert loaded["optimizer"]["param_groups"][0]["lr"] == np.float32(1e-4)
    assert np.array_equal(loaded["metrics"], [0.5, 0.9])


def test_generate_then_evaluate_and_resume(tmp_path, ckpt_dir, capsys, monkeypatch):
    """One clip per caption, as long as its reference clip; --limit for a quick run; a second run keeps the clips
    already there and generates the rest."""
    monkeypatch.setenv("MUSICGEN_NO_KERNELS", "1")   # PyTorch's kernels: no minute-long build for a tiny model
    for i, seconds in enumerate((1.0, 0.6, 1.0)):
        es.write(tmp_path / "ref", f"yt{i}.wav", es.tone(seconds, 32000, 300 + 100 * i, seed=i))
    (tmp_path / "caps.csv").write_text("ytid,caption\nyt0,lofi beat\nyt1,calm guitar\nmissing,no reference\n"
                                       "yt2,epic orchestra\n")
    out = tmp_path / "out"
    base = ["eval", "--generate", "--model", str(ckpt_dir), "--captions", str(tmp_path / "caps.csv"),
            "--reference", str(tmp_path / "ref"), "-o", str(out), "--metrics", "chroma", "-q", "--device", "cpu"]
    assert main(base + ["--limit", "2", "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "1 caption(s) have no reference clip" in err
    assert sorted(p.name for p in out.glob("*.wav")) == ["yt0.wav", "yt1.wav"]
    for name, seconds in (("yt0.wav", 1.0), ("yt1.wav", 0.6)):
        assert sf.info(str(out / name)).duration == pytest.approx(seconds, abs=0.021)
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["chroma"]["clips"] == 2
    assert report["settings"]["generation"]["top_k"] == 250 and report["settings"]["generation"]["guidance_scale"] == 3
    before = (out / "yt0.wav").stat().st_mtime_ns
    assert main(base + ["-f"]) == 0
    assert "2 clip(s) already in" in capsys.readouterr().err
    assert (out / "yt0.wav").stat().st_mtime_ns == before and (out / "yt2.wav").is_file()
    assert json.loads((out / "report.json").read_text())["metrics"]["chroma"]["clips"] == 3
    manifest = [json.loads(line) for line in (out / "generated.jsonl").read_text().splitlines()]
    assert {m["path"]: m["caption"] for m in manifest}["yt2.wav"] == "epic orchestra"


def test_a_resumed_generation_makes_the_clips_of_an_uninterrupted_one(tmp_path, ckpt_dir, monkeypatch):
    """Batches are formed over every caption: a run that finds some clips already written (a killed run) writes
    the others exactly as an uninterrupted run would, although their batch is not the one it would form alone."""
    import musicgen
    from musicgen.eval import clips, generate

    monkeypatch.setenv("MUSICGEN_NO_KERNELS", "1")
    for i in range(3):
        es.write(tmp_path / "ref", f"yt{i}.wav", es.tone(0.5, 32000, 300 + 100 * i, seed=i))
    captions = {"yt0": "lofi beat", "yt1": "calm guitar", "yt2": "epic orchestra"}
    reference = clips.list_clips(tmp_path / "ref")
    model = musicgen.load(ckpt_dir, device="cpu")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    items, done, _ = generate.plan(captions, reference, whole, None)
    assert len(items) == 3 and not done
    generate.run(model, items, whole, batch_size=2, seed=0, progress=False)
    resumed.mkdir()
    (resumed / "yt0.wav").write_bytes((whole / "yt0.wav").read_bytes())   # what a run killed after one clip left
    items, done, _ = generate.plan(captions, reference, resumed, None)
    assert [key for key, _ in done] == ["yt0"]
    generate.run(model, items, resumed, batch_size=2, seed=0, progress=False)
    for name in ("yt1.wav", "yt2.wav"):
        a, b = sf.read(str(whole / name))[0], sf.read(str(resumed / name))[0]
        assert a.shape == b.shape and (a == b).all(), name


def test_generate_with_a_melody_model_adds_chroma(tmp_path, melody_ckpt_dir, tiny_embedders, capsys, monkeypatch):
    """A melody checkpoint is conditioned on each reference clip and scored with chroma as well."""
    monkeypatch.setenv("MUSICGEN_NO_KERNELS", "1")
    for i in range(2):
        es.write(tmp_path / "ref", f"m{i}.wav", es.tone(2.0, 32000, 262 * (i + 1), seed=i))
    (tmp_path / "caps.csv").write_text("ytid,caption\nm0,lofi beat\nm1,calm guitar\n")
    out = tmp_path / "out"
    rc = main(["eval", "--generate", "--model", str(melody_ckpt_dir), "--captions", str(tmp_path / "caps.csv"),
               "--reference", str(tmp_path / "ref"), "-o", str(out), "-q", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"fad", "kl", "clap", "chroma"} and report["metrics"]["chroma"]["clips"] == 2
