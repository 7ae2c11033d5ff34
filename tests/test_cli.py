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


@pytest.mark.parametrize("seconds", [1.0, 2.76])   # 2.76 s: the loudness meter's last block ends past the audio
def test_generate_writes_loudness_normalised_wav(ckpt_dir, tmp_path, seconds):
    out = tmp_path / "pop.wav"
    r = run("generate", "80s pop track with bassy drums and synth", "--model", ckpt_dir, "--duration", str(seconds),
            "--seed", "0", "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert "step/s" in r.stderr or "step" in r.stderr          # the progress bar
    audio, sr = sf.read(out)
    assert sr == 32000 and audio.shape == (int(seconds * 50) * 640,)   # frames rounded down, as audiocraft
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


def test_prompts_beyond_max_batch_go_in_turns_each_seeded(ckpt_dir, tmp_path, capsys):
    import musicgen

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("lofi beat\nepic orchestra\nsolo piano\n")
    out = tmp_path / "clip.wav"
    code = main(["generate", "--prompts-file", str(prompts), "--model", str(ckpt_dir), "-d", "0.3", "-o", str(out),
                 "--strategy", "none", "--seed", "7", "--max-batch", "2"])
    assert code == 0
    captured = capsys.readouterr()
    assert "clips 1-2 of 3" in captured.err and "clips 3-3 of 3" in captured.err
    assert captured.out.split() == [str(tmp_path / f"clip_{i}.wav") for i in range(3)]
    model = musicgen.load(ckpt_dir)
    expected = [*model.generate(["lofi beat", "epic orchestra"], duration=0.3, seed=7),
                *model.generate(["solo piano"], duration=0.3, seed=8)]       # turn i: --seed + i
    for i, wav in enumerate(expected):
        written, sr = sf.read(tmp_path / f"clip_{i}.wav", dtype="float32")
        assert sr == model.sample_rate and written.shape == wav[0].shape
        assert abs(written - wav[0].clamp(-1, 1).numpy()).max() < 1e-4, i


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
    (["generate", "x", "--max-batch", "0"], "--max-batch must be >= 1"),
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
    (["generate", "x", "-o", "-"], "needs --stream"),
    (["generate", "x", "--stream", "-o", "-", "--format", "flac"], "--stream writes WAV only"),
    (["generate", "x", "--seed", "99999999999999999999999"], "--seed must be in"),
    (["generate", "x", "--seed", "-1"], "--seed must be in"),
    (["generate", "x", "-o", "."], "output . is a folder"),
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


# -- modes from the command line --------------------------------------------------------------------------
def test_cli_continuation_unconditional_and_melody(ckpt_dir, melody_ckpt_dir, tmp_path):
    import numpy as np

    intro = tmp_path / "intro.wav"
    sf.write(intro, 0.3 * np.random.default_rng(0).standard_normal((8000, 2)).astype("float32"), 16000)  # stereo 16 kHz
    r = run("generate", "--continue", intro, "--model", ckpt_dir, "-d", "1", "-o", tmp_path / "c.wav", "-q")
    assert r.returncode == 0, r.stderr
    assert sf.info(tmp_path / "c.wav").frames == 32000
    r = run("generate", "--unconditional", "--batch-size", "2", "--model", ckpt_dir, "-d", "0.2",
            "-o", tmp_path / "u.wav", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "u_0.wav").is_file() and (tmp_path / "u_1.wav").is_file()
    r = run("generate", "lofi", "--melody", intro, "--model", melody_ckpt_dir, "-d", "0.2", "-o", tmp_path / "m.wav",
            "-q")
    assert r.returncode == 0, r.stderr
    assert "demucs" in r.stderr                                 # says once that drums and bass stay in
    r = run("generate", "lofi", "--melody", intro, "--no-demucs", "--model", melody_ckpt_dir, "-d", "0.2",
            "-o", tmp_path / "m2.wav", "-q")
    assert r.returncode == 0 and "demucs" not in r.stderr, r.stderr


@pytest.mark.parametrize("make_args, message", [
    (lambda d, m, t: ["generate", "x", "--melody", t / "missing.wav", "--model", m], "does not exist"),
    (lambda d, m, t: ["generate", "x", "--melody", t / "junk.wav", "--model", m], "cannot read audio file"),
    (lambda d, m, t: ["generate", "x", "--melody", t / "ok.wav", "--model", d], "no melody conditioning"),
    (lambda d, m, t: ["generate", "x", "--unconditional", "--model", d], "takes no prompts"),
    (lambda d, m, t: ["generate", "x", "--batch-size", "3", "--model", d], "does not match"),
    (lambda d, m, t: ["convert", t / "nowhere", t / "out"], "unknown model"),
    (lambda d, m, t: ["convert", t, t / "out"], "config.json"),
])
def test_cli_mode_errors(ckpt_dir, melody_ckpt_dir, tmp_path, make_args, message):
    import numpy as np

    (tmp_path / "junk.wav").write_bytes(b"RIFF....not audio")
    sf.write(tmp_path / "ok.wav", np.zeros(3200, dtype="float32"), 32000)
    r = run(*make_args(ckpt_dir, melody_ckpt_dir, tmp_path), "-o" if make_args(ckpt_dir, melody_ckpt_dir, tmp_path)[0]
            == "generate" else "--force", *( [tmp_path / "o.wav"] if make_args(ckpt_dir, melody_ckpt_dir, tmp_path)[0]
                                            == "generate" else []))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in lines[0]


@pytest.mark.parametrize("args, message", [
    (["-d", "40", "--extend-stride", "35"], "--extend-stride must be in (0, 30)"),
    (["-d", "40", "--stream"], "--stream covers one 30 s window"),
])
def test_window_options_are_checked_against_the_checkpoint_s_window(ckpt_dir, tmp_path, args, message):
    r = run("generate", "x", "--model", ckpt_dir, "-o", tmp_path / "o.wav", *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "o.wav").exists()


def test_help_and_input_errors_answer_without_importing_torch(tmp_path):
    """`import musicgen` imports its modules on first use, so the parser answers before torch loads (~1 s)."""
    code = ("import sys\n"
            "from musicgen.cli import main\n"
            "try:\n"
            "    main(['--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            f"assert main(['generate', '', '-o', {str(tmp_path / 'x.wav')!r}]) == 2\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "import musicgen\n"
            "assert callable(musicgen.load) and 'torch' in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "prompt 1 is empty" in out.stderr


def test_stream_works_without_the_service_extra(ckpt_dir, tmp_path, monkeypatch):
    """`musicgen generate --stream` needs only the base install: with FastAPI (the `serve` extra) missing it
    still writes its WAV."""
    import soundfile as sf

    for name in [n for n in sys.modules if n == "fastapi" or n.startswith(("fastapi.", "musicgen.serve"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)          # `import fastapi` now raises ImportError
    out = tmp_path / "s.wav"
    assert main(["generate", "lofi", "-d", "0.5", "--stream", "--model", str(ckpt_dir), "-o", str(out), "-q",
                 "--seed", "1"]) == 0
    audio, sr = sf.read(out)
    assert sr == 32000 and len(audio) == 16000
    assert not any(n.startswith("musicgen.serve") for n in sys.modules)


def test_a_refused_stream_leaves_the_output_alone(ckpt_dir, tmp_path, capsys):
    """--stream opens its outputs only once the model has accepted the request: a refusal (here a continuation
    longer than --duration) keeps an existing file, even with --force, and creates none."""
    import numpy as np

    keep = tmp_path / "keep.wav"
    keep.write_bytes(b"keep me")
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(2 * 32000, np.float32), 32000)
    base = ["generate", "lofi", "--model", str(ckpt_dir), "-d", "1", "-q", "--continue", str(long), "--stream"]
    assert main(base + ["-o", str(keep), "-f"]) == 2
    assert "longer than" in capsys.readouterr().err and keep.read_bytes() == b"keep me"
    assert main(base + ["-o", str(tmp_path / "new.wav")]) == 2 and not (tmp_path / "new.wav").exists()


def test_an_interrupted_stream_leaves_a_valid_wav(ckpt_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of --stream: exit 130, and the file is a WAV of what was streamed (its header
    sizes fixed), not one whose header claims more than it holds."""
    import musicgen.model

    real = musicgen.model.MusicGen.stream

    def interrupted(self, *a, **kw):
        chunks = real(self, *a, **kw)
        yield next(chunks)
        raise KeyboardInterrupt
    monkeypatch.setattr(musicgen.model.MusicGen, "stream", interrupted)
    out = tmp_path / "s.wav"
    assert main(["generate", "lofi", "-d", "3", "--stream", "--model", str(ckpt_dir), "-o", str(out), "-q"]) == 130
    audio, sr = sf.read(out)
    assert sr == 32000 and 0 < len(audio) < 3 * 32000
    data = out.read_bytes()
    assert len(data) == 44 + 2 * len(audio)
    assert int.from_bytes(data[4:8], "little") == len(data) - 8 and int.from_bytes(data[40:44], "little") == len(data) - 44

