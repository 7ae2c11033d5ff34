"""The API key's helpers: links signed for one job, and access-log lines without secrets.

An <audio> element cannot send `Authorization: Bearer <key>`, so a job's stream URL carries a signature instead
of the key: HMAC-SHA256 under the key of "stream <job id> <expiry>", valid for that job until the expiry. A
leaked link opens one job's audio for at most STREAM_LINK_SECONDS; the key itself never appears in a URL the page
makes.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time

STREAM_LINK_SECONDS = 3600   # how long a signed stream link works
_SECRETS = re.compile(r"((?:access_token|sig)=)[^&\s]*")


def stream_link(key: str | None, job_id: str) -> str:
    """The job's stream URL; with an API key, signed for this job until STREAM_LINK_SECONDS from now."""
    url = f"/v1/jobs/{job_id}/stream"
    if key is None:
        return url
    expires = int(time.time()) + STREAM_LINK_SECONDS
    return f"{url}?expires={expires}&sig={_sign(key, job_id, expires)}"


def link_valid(key: str, job_id: str, expires: str, sig: str) -> bool:
    """Whether `sig` signs this job's stream until `expires` (seconds since the epoch, not yet past)."""
    try:
        until = int(expires)
    except ValueError:
        return False
    return until >= time.time() and hmac.compare_digest(sig.encode(), _sign(key, job_id, until).encode())


def _sign(key: str, job_id: str, expires: int) -> str:
    return hmac.new(key.encode(), f"stream {job_id} {expires}".encode(), hashlib.sha256).hexdigest()


class RedactTokens(logging.Filter):
    """Hide `access_token=` and link signatures in uvicorn's access log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_SECRETS.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True
