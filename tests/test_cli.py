"""`musicgen generate`: real files from a real checkpoint folder, and every error path as one line."""
from __future__ import annotations

import os
import subprocess
import sys

import pyloudnorm
import pytest
import soundfile as sf

from musicgen.cli import main


def run(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "musicgen", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_generate_writes_loudness_normalised_wav(ckpt_dir, tmp_path):
    out = tmp_path / "pop.wav"
    r = run("generate", "80s pop track with bassy drums and synth", "--model", ckpt_dir, "--duration", "1",
            "--seed", "0", "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert "step/s" in r.stderr or "step" in r.stderr          # the progress bar
    audio, sr = sf.read(out)
    assert sr == 32000 and audio.shape == (32000,)
    assert abs(pyloudnorm.Meter(sr).integrated_loudness(audio) + 14.0) < 0.5
    assert abs(audio).max() <= 1.0


def test_several_prompts_give_numbered_files(ckpt_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("lofi beat\n\nepic orchestra\n")
    out = tmp_path / "song.flac"
    code = main(["generate", "techno", "--prompts-file", str(prompts), "--model", str(ckpt_dir), "-d", "0.2",
                 "-o", str(out), "-q", "--strategy", "peak"])
    assert code == 0
    files = sorted(p.name for p in tmp_path.glob("song_*.flac"))
    assert files == ["song_0.flac", "song_1.flac", "song_2.flac"]


def test_refuses_to_overwrite_without_force(ckpt_dir, tmp_path, capsys):
    out = tmp_path / "x.wav"
    out.write_bytes(b"keep me")
    assert main(["generate", "lofi", "--model", str(ckpt_dir), "-d", "0.1", "-o", str(out), "-q"]) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["generate", "lofi", "--model", str(ckpt_dir), "-d", "0.1", "-o", str(out), "-q", "-f"]) == 0
    assert out.read_bytes() != b"keep me"


@pytest.mark.parametrize("args, message", [
    (["generate", ""], "prompt 1 is empty"),
    (["generate"], "at least one prompt"),
    (["generate", "x", "--duration", "0"], "--duration must be positive"),
    (["generate", "x", "--duration", "-3"], "--duration must be positive"),
    (["generate", "x", "--duration", "inf"], "not a finite number"),
    (["generate", "x", "--duration", "abc"], "not a number"),
    (["generate", "x", "--top-k", "-5"], "--top-k"),
    (["generate", "x", "--top-p", "2"], "--top-p"),
    (["generate", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "x", "--guidance-scale", "-1"], "--guidance-scale"),
    (["generate", "x", "--dtype", "int4"], "invalid choice"),
    (["generate", "x", "-o", "out.xyz"], "unknown output format"),
    (["generate", "x", "-o", "/nonexistent-dir/out.wav"], "does not exist"),
    (["generate", "x", "--prompts-file", "/nonexistent.txt"], "cannot read prompts file"),
    (["generate", "x", "--device", "cuda:7"], "CUDA"),
    (["generate", "x", "--device", "toaster"], "unknown device"),
    (["generate", "x", "--model", "no/such/thing"], "unknown model"),
    (["generate", "x", "--model", "/tmp/definitely-not-here"], "unknown model"),
    (["frobnicate"], "invalid choice"),
])
def test_errors_are_one_line_without_traceback(args, message, tmp_path):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert message in lines[0]


def test_unwritable_output_folder(ckpt_dir, tmp_path, capsys):
    if os.geteuid() == 0:
        # root writes anywhere; a read-only location is a path under a regular file instead
        target = tmp_path / "file.txt"
        target.write_text("x")
        assert main(["generate", "x", "--model", str(ckpt_dir), "-o", str(target / "out.wav")]) == 2
        assert "does not exist" in capsys.readouterr().err
        return
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert main(["generate", "x", "--model", str(ckpt_dir), "-o", str(ro / "out.wav")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_hub_unreachable_and_not_cached(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "musicgen", "generate", "x", "--model", "facebook/musicgen-small",
                        "-o", str(tmp_path / "a.wav")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "not in the cache" in r.stderr
