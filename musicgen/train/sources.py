"""What `musicgen prepare` reads: audio files and their captions, from a folder or a manifest.

    SRC folder      every .wav .flac .mp3 .ogg below it; the caption of song.wav from song.txt (the whole
                    text) or song.json (audiocraft's sidecar: `description`, and optional `key`, `bpm`, `genre`,
                    `moods`, `keywords`, `instrument`, read as audiocraft does (music_meta) and merged into
                    the caption at training time)
    SRC.jsonl       audiocraft's manifest: one {"path", "duration", "sample_rate", ...} per line; captions from
                    a "description" in the line, else the sidecar beside the audio (or its "info_path")
    SRC.csv         a header with `path` and `caption` columns

Relative paths in a manifest are relative to the manifest's folder. A file with no caption is kept with an
empty one: it trains the unconditional (null) condition, as audiocraft trains a missing description, and
`prepare`'s report lists it.
"""
from __future__ import annotations

import csv
import gzip
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
# the fields audiocraft merges into captions (augment_music_info_description), in MusicInfo's order
META_FIELDS = ("key", "bpm", "genre", "moods", "keywords", "instrument")


@dataclass
class Source:
    path: Path
    caption: str = ""                                     # "" when none was found
    meta: dict = field(default_factory=dict)              # META_FIELDS of a json sidecar or manifest line, as
                                                          # written there (music_meta reads them at training)

    @property
    def key(self) -> str:
        """What identifies the file across runs of `prepare` (done files are skipped by it)."""
        return str(self.path)


def find_sources(src: str | Path) -> list[Source]:
    """SRC (folder, .jsonl[.gz] or .csv) -> its sources, sorted by path; ValueError names what is wrong."""
    src = Path(src).expanduser()
    if src.is_dir():
        paths = sorted(p.resolve() for p in src.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        if not paths:
            raise ValueError(f"no audio files ({', '.join(s[1:] for s in AUDIO_SUFFIXES)}) in {src}")
        return [_with_sidecar(Source(p)) for p in paths]
    if not src.is_file():
        raise ValueError(f"{src} does not exist: give a folder of audio, a .jsonl manifest or a .csv")
    name = src.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        sources = _from_jsonl(src)
    elif name.endswith(".csv"):
        sources = _from_csv(src)
    else:
        raise ValueError(f"{src}: not a folder, a .jsonl manifest or a .csv with path,caption")
    if not sources:
        raise ValueError(f"{src} lists no audio files")
    return sorted(sources, key=lambda s: s.key)


def _from_jsonl(src: Path) -> list[Source]:
    opener = gzip.open if src.name.lower().endswith(".gz") else open
    out = []
    with opener(src, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{src}:{n}: not a JSON line ({e.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise ValueError(f"{src}:{n}: an entry needs a \"path\"")
            source = Source(_resolve(src, entry["path"]))
            if entry.get("info_path"):
                source = _read_json_sidecar(source, _resolve(src, entry["info_path"]))
            elif isinstance(entry.get("description"), str):
                source = _caption_from(source, entry)
            else:
                source = _with_sidecar(source)
            out.append(source)
    return out


def _from_csv(src: Path) -> list[Source]:
    with open(src, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(f"{src}: the first line must be a header with a 'path' column (and 'caption')")
        return [Source(_resolve(src, row["path"]), (row.get("caption") or "").strip()) for row in reader
                if (row.get("path") or "").strip()]


def _resolve(manifest: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else manifest.parent / p).resolve()


def _with_sidecar(source: Source) -> Source:
    """Caption from song.json (audiocraft's sidecar) or song.txt beside song.wav; neither: no caption."""
    info = source.path.with_suffix(".json")
    if info.is_file():
        return _read_json_sidecar(source, info)
    text = source.path.with_suffix(".txt")
    if text.is_file():
        try:
            source.caption = " ".join(text.read_text(encoding="utf-8").split())
        except (OSError, UnicodeDecodeError):
            pass   # an unreadable caption is a missing caption: the report lists it
    return source


def _read_json_sidecar(source: Source, info: Path) -> Source:
    try:
        entry = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return source
    return _caption_from(source, entry) if isinstance(entry, dict) else source


def _caption_from(source: Source, entry: dict) -> Source:
    description = entry.get("description")
    source.caption = " ".join(description.split()) if isinstance(description, str) else ""
    source.meta = {k: entry[k] for k in META_FIELDS if entry.get(k) is not None}
    return source


def music_meta(raw: dict) -> dict:
    """The metadata fields as audiocraft's MusicInfo.from_dict reads them (get_musical_key, get_bpm,
    get_keyword, get_keyword_list), in MusicInfo's field order; fields that come out None are left out.

    key: stripped, lowercased; none when it names several keys (a comma). bpm: a float. genre, instrument:
    stripped, lowercased. moods, keywords: a string is split at commas and whitespace; each word stripped,
    lowercased, empty ones dropped. A string field that is not a string, empty or "None" is none."""
    out = {}
    for name in META_FIELDS:
        value = raw.get(name)
        if name == "key":
            value = None if isinstance(value, str) and "," in value else _keyword(value)
        elif name == "bpm":
            value = _float(value)
        elif name in ("moods", "keywords"):
            value = _keyword_list(value)
        else:
            value = _keyword(value)
        if value is not None:
            out[name] = value
    return out


def _keyword(value) -> str | None:
    if not isinstance(value, str) or value in ("", "None"):
        return None
    return value.strip().lower()


def _float(value) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _keyword_list(value) -> list[str] | None:
    if isinstance(value, str):
        value = [v.strip() for v in re.split(r"[,\s]", value)]
    elif isinstance(value, float) and math.isnan(value):
        value = []
    if not isinstance(value, list):
        value = [str(value)]
    words = [w for w in map(_keyword, value) if w is not None]
    return words or None
