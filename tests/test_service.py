"""The HTTP service over real loopback HTTP: round trips, batching, streaming, cancel on disconnect,
restart persistence, and the 401 / 404 / 409 / 422 / 429 paths."""
from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

import musicgen
from conftest import running_server

FAST = dict(top_k=1)                       # greedy: results comparable to model.generate_codes


def wait(client, job_id, states=("done", "failed", "cancelled"), timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = client.get(f"/v1/jobs/{job_id}").json()
        if j["status"] in states:
            return j
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {j['status']}")


def stored_codes(service, job_id):
    return torch.from_numpy(np.load(service.store.path(job_id, "codes", "npy")))


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    with running_server(model, tmp_path_factory.mktemp("data"), max_batch=4, max_queue=8) as (url, service):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, service


def test_generate_poll_download(server, model):
    client, service = server
    r = client.post("/v1/generate", json=dict(prompt="lofi beat", duration=0.4, seed=5, format="flac", **FAST))
    assert r.status_code == 202
    job = r.json()["id"]
    j = wait(client, job)
    assert j["status"] == "done" and j["progress"] == 1.0 and j["request"]["seed"] == 5
    audio = client.get(j["audio_url"])
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/flac"
    data, sr = sf.read(io.BytesIO(audio.content))
    assert sr == 32000 and data.shape == (20 * 640,)
    assert torch.equal(stored_codes(service, job), model.generate_codes(["lofi beat"], duration=0.4, **FAST)[0])
    assert job in [x["id"] for x in client.get("/v1/jobs").json()]
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/v1/model").json()
    assert info["sample_rate"] == 32000 and info["max_batch"] == 4
    spec = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/jobs/{id}", "/v1/jobs/{id}/audio", "/v1/jobs/{id}/stream"} <= set(spec["paths"])
    assert "Generate" in client.get("/").text


def test_concurrent_requests_share_decoding_steps(server, model):
    client, service = server
    before = client.get("/health").json()
    prompts = ["techno with acid bass", "jazz trio", "epic orchestral soundtrack with strings", "reggae"]
    service.scheduler.pause()              # the four arrive together: none may start before the others
    try:
        ids = [client.post("/v1/generate", json=dict(prompt=p, duration=1.0, **FAST)).json()["id"] for p in prompts]
    finally:
        service.scheduler.resume()
    for i in ids:
        assert wait(client, i)["status"] == "done"
    after = client.get("/health").json()
    steps, request_steps = after["steps"] - before["steps"], after["request_steps"] - before["request_steps"]
    assert request_steps == 4 * (50 + 3)
    assert steps < 0.6 * request_steps                      # the four requests shared most of their steps
    for p, i in zip(prompts, ids):                            # and each still got exactly its solo codes
        assert torch.equal(stored_codes(service, i), model.generate_codes([p], duration=1.0, **FAST)[0])


def test_stream_sends_a_wav_while_generating(server, model):
    client, service = server
    job = client.post("/v1/generate", json=dict(prompt="ambient pads", duration=0.6, seed=1, **FAST)).json()["id"]
    with client.stream("GET", f"/v1/jobs/{job}/stream") as r:
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        body = b"".join(r.iter_bytes())
    assert body[:4] == b"RIFF" and body[8:12] == b"WAVE"
    pcm = np.frombuffer(body[44:], dtype="<i2")
    assert pcm.size == 30 * 640
    ref = model.decode(model.generate_codes(["ambient pads"], duration=0.6, **FAST))[0, 0]
    expected = (ref.clamp(-1, 1) * 32767).round().numpy()
    assert np.abs(pcm - expected).max() <= 1                  # the one-shot decode, to int16 rounding
    # a finished job streams from its stored codes
    again = client.get(f"/v1/jobs/{job}/stream").content
    assert len(again) == len(body) and np.abs(np.frombuffer(again[44:], dtype="<i2") - pcm).max() <= 1


def test_client_leaving_a_stream_cancels_the_job(server):
    client, service = server
    job = client.post("/v1/generate", json=dict(prompt="rock", duration=9.0, **FAST)).json()["id"]
    with client.stream("GET", f"/v1/jobs/{job}/stream") as r:
        received = b""
        for piece in r.iter_bytes():
            received += piece
            if len(received) > 44 + 640 * 2:
                break
        assert received.startswith(b"RIFF")
        # audio arrived while the job was still being generated
        assert client.get(f"/v1/jobs/{job}").json()["progress"] < 1.0
    j = wait(client, job, timeout=30)
    assert j["status"] == "cancelled" and j["progress"] < 1.0


def test_a_stream_may_leave_the_job_running(server):
    """?cancel_on_leave=false (what the web page asks for): the listener leaving does not stop the job."""
    client, _ = server
    job = client.post("/v1/generate", json=dict(prompt="rock", duration=9.0, **FAST)).json()["id"]
    with client.stream("GET", f"/v1/jobs/{job}/stream?cancel_on_leave=false") as r:
        for piece in r.iter_bytes():
            if piece:
                break
    assert wait(client, job, timeout=60)["status"] == "done"


def test_access_log_lines_hide_the_api_key():
    import logging

    from musicgen.serve.auth import RedactTokens

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/v1/jobs/ab/stream?cancel_on_leave=false&access_token=s3cret",
                                "1.1", 200), None)
    assert RedactTokens().filter(record)
    line = record.getMessage()
    assert "s3cret" not in line and "access_token=***" in line and "cancel_on_leave=false" in line
    record.args = ("127.0.0.1:5", "GET", "/v1/jobs/ab/stream?expires=9&sig=abc123", "1.1", 200)
    assert RedactTokens().filter(record) and "abc123" not in record.getMessage()


def test_delete_cancels(server):
    client, _ = server
    job = client.post("/v1/generate", json=dict(prompt="rock", duration=9.0, **FAST)).json()["id"]
    assert client.delete(f"/v1/jobs/{job}").status_code == 200
    assert wait(client, job, timeout=30)["status"] == "cancelled"
    assert client.delete(f"/v1/jobs/{job}").status_code == 409
    assert client.get(f"/v1/jobs/{job}/audio").status_code == 409


@pytest.mark.parametrize("body, field", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="   "), "prompt"),
    (dict(prompt="x", duration=0), "duration"),
    (dict(prompt="x", duration=-3), "duration"),
    (dict(prompt="x", top_p=2), "top_p"),
    (dict(prompt="x", top_k=-1), "top_k"),
    (dict(prompt="x", format="exe"), "format"),
    (dict(prompt="x", seed="abc"), "seed"),
    (dict(prompt="x", path="/etc/passwd"), "path"),
    (dict(duration=1), "prompt"),
])
def test_invalid_input_is_422_naming_the_field(server, body, field):
    client, _ = server
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 422
    assert field in str(r.json()["detail"])


@pytest.mark.parametrize("raw, field", [(b'{"prompt": "x", "duration": NaN}', "duration"),
                                        (b'{"prompt": "x", "duration": Infinity}', "duration"),
                                        (b'{"prompt": "x", "temperature": -Infinity}', "temperature"),
                                        (b'{"prompt": "x", "top_p": NaN}', "top_p")])
def test_non_finite_numbers_are_422_naming_the_field(server, raw, field):
    """JSON as Python's parser takes it (NaN, Infinity): a 422 naming the field, not a 500 from an error body
    that cannot hold the number; multipart requests alike."""
    client, _ = server
    r = client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and field in str(r.json()["detail"]) and "finite" in str(r.json()["detail"])
    r = client.post("/v1/generate", files={"request": (None, raw.decode())})       # multipart
    assert r.status_code == 422 and field in str(r.json()["detail"])


def test_other_bad_requests(server):
    client, _ = server
    assert client.post("/v1/generate", content=b"not json", headers={"content-type": "application/json"}
                       ).status_code == 422
    r = client.post("/v1/generate", json=dict(prompt="x", duration=20.0))     # the tiny model has 512 positions
    assert r.status_code == 422 and "longer than" in r.json()["detail"]
    r = client.post("/v1/generate", json=dict(prompt="x", duration=0.01))     # under one frame
    assert r.status_code == 422 and "at least one frame" in r.json()["detail"]
    assert client.get("/v1/jobs/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
    assert client.get("/v1/jobs/not-a-uuid/audio").status_code == 422
    assert client.get(f"/v1/jobs/{'0' * 32}").status_code == 404


def test_continuation_upload(server, model):
    client, service = server
    prompt_audio = model.decode(torch.randint(0, 64, (1, 4, 10)))[0]              # 10 frames of audio
    buf = io.BytesIO()
    sf.write(buf, prompt_audio[0].numpy(), 32000, format="WAV", subtype="FLOAT")
    r = client.post("/v1/generate", data={"request": '{"prompt": "jazz", "duration": 0.5, "top_k": 1}'},
                    files={"continuation": ("p.wav", buf.getvalue(), "audio/wav")})
    assert r.status_code == 202, r.text
    assert wait(client, r.json()["id"])["status"] == "done"
    codes = stored_codes(service, r.json()["id"])
    assert codes.shape == (4, 25)
    assert torch.equal(codes[:, :10], model.encode(prompt_audio[None])[0])           # the prompt, kept
    bad = client.post("/v1/generate", data={"request": '{"prompt": "jazz"}'},
                      files={"continuation": ("p.wav", b"garbage", "audio/wav")})
    assert bad.status_code == 422


def test_uploads_are_bounded_before_decoding_and_odd_parts_are_422(server, monkeypatch):
    """A few KB of compressed silence can hold hours: a continuation longer than the requested duration is
    refused before the codec sees it. A request sent as a file part is read; audio sent as a text field, a 422."""
    client, service = server
    encoded = []
    real_encode = service.model.encode
    monkeypatch.setattr(service.model, "encode", lambda audio: encoded.append(audio.shape) or real_encode(audio))
    buf = io.BytesIO()
    sf.write(buf, np.zeros(20 * 60 * 8000, np.int16), 8000, format="FLAC")     # 20 minutes of silence
    assert len(buf.getvalue()) < 200_000
    r = client.post("/v1/generate", data={"request": '{"prompt": "jazz", "duration": 1}'},
                    files={"continuation": ("long.flac", buf.getvalue(), "audio/flac")})
    assert r.status_code == 422 and "longer than 1 s" in r.json()["detail"] and not encoded
    r = client.post("/v1/generate", files={"request": ("job.json", b'{"prompt": "jazz", "duration": 0.2, "top_k": 1}',
                                                       "application/json")})
    assert r.status_code == 202, r.text
    wait(client, r.json()["id"])
    r = client.post("/v1/generate", files={"request": (None, '{"prompt": "jazz"}'), "continuation": (None, "hello")})
    assert r.status_code == 422 and "file part" in r.json()["detail"]


def test_continuation_with_more_channels_than_the_model_keeps_the_first(tmp_path, spm_model):
    """Six channels for a stereo model: its first two, as audiocraft's convert_audio_channels takes them."""
    import musicgen
    from conftest import build_hf_model, save_checkpoint
    from musicgen.serve.service import Service

    stereo = musicgen.load(save_checkpoint(build_hf_model(seed=1, stereo=True), tmp_path / "ckpt", spm_model))
    wav = np.random.default_rng(0).uniform(-0.5, 0.5, (3200, 6)).astype(np.float32)
    six, two = io.BytesIO(), io.BytesIO()
    sf.write(six, wav, 32000, format="WAV", subtype="FLOAT")
    sf.write(two, wav[:, :2], 32000, format="WAV", subtype="FLOAT")
    service = Service(stereo, tmp_path / "data")
    assert torch.equal(service._encode_prompt_audio(six.getvalue(), 1.0),
                       service._encode_prompt_audio(two.getvalue(), 1.0))


def test_a_full_disk_fails_jobs_cleanly_and_the_service_recovers(model, tmp_path):
    """Writes that fail (a full disk: the result file and then the database) fail that job, reported from
    memory; the thread that finishes jobs lives on, so once space is back the next job completes. A job that
    cannot even be stored is a 503."""
    import sqlite3

    with running_server(model, tmp_path, max_batch=2) as (url, service):
        with httpx.Client(base_url=url, timeout=60) as client:
            real_update, real_add = service.store.update, service.store.add
            full = {"on": True}

            def update(job_id, **fields):
                if full["on"] and fields.get("status") in ("done", "failed"):
                    raise sqlite3.OperationalError("database or disk is full")
                return real_update(job_id, **fields)

            def add(job_id, request):
                if full["on"]:
                    raise sqlite3.OperationalError("database or disk is full")
                return real_add(job_id, request)
            service.store.update, service.store.add = update, add
            service.store.add = real_add
            job = client.post("/v1/generate", json=dict(prompt="lofi", duration=0.3, **FAST)).json()["id"]
            j = wait(client, job)
            assert j["status"] == "failed" and "disk is full" in j["error"]
            service.store.add = add
            r = client.post("/v1/generate", json=dict(prompt="lofi", duration=0.3, **FAST))
            assert r.status_code == 503 and "cannot store the job" in r.json()["detail"]
            full["on"] = False
            service.store.add = real_add
            job = client.post("/v1/generate", json=dict(prompt="jazz", duration=0.3, **FAST)).json()["id"]
            assert wait(client, job)["status"] == "done"
            assert all(t.is_alive() for t in service._threads)


def test_full_queue_answers_429(model, tmp_path):
    with running_server(model, tmp_path, max_batch=1, max_queue=1) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            codes = [client.post("/v1/generate", json=dict(prompt="x", duration=9.0, **FAST)) for _ in range(4)]
            assert [c.status_code for c in codes].count(429) >= 2
            assert "queue is full" in next(c for c in codes if c.status_code == 429).json()["detail"]
            for c in codes:
                if c.status_code == 202:
                    client.delete(f"/v1/jobs/{c.json()['id']}")


def test_api_key(model, tmp_path):
    with running_server(model, tmp_path, api_key="s3cret") as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/v1/jobs").status_code == 401
            assert client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
            r = client.post("/v1/generate", json=dict(prompt="x", duration=0.1))
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert client.get("/v1/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
            assert client.get("/v1/model?access_token=s3cret").status_code == 200
            assert client.get("/health").status_code == 200 and client.get("/").status_code == 200


def test_stream_links_are_signed_for_one_job_and_expire(model, tmp_path, monkeypatch):
    """<audio> cannot send the key: a job's stream_url is signed for that job, for an hour, with no key in it."""
    from musicgen.serve import auth

    with running_server(model, tmp_path, api_key="s3cret") as (url, _):
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": "Bearer s3cret"}) as client, \
                httpx.Client(base_url=url, timeout=60) as anyone:
            a = client.post("/v1/generate", json=dict(prompt="x", duration=0.2, **FAST)).json()["id"]
            b = client.post("/v1/generate", json=dict(prompt="y", duration=0.2, **FAST)).json()["id"]
            wait(client, a), wait(client, b)
            link = client.get(f"/v1/jobs/{a}").json()["stream_url"]
            assert "s3cret" not in link and "sig=" in link and "expires=" in link
            r = anyone.get(link)                                                     # no key: the link alone
            assert r.status_code == 200 and r.content[:4] == b"RIFF"
            assert anyone.get(link.replace(a, b)).status_code == 401                 # another job's audio
            assert anyone.get(link[:-4] + "0000").status_code == 401                 # a forged signature
            assert anyone.get(f"/v1/jobs/{a}/stream").status_code == 401             # no link, no key
            monkeypatch.setattr(auth, "STREAM_LINK_SECONDS", -1)                     # links made an hour ago
            r = anyone.get(client.get(f"/v1/jobs/{a}").json()["stream_url"])
            assert r.status_code == 401 and "expired" in r.json()["detail"]


def test_restart_keeps_results_and_resumes_unfinished_work(model, tmp_path):
    with running_server(model, tmp_path, max_batch=1) as (url, service):
        with httpx.Client(base_url=url, timeout=60) as client:
            done = client.post("/v1/generate", json=dict(prompt="lofi", duration=0.2, **FAST)).json()["id"]
            wait(client, done)
            running = client.post("/v1/generate", json=dict(prompt="techno", duration=8.0, **FAST)).json()["id"]
            queued = client.post("/v1/generate", json=dict(prompt="jazz", duration=0.3, seed=4)).json()["id"]
            wait(client, running, states=("running",))
            audio = client.get(f"/v1/jobs/{done}/audio").content
    # the server is gone mid-job (as after a crash): one job 'running', one 'queued' in the database
    with running_server(model, tmp_path, max_batch=2) as (url, service):
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get(f"/v1/jobs/{done}/audio").content == audio
            assert wait(client, running)["status"] == "done"
            assert wait(client, queued)["status"] == "done"
            assert torch.equal(stored_codes(service, running),
                               model.generate_codes(["techno"], duration=8.0, **FAST)[0])
            assert torch.equal(stored_codes(service, queued),
                               model.generate_codes(["jazz"], duration=0.3, seed=4)[0])


def test_melody_upload(melody_model, tmp_path):
    """A melody checkpoint takes a reference tune as an upload; the job's codes are generate_codes' codes."""
    sr = 16000
    tune = 0.5 * np.sin(np.arange(sr) / sr * 2 * np.pi * 330.0).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, tune, sr, format="WAV", subtype="FLOAT")
    with running_server(melody_model, tmp_path, max_batch=2) as (url, service):
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/v1/model").json()["melody"] is True
            r = client.post("/v1/generate", data={"request": '{"prompt": "folk", "duration": 0.2, "top_k": 1}'},
                            files={"melody": ("m.wav", buf.getvalue(), "audio/wav")})
            assert r.status_code == 202, r.text
            assert wait(client, r.json()["id"])["status"] == "done"
            ref = melody_model.generate_codes(["folk"], duration=0.2, top_k=1, melody=torch.from_numpy(tune),
                                              melody_sample_rate=sr)[0]
            assert torch.equal(stored_codes(service, r.json()["id"]), ref)
            bad = client.post("/v1/generate", data={"request": '{"prompt": "folk"}'},
                              files={"melody": ("m.wav", b"garbage", "audio/wav")})
            assert bad.status_code == 422 and "melody" in bad.json()["detail"]


def test_melody_upload_to_a_text_model_is_422(server):
    client, _ = server
    assert client.get("/v1/model").json()["melody"] is False
    r = client.post("/v1/generate", data={"request": '{"prompt": "folk"}'},
                    files={"melody": ("m.wav", b"RIFF", "audio/wav")})
    assert r.status_code == 422 and "melody checkpoint" in r.json()["detail"]


def test_a_checkpoint_s_shorter_window_bounds_requests(ckpt_dir, tmp_path):
    """A model whose generation window is shorter than its positions (an audiocraft fine-tune on short segments)
    takes requests up to the window, and says so."""
    import dataclasses

    m = musicgen.load(ckpt_dir)
    m.cfg = dataclasses.replace(m.cfg, max_duration=0.4)
    with running_server(m, tmp_path / "data") as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/v1/model").json()["max_duration"] == 0.4
            r = client.post("/v1/generate", json=dict(prompt="x", duration=1.0))
            assert r.status_code == 422 and "0.4 s" in r.json()["detail"]
            assert wait(client, client.post("/v1/generate", json=dict(prompt="x", duration=0.4)).json()["id"]
                        )["status"] == "done"
