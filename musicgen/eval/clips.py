"""Which clips are evaluated: sets given as folders of audio or jsonl manifests, generated and reference clips
paired by relative path, and captions from a CSV / jsonl file or from files beside the clips.

A clip's key is its path relative to the folder (or manifest) without the audio suffix, so `a/b.wav` pairs
with `a/b.flac`. Clips without a partner are reported, never dropped silently.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif")


@dataclass
class Clip:
    """One audio file of a set: `key` pairs it with its counterpart in the other set."""
    key: str                 # relative path without the audio suffix
    path: Path
    caption: str | None = None


def _key(rel: str) -> str:
    p = Path(rel)
    return (p.parent / p.stem).as_posix() if p.suffix.lower() in AUDIO_SUFFIXES else p.as_posix()


def list_clips(source: str | os.PathLike) -> list[Clip]:
    """A folder (searched recursively for audio files) or a .jsonl manifest (one {"path": ...} a line, paths
    relative to the manifest's folder; "caption" or "description" is taken as the caption)."""
    source = Path(source)
    clips: list[Clip] = []
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
            clips.append(Clip(_key(path.relative_to(source).as_posix()), path))
        if not clips:
            raise ValueError(f"{source} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
    elif source.suffix == ".jsonl" and source.is_file():
        for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                rel = entry["path"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{source}:{n}: not a JSON object with a 'path'") from None
            path = Path(rel) if Path(rel).is_absolute() else source.parent / rel
            try:
                key = _key(path.relative_to(source.parent).as_posix())
            except ValueError:
                key = _key(path.name)
            clips.append(Clip(key, path, entry.get("caption") or entry.get("description")))
        if not clips:
            raise ValueError(f"manifest {source} lists no clips")
    elif source.exists():
        raise ValueError(f"{source} is neither a folder of audio nor a .jsonl manifest")
    else:
        raise ValueError(f"{source} does not exist")
    seen: dict[str, Path] = {}
    for c in clips:
        if c.key in seen:
            raise ValueError(f"{seen[c.key]} and {c.path} have the same key {c.key!r}: rename one")
        seen[c.key] = c.path
    return clips


def pair(generated: list[Clip], reference: list[Clip]) -> tuple[list[tuple[Clip, Clip]], list[Clip], list[Clip]]:
    """(pairs with the same key, generated clips without a reference, reference clips without a generated one)."""
    refs = {c.key: c for c in reference}
    gens = {c.key for c in generated}
    pairs = [(g, refs[g.key]) for g in generated if g.key in refs]
    return pairs, [g for g in generated if g.key not in refs], [r for r in reference if r.key not in gens]


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """CSV (with a header) or jsonl with a `caption` and a `path` or `ytid` per row -> {key: caption}.
    MusicCaps' own CSV qualifies (ytid, caption)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"captions file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read captions file {path}: {e}") from None
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise ValueError(f"{path}:{n}: not JSON") from None
    else:
        rows = list(csv.DictReader(text.splitlines()))
    out: dict[str, str] = {}
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "caption" not in row or not ({"path", "ytid"} & set(row)):
            raise ValueError(f"{path}: row {n} needs a 'caption' and a 'path' or 'ytid' column")
        name = row.get("path") or row.get("ytid")
        if name and row["caption"] and row["caption"].strip():
            out[_key(str(name))] = row["caption"].strip()
    if not out:
        raise ValueError(f"captions file {path} has no captions")
    return out


def _sidecar(path: Path) -> str | None:
    """A caption beside an audio file: clip.txt, or audiocraft's clip.json with a "description"."""
    txt, info = path.with_suffix(".txt"), path.with_suffix(".json")
    if txt.is_file():
        return txt.read_text(encoding="utf-8").strip() or None
    if info.is_file():
        try:
            return (json.loads(info.read_text(encoding="utf-8")).get("description") or "").strip() or None
        except (ValueError, AttributeError):
            return None
    return None


def attach_captions(generated: list[Clip], reference: list[Clip], captions: dict[str, str] | None) -> None:
    """Give each generated clip its caption: from the captions file (by key, then by file name), its manifest,
    or a sidecar file beside it or beside its reference clip."""
    by_name: dict[str, str] = {}
    for k, v in (captions or {}).items():
        by_name.setdefault(Path(k).name, v)
    refs = {c.key: c for c in reference}
    for c in generated:
        if captions is not None:
            c.caption = captions.get(c.key) or by_name.get(Path(c.key).name) or c.caption
        if c.caption is None:
            c.caption = _sidecar(c.path) or (_sidecar(refs[c.key].path) if c.key in refs else None)
