"""`musicgen prepare SRC -o DATA --model ID`: audio -> the checkpoint's EnCodec codes on disk, once.

    DATA/meta.json              the codec the codes belong to (rate, channels, codebooks, a fingerprint of its
                                weights), the segment settings, the melody chroma settings
    DATA/parts/rank<R>.codes    uint16 codes, each segment (K, frames) row-major, appended by rank R
    DATA/parts/rank<R>.chroma   melody checkpoints: uint8 pitch class of each chroma frame (the one-hot argmax)
    DATA/parts/rank<R>.jsonl    one line per source file rank R finished: its segments' offsets, caption and
                                metadata, or why it was skipped
    DATA/index.jsonl            every segment with its file, its start in it and its split (train / valid):
                                what training reads
    DATA/report.txt             the files skipped (unreadable, empty, silent, too short) and those without caption

Audio is converted as for inference and by audiocraft (audio.convert_channels: mono the mean of all channels, mono
audio copied to both channels of stereo, more channels cut to the first two; resampled to the codec rate), cut into
consecutive segments of `segment` seconds (whole codec frames; default the model's window, 30 s for the published
models) and encoded in batches of equal-length segments. The segments hold the whole file: training crops a file
anywhere, across its segments (dataset.py).
A file shorter than `min_segment_ratio` of a segment (audiocraft's 0.8) is skipped; a last segment shorter than
that is stored `short`: crops read it, but it is no row of its own. Melody checkpoints store each segment's
chromagram, made as at inference (chroma.prepare_melody, chromagram).

A file is committed whole: its codes are appended and flushed, then its line. A run killed half-way leaves at
most an uncommitted tail, which the next run cuts off before it appends; files with a line are not read again.
Under torchrun each rank encodes every WORLD_SIZE-th pending file into its own part, and rank 0 writes the
index once all are done.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .sources import Source, find_sources

FORMAT = 1
SILENCE = 1e-5          # a file whose peak stays below this (-100 dBFS) is silent


def codec_info(model) -> dict:
    """What codes depend on: the codec and how the LM lays its codebooks out."""
    cfg = model.cfg
    h = hashlib.sha256()
    for name, t in sorted(model.codec.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return dict(sample_rate=cfg.sample_rate, audio_channels=cfg.audio_channels, num_codebooks=cfg.lm.num_codebooks,
                codebook_size=cfg.codec.codebook_size, frame_rate=cfg.frame_rate, fingerprint=h.hexdigest()[:16])


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_lines(path: Path) -> list[dict]:
    """The committed lines of a part's jsonl (a torn last line, from a kill mid-write, is not one)."""
    return _committed(path)[0]


def _committed(path: Path) -> tuple[list[dict], int]:
    """(the committed lines, their length in bytes)."""
    if not path.is_file():
        return [], 0
    out, size = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
        size += len(line)
    return out, size


class Part:
    """One rank's appendable files in DATA/parts."""

    def __init__(self, folder: Path, name: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.codes_path, self.chroma_path = folder / f"{name}.codes", folder / f"{name}.chroma"
        self.index_path = folder / f"{name}.jsonl"
        lines, committed = _committed(self.index_path)
        self.codes_end = max([line.get("codes_end", 0) for line in lines], default=0)     # uint16 elements
        self.chroma_end = max([line.get("chroma_end", 0) for line in lines], default=0)   # uint8 elements
        # cut what a killed run wrote after its last commit
        for path, size in ((self.index_path, committed), (self.codes_path, 2 * self.codes_end),
                           (self.chroma_path, self.chroma_end)):
            with open(path, "ab") as f:
                f.truncate(size)

    def commit(self, source: Source, segments: list[tuple[float, np.ndarray, np.ndarray | None, bool]]) -> None:
        """Append one file's segments, in order: (start seconds, codes (K, frames) uint16, chroma (frames,) uint8 or
        None, short: a last segment under min_segment_ratio)."""
        entries = []
        with open(self.codes_path, "ab") as fc, open(self.chroma_path, "ab") as fh:
            for start, codes, chroma, short in segments:
                entry = dict(start=round(start, 3), offset=self.codes_end, frames=int(codes.shape[1]),
                             chroma_offset=self.chroma_end, chroma_frames=0 if chroma is None else int(chroma.size))
                if short:
                    entry["short"] = True
                fc.write(np.ascontiguousarray(codes, dtype="<u2").tobytes())
                self.codes_end += codes.size
                if chroma is not None:
                    fh.write(np.ascontiguousarray(chroma, dtype=np.uint8).tobytes())
                    self.chroma_end += chroma.size
                entries.append(entry)
            for f in (fc, fh):
                f.flush()
                os.fsync(f.fileno())
        self._line(dict(source=source.key, caption=source.caption, meta=source.meta, segments=entries))

    def skip(self, source: Source, reason: str) -> None:
        self._line(dict(source=source.key, skipped=reason))

    def _line(self, record: dict) -> None:
        record.update(codes_end=self.codes_end, chroma_end=self.chroma_end)
        with open(self.index_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


class Encoder:
    """Cuts files into consecutive segments (the whole file) and encodes them in batches of equal-length segments;
    a file is committed once all of its segments are encoded."""

    def __init__(self, model, part: Part, segment: float, min_segment_ratio: float, batch_size: int, demucs: bool):
        self.model, self.part, self.batch_size, self.demucs = model, part, batch_size, demucs
        self.seg = round(segment * model.sample_rate)
        self.min = int(np.ceil(min_segment_ratio * self.seg))
        self.pending: list[tuple[Source, list[tuple[float, torch.Tensor]]]] = []

    def add(self, source: Source) -> None:
        from ..audio import convert_channels, load_audio, resample

        try:
            wav, sr = load_audio(source.path)
        except ValueError as e:
            return self.part.skip(source, str(e))   # unreadable or empty, in load_audio's words
        if not torch.isfinite(wav).all():
            return self.part.skip(source, "holds NaN or infinite samples")
        if float(wav.abs().max()) < SILENCE:
            return self.part.skip(source, "silent")
        rate = self.model.sample_rate
        wav = resample(convert_channels(wav, self.model.audio_channels), sr, rate)
        if wav.shape[1] < self.min:
            return self.part.skip(source, f"too short ({wav.shape[1] / rate:.1f} s < {self.min / rate:.1f} s)")
        segments = [(s / rate, wav[:, s:s + self.seg]) for s in range(0, wav.shape[1], self.seg)]
        self.pending.append((source, segments))
        if sum(len(s) for _, s in self.pending) >= self.batch_size:
            self.flush()

    @torch.inference_mode()
    def flush(self) -> None:
        from .. import chroma as chroma_mod

        items = [(i, j, w) for i, (_, segs) in enumerate(self.pending) for j, (_, w) in enumerate(segs)]
        codes: dict[tuple[int, int], np.ndarray] = {}
        for length in sorted({w.shape[1] for *_, w in items}):
            same = [it for it in items if it[2].shape[1] == length]
            for b in range(0, len(same), self.batch_size):
                chunk = same[b:b + self.batch_size]
                out = self.model.encode(torch.stack([w for *_, w in chunk])).cpu().numpy().astype(np.uint16)
                for (i, j, _), c in zip(chunk, out):
                    codes[i, j] = c                                                   # (K, frames)
        melody = self.model.cfg.melody
        for i, (source, segs) in enumerate(self.pending):
            done = []
            for j, (start, w) in enumerate(segs):
                chroma = None
                if melody is not None:   # as at inference: mono 32 kHz (Demucs stems when installed), one-hot
                    mono = chroma_mod.prepare_melody(w, self.model.sample_rate, self.demucs)
                    chroma = chroma_mod.chromagram(mono[None], melody)[0].argmax(-1).numpy().astype(np.uint8)
                done.append((start, codes[i, j], chroma, w.shape[1] < self.min))
            self.part.commit(source, done)
        self.pending = []


def prepare(src: str | Path, out: str | Path, model_name: str, *, segment: float | None = None,
            min_segment_ratio: float = 0.8, valid_fraction: float = 0.0, batch_size: int = 4, demucs: bool = True,
            device: str | None = None, progress: bool = True) -> dict | None:
    """Encode SRC into DATA (see the module docstring). Returns rank 0's summary (None on other ranks)."""
    from .. import loading
    from .distributed import setup

    if segment is not None and not segment > 0:
        raise ValueError(f"--segment must be positive, got {segment:g}")
    if not 0 < min_segment_ratio <= 1:
        raise ValueError(f"--min-segment-ratio must be in (0, 1], got {min_segment_ratio:g}")
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"--valid-fraction must be in [0, 1), got {valid_fraction:g}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    sources = find_sources(src)   # before the model loads: a wrong SRC answers at once
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    d = setup(device, timeout_minutes=7 * 24 * 60)   # ranks wait at the end for the slowest one's share
    try:
        model = loading.load(model_name, device=d.device)
        if model.cfg.codec.codebook_size > 2**16:
            raise ValueError(f"{model_name}'s codebooks have {model.cfg.codec.codebook_size} entries: codes are stored as uint16")
        # whole codec frames: a crop joins consecutive segments, so each must end where a frame does
        frames = round((model.cfg.max_duration if segment is None else float(segment)) * model.frame_rate)
        if frames < 1:
            raise ValueError(f"--segment must be at least one codec frame ({1 / model.frame_rate:g} s), "
                             f"got {segment:g}")
        segment = frames / model.frame_rate
        meta = dict(format=FORMAT, model=str(model_name), codec=codec_info(model), segment=segment,
                    min_segment_ratio=min_segment_ratio,
                    melody=asdict(model.cfg.melody) if model.cfg.melody is not None else None)
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
            _settle_meta(out, meta)
        d.barrier()
        if not d.main:
            _settle_meta(out, meta)
        part = Part(out / "parts", f"rank{d.rank}")
        d.barrier()   # every part is repaired before any rank reads the others
        done = {line["source"] for p in sorted((out / "parts").glob("*.jsonl")) for line in read_lines(p)}
        mine = [s for s in sources if s.key not in done][d.rank::d.world]
        encoder = Encoder(model, part, segment, min_segment_ratio, batch_size, demucs)
        _encode_all(encoder, mine, progress and d.main, len(sources) - len(done & {s.key for s in sources}))
        d.barrier()
        return write_index(out, sources, valid_fraction) if d.main else None
    finally:
        d.close()


def _encode_all(encoder: Encoder, sources: list[Source], progress: bool, pending: int) -> None:
    import soundfile as sf
    from tqdm import tqdm

    def seconds(s: Source) -> float:
        try:
            return sf.info(str(s.path)).duration
        except Exception:  # noqa: BLE001 - unreadable: Encoder.add says why
            return 0.0

    lengths = [seconds(s) for s in sources]
    bar = tqdm(total=round(sum(lengths)), unit="s", unit_scale=True, desc=f"encoding {pending} files",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)   # rate: seconds of audio per second
    for s, length in zip(sources, lengths):
        encoder.add(s)
        bar.update(round(length))
    encoder.flush()
    bar.close()


def _settle_meta(out: Path, meta: dict) -> None:
    path = out / "meta.json"
    if path.is_file():
        old = json.loads(path.read_text())
        for key in ("format", "codec", "segment", "min_segment_ratio", "melody"):
            if old.get(key) != meta[key]:
                raise ValueError(f"{out} was prepared with another {key} ({old.get(key)} against {meta[key]}): "
                                 f"prepare into a new folder")
    else:
        write_atomic(path, json.dumps(meta, indent=2) + "\n")


def validation_files(sources: list[str], fraction: float) -> set[str]:
    """The files held out for validation: whole files (no song in both splits), each one whose path hashes
    under `fraction` of the hash range, so that adding or removing files never moves the others. A set too
    small for any hash to fall under the fraction still holds out one file (the lowest hash), and one always
    stays to train on."""
    if not fraction > 0 or len(sources) < 2:
        return set()
    digest = {s: hashlib.sha1(s.encode()).hexdigest() for s in sources}
    by_hash = sorted(sources, key=digest.get)
    valid = {s for s in sources if int(digest[s][:12], 16) < fraction * 16 ** 12}
    if not valid:
        valid = {by_hash[0]}
    if len(valid) == len(sources):
        valid.discard(by_hash[-1])
    return valid


def write_index(out: Path, sources: list[Source], valid_fraction: float) -> dict:
    """Merge every part's lines into DATA/index.jsonl (the files SRC lists now) and write DATA/report.txt."""
    wanted = {s.key for s in sources}
    records = {}
    for p in sorted((out / "parts").glob("*.jsonl")):
        for line in read_lines(p):
            if line["source"] in wanted:
                records[line["source"]] = dict(line, part=p.stem)
    used = sorted((r for r in records.values() if not r.get("skipped")), key=lambda r: r["source"])
    skipped = sorted((r for r in records.values() if r.get("skipped")), key=lambda r: r["source"])
    skipped_lines = [f"skipped {len(skipped)} files:"] + [f"  {r['source']}: {r['skipped']}" for r in skipped]
    if not used:
        if skipped:
            write_atomic(out / "report.txt", "no usable audio\n" + "\n".join(skipped_lines) + "\n")
        raise ValueError(f"no usable audio: all {len(skipped)} files were skipped (see {out / 'report.txt'})"
                         if skipped else "no usable audio")
    valid = validation_files([r["source"] for r in used], valid_fraction)
    lines, frames, rows = [], {"train": 0, "valid": 0}, 0
    for r in used:   # a file's segments on consecutive lines, in order (training crops across them)
        split = "valid" if r["source"] in valid else "train"
        for s in r["segments"]:
            lines.append(json.dumps(dict(source=r["source"], part=r["part"], caption=r["caption"], meta=r["meta"],
                                         split=split, **s)))
            frames[split] += s["frames"]
            rows += not s.get("short")
    write_atomic(out / "index.jsonl", "\n".join(lines) + "\n")
    meta = json.loads((out / "meta.json").read_text())
    rate = meta["codec"]["frame_rate"]
    uncaptioned = [r["source"] for r in used if not r["caption"]]
    summary = dict(files=len(used), segments=rows, train_hours=frames["train"] / rate / 3600,
                   valid_hours=frames["valid"] / rate / 3600, valid_files=len(valid),
                   skipped=[(r["source"], r["skipped"]) for r in skipped], uncaptioned=uncaptioned)
    report = [f"{len(used)} files, {rows} segments: {summary['train_hours'] * 60:.1f} min to train on, "
              f"{summary['valid_hours'] * 60:.1f} min held out ({len(valid)} files)"]
    if valid_fraction > 0 and not valid:
        report.append("no validation split: it needs at least 2 usable files")
    report += skipped_lines
    report += [f"{len(uncaptioned)} files have no caption (kept: they train the unconditional, null condition):"]
    report += [f"  {k}" for k in uncaptioned]
    write_atomic(out / "report.txt", "\n".join(report) + "\n")
    return summary
