"""Training data: the codes `musicgen prepare` wrote, memory-mapped, and which crops of them each step reads.

Every random choice of a training row is a function of (seed, g), g = (step - 1) * batch_size + row the row's
place in the whole run, not of any state that evolves: which segment (a fresh permutation of the training
segments per epoch), where the crop starts, how its caption is augmented, whether its condition is dropped.
So a run resumed at step s reads exactly the rows an uninterrupted run reads, and a global batch split over
ranks and micro-batches holds the same rows as on one process.

A row's segment picks a file (a file of n segments is picked n times an epoch); the crop is then taken from
the whole FILE, at a start uniform over every place where `crop` frames fit in it, as audiocraft seeks each
item at a random time of its file. `prepare` stores a file as consecutive segments, so a crop may span two or
more of them: their codes (and chroma) are read and joined. The file's last segment is there too when it is
short (stored `short`: no row of its own). A file shorter than the crop is read whole. Validation rows are the
first crop of each segment.

Caption augmentation follows audiocraft's training (MusicDataset, T5Conditioner, ClassifierFreeGuidanceDropout,
AttributeDropout), drawn per row:
  - the metadata fields (key, bpm, genre, moods, keywords, instrument) are read as audiocraft's MusicInfo reads
    them (sources.music_meta: lowercased, lists split at commas and whitespace, bpm a float)
  - with probability 0.25 they are merged into the description: each field kept with probability 0.5,
    shuffled, "field: value" (lists joined by ", ") joined by ". ", and the description itself dropped half of
    those times, metadata or not (merge_text_p 0.25, drop_other_p 0.5, drop_desc_p 0.5)
  - as in augment_music_info_description, a description that is kept always becomes
    description.rstrip(".") + ". " + metadata, stripped: "a lofi beat" trains as "a lofi beat."; a dropped
    one leaves the metadata alone, or the null condition when there is none
  - word dropout: each word of the caption dropped with probability `word_dropout`
  - guidance dropout: with probability `cfg_dropout` the whole condition becomes the null one (empty text,
    and for melody checkpoints the null chroma), as inference's unconditional rows
  - melody checkpoints: otherwise the chroma is replaced by the null chroma half of the time
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import chroma as chroma_mod
from .sources import music_meta


@dataclass(frozen=True)
class Augment:
    cfg_dropout: float = 0.3     # whole condition -> null (audiocraft classifier_free_guidance.training_dropout;
                                 # a run's value: options.dropouts)
    word_dropout: float = 0.3    # per word (audiocraft t5.word_dropout)
    merge_text: float = 0.25     # merge metadata into the description (merge_text_p)
    drop_desc: float = 0.5       # ... and drop the description when merging (drop_desc_p)
    keep_field: float = 0.5      # ... keeping each field with this probability (drop_other_p)
    chroma_dropout: float = 0.5  # melody: chroma -> null chroma (attribute_dropout wav.self_wav)


@dataclass
class Row:
    segment: int                 # index into the split's segments (the ones rows are drawn from: not `short`)
    start: int                   # first frame of the crop in the segment's file
    frames: int                  # frames in the crop
    caption: str                 # as the LM sees it ("" = the null condition)
    melody: bool = True          # melody checkpoints: False = the null chroma


@dataclass
class Batch:
    codes: torch.Tensor          # (B, K, T) long, the special token past each row's length
    lengths: torch.Tensor        # (B,) real frames per row
    captions: list[str]
    chroma: torch.Tensor | None  # (B, chroma_length, 12) one-hot (melody checkpoints)


@dataclass
class File:
    """One file of a split: its stored segments in time order (index entries), which together hold it whole."""
    source: str
    segments: list[dict] = field(default_factory=list)
    starts: list[int] = field(default_factory=lambda: [0])   # first frame of each segment, then the file's frames

    def add(self, entry: dict) -> None:
        self.segments.append(entry)
        self.starts.append(self.starts[-1] + entry["frames"])

    @property
    def frames(self) -> int:
        return self.starts[-1]


class CodesData:
    """DATA as `musicgen prepare` left it: meta.json, index.jsonl and the memory-mapped parts."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta, index = self.folder / "meta.json", self.folder / "index.jsonl"
        if not meta.is_file() or not index.is_file():
            raise ValueError(f"{self.folder} is not prepared data (no meta.json and index.jsonl): run "
                             f"`musicgen prepare SRC -o {self.folder} --model ...` first")
        self.meta = json.loads(meta.read_text())
        entries = [json.loads(line) for line in index.read_text(encoding="utf-8").splitlines() if line.strip()]
        for e in entries:   # the index keeps the metadata as the sidecars wrote it
            e["meta"] = music_meta(e.get("meta") or {})
        self.splits: dict[str, list[dict]] = {"train": [], "valid": []}      # the segments rows are drawn from
        self.files: dict[str, list[File]] = {"train": [], "valid": []}
        self._home: dict[str, list[tuple[int, int]]] = {"train": [], "valid": []}   # segment -> (file, first frame)
        for e in entries:   # index.jsonl lists each file's segments on consecutive lines, in order
            if e["split"] not in self.splits:
                continue
            files = self.files[e["split"]]
            if not files or files[-1].source != e["source"]:
                files.append(File(e["source"]))
            if not e.get("short"):
                self.splits[e["split"]].append(e)
                self._home[e["split"]].append((len(files) - 1, files[-1].frames))
            files[-1].add(e)
        if len({f.source for fs in self.files.values() for f in fs}) != sum(map(len, self.files.values())):
            raise ValueError(f"{index} lists a file's segments apart: prepare it again with `musicgen prepare`")
        if not self.splits["train"]:
            raise ValueError(f"{self.folder} has no training segments")
        self.num_codebooks = self.meta["codec"]["num_codebooks"]
        self._maps: dict[tuple[str, str], np.memmap] = {}
        self._perms: dict[int, np.ndarray] = {}

    @property
    def frame_rate(self) -> float:
        return self.meta["codec"]["frame_rate"]

    def check(self, model, model_name: str) -> None:
        """A one-line error where `model` cannot train on these codes."""
        from .encode import codec_info

        ours, theirs = codec_info(model), self.meta["codec"]
        if ours != theirs:
            what = [k for k in ours if ours[k] != theirs.get(k)]
            raise ValueError(f"{model_name} does not match the codec {self.folder} was encoded with ({what[0]}: "
                             f"{ours[what[0]]} against {theirs.get(what[0])}); prepare it again with --model {model_name}")
        if model.cfg.melody is not None and self.meta.get("melody") != _melody_meta(model):
            raise ValueError(f"{model_name} is a melody checkpoint but {self.folder} holds no chroma made for it; "
                             f"prepare it again with --model {model_name}")

    def __len__(self) -> int:
        return len(self.splits["train"])

    # -- reading ------------------------------------------------------------------------------------------
    def _map(self, part: str, kind: str) -> np.memmap:
        if (part, kind) not in self._maps:
            path = self.folder / "parts" / f"{part}.{kind}"
            self._maps[part, kind] = np.memmap(path, dtype="<u2" if kind == "codes" else np.uint8, mode="r")
        return self._maps[part, kind]

    def _codes(self, e: dict) -> np.ndarray:
        n = self.num_codebooks * e["frames"]
        return self._map(e["part"], "codes")[e["offset"]:e["offset"] + n].reshape(self.num_codebooks, e["frames"])

    def _chroma(self, e: dict) -> np.ndarray:
        return self._map(e["part"], "chroma")[e["chroma_offset"]:e["chroma_offset"] + e["chroma_frames"]]

    def codes(self, split: str, i: int) -> np.ndarray:
        """(K, frames) uint16: segment i of the split as stored."""
        return self._codes(self.splits[split][i])

    def chroma(self, split: str, i: int) -> np.ndarray:
        """(chroma frames,) uint8 pitch classes of segment i (melody checkpoints)."""
        return self._chroma(self.splits[split][i])

    def file_of(self, split: str, i: int) -> File:
        return self.files[split][self._home[split][i][0]]

    def _pieces(self, split: str, row: Row):
        """(segment entry, first frame, end frame) within each stored segment the row's crop overlaps, in order."""
        f, end = self.file_of(split, row.segment), row.start + row.frames
        for e, first in zip(f.segments, f.starts):
            lo, hi = max(row.start, first), min(end, first + e["frames"])
            if lo < hi:
                yield e, lo - first, hi - first

    def crop_codes(self, split: str, row: Row) -> np.ndarray:
        """(K, row.frames) uint16: the row's crop of its file, joined across the segments it spans."""
        return np.concatenate([self._codes(e)[:, lo:hi] for e, lo, hi in self._pieces(split, row)], axis=1)

    # -- which rows a step reads ----------------------------------------------------------------------------
    def train_rows(self, step: int, batch_size: int, crop: int, seed: int, augment: Augment) -> list[Row]:
        """The global batch of training step `step` (from 1): batch_size rows, crops of at most `crop` frames."""
        n = len(self)
        rows = []
        for j in range(batch_size):
            g = (step - 1) * batch_size + j
            epoch, pos = divmod(g, n)
            if epoch not in self._perms:
                self._perms = {epoch: np.random.default_rng([seed, 0, epoch]).permutation(n)}
            i = int(self._perms[epoch][pos])
            rng = np.random.default_rng([seed, 1, g])
            e, length = self.splits["train"][i], self.file_of("train", i).frames
            frames = min(crop, length)
            start = int(rng.integers(0, length - frames + 1))              # anywhere in the file
            caption = augment_caption(e["caption"], e["meta"], rng, augment)
            null = rng.random() < augment.cfg_dropout
            melody = not null and rng.random() >= augment.chroma_dropout
            rows.append(Row(i, start, frames, "" if null else caption, melody))
        return rows

    def valid_rows(self, crop: int) -> list[Row]:
        """Every validation segment once: its first `crop` frames, its caption and chroma as they are."""
        return [Row(i, first, min(crop, e["frames"]), e["caption"])
                for i, (e, (_, first)) in enumerate(zip(self.splits["valid"], self._home["valid"]))]

    def collate(self, rows: list[Row], split: str, special: int, melody=None) -> Batch:
        """Rows -> tensors; `melody` (MelodyConfig) for melody checkpoints."""
        T = max(r.frames for r in rows)
        codes = np.full((len(rows), self.num_codebooks, T), special, dtype=np.int64)
        for b, r in enumerate(rows):
            codes[b, :, :r.frames] = self.crop_codes(split, r)
        chroma = None
        if melody is not None:
            chroma = torch.cat([self._crop_chroma(split, r, melody) if r.melody
                                else chroma_mod.null_chroma(1, melody) for r in rows])
        return Batch(torch.from_numpy(codes), torch.tensor([r.frames for r in rows]), [r.caption for r in rows], chroma)

    def _crop_chroma(self, split: str, row: Row, melody) -> torch.Tensor:
        """The chroma frames under the crop (those of each segment it spans, joined), looped or cut to the LM's
        chroma length as inference does with a melody of the crop's duration -> (1, chroma_length, 12)."""
        per_frame = chroma_mod.CHROMA_SAMPLE_RATE / melody.hop_length / self.frame_rate   # chroma frames per code frame
        pieces = []
        for e, lo, hi in self._pieces(split, row):
            full = self._chroma(e)
            first = min(int(lo * per_frame), len(full) - 1)
            pieces.append(full[first:max(first + 1, int(np.ceil(hi * per_frame)))])
        classes = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
        one_hot = torch.nn.functional.one_hot(classes, melody.num_chroma).float()[None]
        return chroma_mod.fit_length(one_hot, melody.chroma_length)


def _melody_meta(model) -> dict:
    from dataclasses import asdict

    return asdict(model.cfg.melody)


def augment_caption(caption: str, meta: dict, rng: np.random.Generator, a: Augment) -> str:
    """A caption as audiocraft's training would present it this time (see the module docstring); `meta` as
    sources.music_meta reads it."""
    description = caption or None
    metadata = ""
    if rng.random() < a.merge_text:
        pairs = [f"{k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in meta.items()
                 if rng.random() < a.keep_field]
        metadata = ". ".join(pairs[i] for i in rng.permutation(len(pairs)))
        if rng.random() < a.drop_desc:   # even with no metadata to merge: then the row is the null condition
            description = None
    if description is None:
        description = metadata if len(metadata) > 1 else None
    else:   # with or without metadata: "a lofi beat" trains as "a lofi beat."
        description = f"{description.rstrip('.')}. {metadata}"
    text = (description or "").strip()
    if a.word_dropout > 0 and text:
        text = " ".join(w for w in text.split(" ") if rng.random() >= a.word_dropout)
    return text
