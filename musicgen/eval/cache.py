"""Embeddings cached per clip, keyed by the file's bytes and everything that shapes its embedding (embedder,
weights, protocol settings), so a re-run embeds only new or changed clips. One .npy per entry, written
atomically: an interrupted run loses at most the clip it was writing."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def file_hash(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class EmbeddingCache:
    """`folder` None: a cache that remembers nothing."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder is not None else None
        self.hits = self.misses = 0

    @staticmethod
    def key(content: str, embedder: str, settings: dict) -> str:
        blob = json.dumps({"content": content, "embedder": embedder, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, embedder: str, key: str) -> Path:
        return self.folder / embedder / key[:2] / f"{key}.npy"

    def get(self, embedder: str, key: str) -> np.ndarray | None:
        if self.folder is not None:
            try:
                value = np.load(self._path(embedder, key), allow_pickle=False)
                self.hits += 1
                return value
            except (OSError, ValueError):
                pass
        self.misses += 1
        return None

    def put(self, embedder: str, key: str, value: np.ndarray) -> None:
        if self.folder is None:
            return
        path = self._path(embedder, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".npy", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.asarray(value), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
