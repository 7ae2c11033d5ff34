"""The HTTP service: `musicgen serve --model NAME --host 127.0.0.1 --port 8000`.

    POST   /v1/generate            JSON (or multipart with a `continuation` audio file) -> 202 {"id": ...}
    GET    /v1/jobs                recent jobs, newest first (the page's history)
    GET    /v1/jobs/{id}           state, progress, request, error (?wait=S: long poll until finished)
    GET    /v1/jobs/{id}/audio     the result file (wav / flac / ogg / mp3), loudness-normalised
    GET    /v1/jobs/{id}/stream    16-bit WAV sent while it is generated (chunked; the client leaving cancels,
                                   unless ?cancel_on_leave=false)
    DELETE /v1/jobs/{id}           cancel
    GET    /v1/model, /health, /docs, /openapi.json, and the web page at /

All generation goes through one `Scheduler` (continuous batching over the decoding engine) on one thread. Job state lives in
SQLite and results in files named by job id (`JobStore`), so a restart keeps finished results and queues
unfinished jobs again with their recorded seed. With an API key (`--api-key` or MUSICGEN_API_KEY) every /v1
route wants `Authorization: Bearer <key>` (or `?access_token=<key>`; `musicgen serve` keeps the token out of
its access log). An <audio> element cannot send the header: a job's `stream_url` is a link signed for that job
alone, valid for an hour, with no key in it. Uploads and the WAV stream are in media.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import secrets
import threading
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Query, Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..audio import convert_channels, resample, save_audio
from ..engine import Request
from .auth import link_valid, stream_link
from .jobs import FINISHED, JobStore
from .scheduler import Scheduler, job_request
from ..accel.quant import parameter_count
from .media import MAX_UPLOAD, read_upload, upload_bytes, wav_stream

log = logging.getLogger("musicgen.serve")
MEDIA = {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg", "mp3": "audio/mpeg"}
WEB = Path(__file__).with_name("web")


class GenerateRequest(BaseModel):
    """What POST /v1/generate accepts; anything else is a 422 naming the field."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str = Field(min_length=1, max_length=2000, description="text description of the music")
    duration: float = Field(8.0, gt=0, le=3600,
                            description="seconds of audio, at most the model's window (GET /v1/model)")
    top_k: int = Field(250, ge=0, le=100_000)
    top_p: float = Field(0.0, ge=0, le=1)
    temperature: float = Field(1.0, ge=0, le=100)
    guidance_scale: float = Field(3.0, ge=0, le=100)
    seed: int | None = Field(None, ge=0, lt=2 ** 63, description="omit for a server-chosen (recorded) seed")
    format: Literal["wav", "flac", "ogg", "mp3"] = "wav"

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is empty")
        return v


class Service:
    """The model, the scheduler thread, the job store and the live requests, shared by all routes."""

    def __init__(self, model, data_dir: str | Path, model_name: str = "", max_batch: int = 8, max_queue: int = 32,
                 api_key: str | None = None, store: JobStore | None = None):
        self.model, self.model_name = model, model_name
        self.store = store if store is not None else JobStore(data_dir)
        self.scheduler = Scheduler(model, max_batch=max_batch)
        self.max_queue, self.api_key = max_queue, api_key or None
        self.live: dict[str, Request] = {}
        self.unsaved: dict[str, dict] = {}   # job states the database could not take (a full disk)
        self.finished: queue.Queue = queue.Queue()
        # one window of the model (a job is never long-form), and no more than its positions hold
        self.max_frames = model.lm.positions.shape[0] - model.cfg.lm.num_codebooks
        if model.cfg.lm.prefix_conditioning:   # the chroma frames and the text come first
            self.max_frames -= model.cfg.melody.chroma_length + 1
        self.max_frames = min(self.max_frames, model.window_frames)
        self._threads = [threading.Thread(target=self.scheduler.run, name="musicgen-decode", daemon=True),
                         threading.Thread(target=self._finisher, name="musicgen-finish", daemon=True)]

    def start(self) -> None:
        for rec in self.store.unfinished():   # a restart: queue unfinished work again, same seed, same codes
            try:
                self._enqueue(rec["id"], GenerateRequest(**rec["request"]))
            except Exception as e:
                self.store.update(rec["id"], status="failed", error=f"could not resume: {e}")
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self.finished.put(None)
        for t in self._threads:
            t.join(timeout=10)
        self.store.close()

    # -- jobs -----------------------------------------------------------------------------------------
    def submit(self, req: GenerateRequest, prefix: torch.Tensor | None = None,
               melody: torch.Tensor | None = None) -> str:
        if len(self.scheduler.pending) >= self.max_queue:
            raise HTTPException(429, f"the queue is full ({self.max_queue} jobs waiting); try again later")
        try:
            frames = self.model.frames_for(req.duration)
        except ValueError as e:                                   # shorter than one frame
            raise HTTPException(422, str(e)) from None
        if frames > self.max_frames:
            raise HTTPException(422, f"duration {req.duration:g} s is longer than this model's "
                                     f"{self.max_frames / self.model.frame_rate:g} s")
        if req.seed is None:
            req = req.model_copy(update={"seed": secrets.randbelow(2 ** 31)})
        job_id = uuid.uuid4().hex
        try:
            if prefix is not None:
                np.save(self.store.path(job_id, "codes", "prefix.npy"), prefix.numpy().astype(np.int64))
            if melody is not None:
                np.save(self.store.path(job_id, "codes", "melody.npy"), melody.numpy().astype(np.float32))
            self.store.add(job_id, req.model_dump())
        except Exception as e:   # a full disk or a data folder gone: nothing is queued
            raise HTTPException(503, f"cannot store the job ({type(e).__name__}: {e}); try again later") from None
        self._enqueue(job_id, req, prefix, melody)
        return job_id

    def _enqueue(self, job_id: str, req: GenerateRequest, prefix: torch.Tensor | None = None,
                 melody: torch.Tensor | None = None) -> None:
        if prefix is None and self.store.path(job_id, "codes", "prefix.npy").exists():
            prefix = torch.from_numpy(np.load(self.store.path(job_id, "codes", "prefix.npy")))
        if melody is None and self.store.path(job_id, "codes", "melody.npy").exists():
            melody = torch.from_numpy(np.load(self.store.path(job_id, "codes", "melody.npy")))
        r = job_request(prompts=[req.prompt], duration=req.duration, top_k=req.top_k, top_p=req.top_p,
                        temperature=req.temperature, guidance_scale=req.guidance_scale, seed=req.seed,
                        prompt_codes=None if prefix is None else prefix[None],
                        melodies=None if melody is None else [melody])
        r.on_step, r.on_done = self._on_step, self.finished.put
        r.tag = {"job_id": job_id, "format": req.format}
        self.live[job_id] = r
        self.scheduler.submit(r)

    def _on_step(self, r: Request) -> None:
        if r.steps == 1:
            try:
                self.store.update(r.tag["job_id"], status="running")
            except Exception as e:   # a full disk: the job goes on; its state is kept in memory meanwhile
                log.warning("cannot record job %s as running: %s", r.tag["job_id"], e)

    def _finisher(self) -> None:
        """Decode and write finished jobs off the decoding thread, so the batch keeps stepping. Jobs that
        finish together (they often do: they shared their steps) are decoded as one codec batch."""
        while True:
            batch = [self.finished.get()]
            while not self.finished.empty() and len(batch) < self.scheduler.max_batch:
                batch.append(self.finished.get())
            if None in batch:
                return
            try:
                self._finish(batch)
            except Exception:   # the thread must outlive any one batch, or no job would finish again
                log.exception("finishing jobs %s failed", [r.tag["job_id"] for r in batch])
                for r in batch:
                    self.unsaved.setdefault(r.tag["job_id"], {"status": "failed", "error": "could not be saved"})
                    self.live.pop(r.tag["job_id"], None)

    def _finish(self, batch: list[Request]) -> None:
        """Decode the batch's finished jobs together and write every job's result or state."""
        done = [r for r in batch if r.status == "done"]
        for frames in sorted({r.frames for r in done}):
            group = [r for r in done if r.frames == frames]
            try:
                audio = self.model.decode(torch.cat([r.codes for r in group]))     # (g, channels, samples)
            except Exception as e:
                audio = [None] * len(group)
                for r in group:
                    r.error = f"{type(e).__name__}: {e}"
            for r, wav in zip(group, audio):
                self._write(r, wav)
        for r in batch:
            if r.status != "done":
                self._write(r, None)

    def _write(self, r: Request, audio: torch.Tensor | None) -> None:
        job_id, fmt = r.tag["job_id"], r.tag["format"]
        try:
            if r.status == "done" and audio is not None:
                np.save(self.store.path(job_id, "codes", "npy"), r.codes[0].cpu().numpy())
                save_audio(self.store.path(job_id, "audio", fmt), audio, self.model.sample_rate, format=fmt)
                self.store.update(job_id, status="done", progress=1.0)
            else:
                status = r.status if r.status != "done" else "failed"
                self.store.update(job_id, status=status, progress=r.progress, error=r.error)
        except Exception as e:   # the files or the database cannot be written (a full disk, ...)
            error = f"{type(e).__name__}: {e}"
            log.warning("job %s failed: %s", job_id, error)
            try:
                self.store.update(job_id, status="failed", error=error)
            except Exception:   # the database too: report the failure from memory until a restart
                self.unsaved[job_id] = {"status": "failed", "error": error}
        finally:
            self.live.pop(job_id, None)

    def job(self, job_id: str) -> dict:
        rec = self.store.get(job_id)
        if rec is None:
            raise HTTPException(404, f"no job {job_id}")
        if job_id in self.unsaved and rec["status"] not in FINISHED:
            rec.update(self.unsaved[job_id])
        live = self.live.get(job_id)
        if live is not None and rec["status"] not in FINISHED:
            rec["progress"] = live.progress
            rec["status"] = "running" if live.status == "running" else rec["status"]
        rec["audio_url"] = f"/v1/jobs/{job_id}/audio" if rec["status"] == "done" else None
        rec["stream_url"] = stream_link(self.api_key, job_id)
        if live is not None:
            rec["shared_steps"] = live.shared_steps
        return rec

    def cancel(self, job_id: str) -> dict:
        rec = self.job(job_id)
        live = self.live.get(job_id)
        if rec["status"] in FINISHED or live is None:
            raise HTTPException(409, f"job {job_id} is already {rec['status']}")
        self.scheduler.cancel(live)
        return {"id": job_id, "status": "cancelling"}

    def info(self) -> dict:
        cfg = self.model.cfg
        return {"model": self.model_name, "sample_rate": self.model.sample_rate,
                "audio_channels": self.model.audio_channels, "codebooks": cfg.lm.num_codebooks,
                "layers": cfg.lm.num_layers, "dim": cfg.lm.dim,
                "parameters": parameter_count(self.model),
                "max_duration": round(self.max_frames / self.model.frame_rate, 2),
                "max_batch": self.scheduler.max_batch, "max_queue": self.max_queue,
                "continuation": True, "melody": self.model.supports_melody, "auth": self.api_key is not None}

    async def prefix_from_upload(self, upload, duration: float) -> torch.Tensor:
        """Continuation audio, which must be shorter than the requested `duration` -> its codes (K, P)."""
        data = await upload_bytes(upload, "continuation")
        return await run_in_threadpool(self._encode_prompt_audio, data, duration)

    async def melody_from_upload(self, upload) -> torch.Tensor:
        data = await upload_bytes(upload, "melody")
        return await run_in_threadpool(self._prepare_melody, data)

    def _prepare_melody(self, data: bytes) -> torch.Tensor:
        """An uploaded reference tune -> mono 32 kHz samples (drums and bass removed when Demucs is installed).
        The LM sees the chroma of its first `chroma_length` frames (30 s): twice that is read, which leaves the
        source separation its context, and a longer tune is cut there rather than decoded whole."""
        from ..chroma import CHROMA_SAMPLE_RATE

        mc = self.model.cfg.melody
        wav, sr = read_upload(data, "melody", 2 * mc.chroma_length * mc.hop_length / CHROMA_SAMPLE_RATE, cut=True)
        try:
            return self.model._melodies(torch.from_numpy(np.ascontiguousarray(wav.T)), sr, 1, demucs=True)[0]
        except ValueError as e:
            raise HTTPException(422, f"melody: {e}") from None

    def _encode_prompt_audio(self, data: bytes, duration: float) -> torch.Tensor:
        wav, sr = read_upload(data, "continuation", duration)
        try:
            audio = convert_channels(torch.from_numpy(np.ascontiguousarray(wav.T)), self.model.audio_channels)
        except ValueError as e:
            raise HTTPException(422, f"continuation: {e}") from None
        audio = resample(audio, sr, self.model.sample_rate)
        return self.model.encode(audio[None])[0].cpu()                                   # (K, P)


def _parse_request(raw: str | bytes) -> GenerateRequest:
    """The request body as Python's JSON parser reads it (NaN and Infinity included, so that the error names
    the field that holds one), validated."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPException(422, f"the request is not valid JSON: {e}") from None
    return GenerateRequest.model_validate(obj)


def create_app(service: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        service.stop()

    app = FastAPI(title="musicgen", version="0.1.0", lifespan=lifespan,
                  description="MusicGen text-to-music: jobs, continuous batching, streaming audio.")
    app.state.service = service

    def auth(request: HTTPRequest) -> None:
        if service.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else request.query_params.get("access_token", "")
        if not token or not hmac.compare_digest(token.encode(), service.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                headers={"WWW-Authenticate": "Bearer"})

    def job_id(id: uuid.UUID) -> str:       # FastAPI answers 422 for anything that is not a uuid
        return id.hex

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return (WEB / "index.html").read_text(encoding="utf-8")

    @app.get("/health")
    def health():
        s = service.scheduler
        return {"status": "ok", "queued": len(s.pending), "running": len(s.active), "steps": s.steps,
                "request_steps": s.request_steps}

    @app.get("/v1/model", dependencies=[Depends(auth)])
    def model_info():
        return service.info()

    @app.post("/v1/generate", status_code=202, dependencies=[Depends(auth)],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "request": {"type": "string", "description": "GenerateRequest as JSON"},
                      "continuation": {"type": "string", "format": "binary",
                                       "description": "audio the result continues"},
                      "melody": {"type": "string", "format": "binary",
                                 "description": "reference tune whose melody the result follows (melody models)"}}}}}}})
    async def generate(request: HTTPRequest):
        prefix = melody = None
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                form = await request.form()
                if "melody" in form and not service.model.supports_melody:
                    raise HTTPException(422, "melody conditioning needs a melody checkpoint; this one has none")
                raw = form.get("request") or "{}"
                if not isinstance(raw, str):   # sent as a file part (curl -F request=@job.json)
                    raw = await raw.read(MAX_UPLOAD + 1)
                body = _parse_request(raw)
                if form.get("continuation") is not None:
                    prefix = await service.prefix_from_upload(form["continuation"], body.duration)
                if form.get("melody") is not None:
                    melody = await service.melody_from_upload(form["melody"])
            else:
                body = _parse_request(await request.body())
        except ValidationError as e:
            # without the offending input: it may be NaN or Infinity, which a JSON body cannot carry
            return JSONResponse({"detail": e.errors(include_url=False, include_context=False, include_input=False)},
                                422)
        if prefix is not None and prefix.shape[-1] >= service.model.frames_for(body.duration):
            raise HTTPException(422, "continuation audio is as long as the requested duration or longer")
        job = service.submit(body, prefix, melody)
        return {"id": job, "status": "queued", "url": f"/v1/jobs/{job}"}

    @app.get("/v1/jobs", dependencies=[Depends(auth)])
    def jobs(limit: int = 50):
        return [service.job(r["id"]) for r in service.store.list(max(1, min(limit, 500)))]

    @app.get("/v1/jobs/{id}", dependencies=[Depends(auth)])
    async def job(id: str = Depends(job_id), wait: float = Query(0, ge=0, le=60, description=
                  "long poll: answer when the job has finished or after this many seconds")):
        live = service.live.get(id)
        deadline = asyncio.get_running_loop().time() + wait
        while live is not None and id in service.live and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)       # cheap: no database work until the job has left the live set
        return service.job(id)

    @app.delete("/v1/jobs/{id}", dependencies=[Depends(auth)])
    def cancel(id: str = Depends(job_id)):
        return service.cancel(id)

    @app.get("/v1/jobs/{id}/audio", dependencies=[Depends(auth)])
    def audio(id: str = Depends(job_id)):
        rec = service.job(id)
        if rec["status"] != "done":
            raise HTTPException(409, f"job {id} is {rec['status']}, not done")
        fmt = rec["request"]["format"]
        return FileResponse(service.store.path(id, "audio", fmt), media_type=MEDIA[fmt],
                            filename=f"musicgen-{id[:8]}.{fmt}")

    def stream_auth(request: HTTPRequest, id: str = Depends(job_id)) -> None:
        """The key, or the job's signed link (its `stream_url`)."""
        sig = request.query_params.get("sig")
        if sig is None or service.api_key is None:
            return auth(request)
        if not link_valid(service.api_key, id, request.query_params.get("expires", ""), sig):
            raise HTTPException(401, f"this stream link is wrong or has expired: GET /v1/jobs/{id} gives a new one",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/v1/jobs/{id}/stream", dependencies=[Depends(stream_auth)])
    def stream(id: str = Depends(job_id), cancel_on_leave: bool = Query(True, description=
               "cancel the job when the client leaves before the end (the web page keeps it: false)")):
        rec = service.job(id)
        live = service.live.get(id)
        if live is None and rec["status"] != "done":
            raise HTTPException(409, f"job {id} is {rec['status']}")
        codes = None if live is not None else torch.from_numpy(np.load(service.store.path(id, "codes", "npy")))
        return StreamingResponse(wav_stream(service, live, codes, cancel_on_leave), media_type="audio/wav",
                                 headers={"Cache-Control": "no-store"})

    return app
