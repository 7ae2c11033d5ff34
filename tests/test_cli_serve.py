"""`musicgen generate --stream` and `musicgen serve`, as a user runs them."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
    [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def musicgen(*args, **kw):
    return subprocess.run([sys.executable, "-m", "musicgen", *map(str, args)], capture_output=True, env=ENV,
                          timeout=300, **kw)


def test_generate_stream_writes_a_complete_wav(ckpt_dir, tmp_path, model):
    out = tmp_path / "s.wav"
    r = musicgen("generate", "lofi beat", "--model", ckpt_dir, "-d", "1.5", "--top-k", "1", "--stream", "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == str(out) and b"streamed 1.5 s" in r.stderr
    audio, sr = sf.read(out)                                  # the header was fixed up with the final length
    assert sr == 32000 and audio.shape == (48000,)
    ref = model.generate(["lofi beat"], duration=1.5, top_k=1)[0, 0].clamp(-1, 1).numpy()
    assert np.abs(audio - ref).max() < 1e-4


def test_generate_stream_to_stdout(ckpt_dir):
    r = musicgen("generate", "jazz", "--model", ckpt_dir, "-d", "0.5", "--stream", "-q", "-o", "-")
    assert r.returncode == 0, r.stderr
    assert r.stdout[:4] == b"RIFF" and len(r.stdout) == 44 + 2 * 16000


def test_generate_stream_refuses_other_formats(ckpt_dir, tmp_path):
    r = musicgen("generate", "jazz", "--model", ckpt_dir, "--stream", "-o", tmp_path / "x.flac")
    assert r.returncode == 2 and b"WAV only" in r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_starts_the_service(ckpt_dir, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "musicgen", "serve", "--model", str(ckpt_dir), "--port",
                             str(port), "--data-dir", str(tmp_path / "data")],
                            env=dict(ENV, MUSICGEN_API_KEY="k"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        assert "Generate" in httpx.get(url + "/").text
        assert httpx.get(url + "/v1/model").status_code == 401
        info = httpx.get(url + "/v1/model", headers={"Authorization": "Bearer k"}).json()
        assert info["model"] == str(ckpt_dir) and info["auth"] is True
        assert (tmp_path / "data" / "jobs.sqlite3").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("args, message", [
    (["--port", "0"], "--port"),
    (["--max-batch", "0"], "at least 1"),
    (["--model", "/tmp/definitely-not-here"], "unknown model"),
])
def test_serve_errors_are_one_line(args, message):
    r = musicgen("serve", *args)
    assert r.returncode == 2
    assert message in r.stderr.decode() and len(r.stderr.decode().strip().splitlines()) == 1


def test_serve_checks_its_address_and_database_before_the_model(tmp_path):
    """A corrupt job database and a port in use are one line each (exit 2), found before the model loads: the
    model named here does not exist, and that is not what is reported."""
    import socket

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "jobs.sqlite3").write_text("not a database " * 20)
    r = musicgen("serve", "--model", "/tmp/definitely-not-here", "--data-dir", str(bad), "--port", str(free_port()))
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "is not a musicgen job database" in err, err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        r = musicgen("serve", "--model", "/tmp/definitely-not-here", "--data-dir", str(tmp_path / "d"),
                     "--port", str(busy.getsockname()[1]))
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "cannot listen on 127.0.0.1:" in err, err

