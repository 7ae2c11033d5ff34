"""Durable job records for the service: SQLite for state, plain files (named by job id only) for results.

    store = JobStore(data_dir)
    store.add(job_id, request_dict)               # status "queued"
    store.update(job_id, status="done", progress=1.0)
    store.unfinished()                            # after a restart: jobs to queue again, oldest first

Job ids are server-made uuid4 hex strings and `path()` refuses anything else, so nothing a client sends ever
becomes part of a file name.
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from pathlib import Path

STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
_ID = re.compile(r"^[0-9a-f]{32}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id       TEXT PRIMARY KEY,
    status   TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    request  TEXT NOT NULL,          -- the validated request as JSON (seed filled in by the server)
    error    TEXT,
    created  REAL NOT NULL,
    updated  REAL NOT NULL
)
"""


class JobStore:
    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir)
        for sub in ("audio", "codes"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        path = self.root / "jobs.sqlite3"
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(SCHEMA)
            self._db.execute("SELECT id, status, progress, request, error, created, updated FROM jobs LIMIT 1")
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{path} is not a musicgen job database ({e}): move it away or use another "
                             f"--data-dir") from None
        self._lock = threading.Lock()

    def add(self, job_id: str, request: dict) -> None:
        now = time.time()
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, status, request, created, updated) VALUES (?, 'queued', ?, ?, ?)",
                             (_check(job_id), json.dumps(request), now, now))

    def update(self, job_id: str, **fields) -> None:
        bad = set(fields) - {"status", "progress", "error"}
        if bad:
            raise ValueError(f"cannot update {sorted(bad)}")
        if "status" in fields and fields["status"] not in STATES:
            raise ValueError(f"unknown status {fields['status']!r}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {cols}, updated = ? WHERE id = ?",
                             (*fields.values(), time.time(), _check(job_id)))

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            cols = [d[0] for d in self._db.execute("SELECT * FROM jobs LIMIT 0").description]
        return _record(cols, row) if row else None

    def list(self, limit: int = 50) -> list[dict]:
        with self._lock:
            cur = self._db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,))
            cols = [d[0] for d in cur.description]
            return [_record(cols, r) for r in cur.fetchall()]

    def unfinished(self) -> list[dict]:
        with self._lock:
            cur = self._db.execute("SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY created")
            cols = [d[0] for d in cur.description]
            return [_record(cols, r) for r in cur.fetchall()]

    def path(self, job_id: str, kind: str, suffix: str) -> Path:
        """data_dir/kind/<id>.<suffix>; kind and suffix are chosen by the server, the id is checked."""
        if kind not in ("audio", "codes") or not re.fullmatch(r"[a-z0-9.]+", suffix):
            raise ValueError(f"bad file kind {kind!r} or suffix {suffix!r}")
        return self.root / kind / f"{_check(job_id)}.{suffix}"

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _check(job_id: str) -> str:
    if not isinstance(job_id, str) or not _ID.match(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id


def _record(cols: list[str], row) -> dict:
    rec = dict(zip(cols, row))
    rec["request"] = json.loads(rec["request"])
    return rec
