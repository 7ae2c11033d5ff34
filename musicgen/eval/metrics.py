"""The four numbers of the MusicGen model card, computed as audiocraft's metrics compute them.

    fad       VGGish embeddings of one 0.96 s example per 1 s window, windows every 0.5 s (16 kHz, peak -1 dBFS,
              16-bit, divided by the positive peak: Google's FAD code), pooled per set; Fréchet distance
              between the two sets' Gaussians
    fad-clap  the same on CLAP audio embeddings (one per clip)
    kl        PaSST label distributions of 20 s chunks of each pair (cut to the shorter clip);
              KL(reference ‖ generated) per chunk pair, averaged over all chunk pairs (audiocraft's `kld`)
    clap      cosine of each generated clip's CLAP audio embedding with its caption's, averaged over clips
    chroma    cosine of the argmax chromagrams (32 kHz, 2^14 window, hop 4096) frame by frame, averaged over
              all frames of all pairs

Embeddings go through the cache (cache.py); a clip that cannot be read, or is too short for a metric, is
listed in `skipped` with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from . import frechet
from .audio import convert_audio, fad_waveform, is_silent, read
from .cache import EmbeddingCache, file_hash
from .clips import Clip

METRICS = ("fad", "kl", "clap", "chroma", "fad-clap")
KL_EPS = 1e-6          # audiocraft's kl_divergence epsilon, added to the second distribution
PROTOCOL = 2           # the reports' and saved statistics' protocol: bump when a change alters any metric
# each embedder's cache entries: bump an embedder's when a change alters its embeddings, so that its old entries
# are not reused while the others' (PaSST's take minutes) still are
CACHE_VERSIONS = {"vggish": 2}   # 1 for any other


def cache_version(embedder) -> int:
    return CACHE_VERSIONS.get(embedder.name, 1)


@dataclass
class Report:
    values: dict = field(default_factory=dict)       # metric -> {"value": ..., "clips": ..., ...}
    per_clip: dict = field(default_factory=dict)     # clip key -> {column: value}
    skipped: list = field(default_factory=list)      # {"key", "set", "metric", "reason"}
    notes: list = field(default_factory=list)        # {"key", "set", "note"}: kept, but worth knowing
    stats: dict = field(default_factory=dict)        # embedder -> reference Gaussian (for --save-stats)

    def skip(self, clip: Clip, which: str, metric: str, reason: str) -> None:
        self.skipped.append({"key": clip.key, "set": which, "metric": metric, "reason": reason})

    def cell(self, key: str, column: str, value: float) -> None:
        self.per_clip.setdefault(key, {})[column] = value


class Runner:
    """Embeds clips with one embedder at a time, through the cache, in batches, with a progress bar."""

    def __init__(self, cache: EmbeddingCache, report: Report, batch: int = 16, progress: bool = True):
        self.cache, self.report, self.batch, self.progress = cache, report, batch, progress
        self._hashes: dict[str, str] = {}

    def content(self, clip: Clip, which: str) -> str:
        """The file's SHA-256 (its cache identity); a silent clip gets a note the first time it is seen, whether
        its embeddings come from the cache or not."""
        p = str(clip.path)
        if p not in self._hashes:
            self._hashes[p] = file_hash(clip.path)
            try:
                if is_silent(read(clip.path)[0]):
                    self.report.notes.append({"key": clip.key, "set": which, "note": "silent (kept)"})
            except ValueError:
                pass   # unreadable or empty: reported when the clip is embedded
        return self._hashes[p]

    def run(self, embedder, items: list[tuple[Clip, str, float | None]], protocol: str, prepare,
            metric: str) -> dict[str, np.ndarray]:
        """items: (clip, set name, seconds to cut to or None). prepare(mono at the embedder's rate) -> the
        list of inputs for the embedder. Returns {set/key: (n, D)} for the clips that could be embedded."""
        from tqdm import tqdm

        out: dict[str, np.ndarray] = {}
        todo = []
        for clip, which, cut in items:
            try:
                content = self.content(clip, which)
            except OSError as e:
                self.report.skip(clip, which, metric, f"cannot read: {e.strerror or e}")
                continue
            key = EmbeddingCache.key(content, embedder.name, {"weights": embedder.fingerprint, "protocol": protocol,
                                                              "cut": cut, "version": cache_version(embedder)})
            hit = self.cache.get(embedder.name, key)
            if hit is not None:
                out[f"{which}/{clip.key}"] = hit
            else:
                todo.append((clip, which, cut, key))
        bar = tqdm(total=len(todo), desc=f"{metric}: {embedder.name}", unit="clip",
                   disable=not self.progress or not todo)
        for start in range(0, len(todo), self.batch):
            group, inputs, counts = [], [], []
            for clip, which, cut, key in todo[start:start + self.batch]:
                try:
                    wav, sr = read(clip.path)
                except ValueError as e:
                    self.report.skip(clip, which, metric, str(e).replace(f"audio file {clip.path} ", "file "))
                    continue
                if cut is not None:
                    wav = wav[:, : max(1, round(cut * sr))]
                mono = convert_audio(wav, sr, embedder.sample_rate)
                if mono.numel() == 0:   # a few samples at a high rate can leave none at the embedder's
                    self.report.skip(clip, which, metric, f"too short: no sample left at {embedder.sample_rate} Hz")
                    continue
                parts = prepare(mono)
                group.append((clip, which, key))
                inputs += parts
                counts.append(len(parts))
            embedded = embedder.embed(inputs) if inputs else []
            at = 0
            for (clip, which, key), n in zip(group, counts):
                value = (np.concatenate(embedded[at:at + n]) if n else np.zeros((0, embedder.dim)))
                at += n
                self.cache.put(embedder.name, key, value.astype(np.float32))
                out[f"{which}/{clip.key}"] = value
            bar.update(len(todo[start:start + self.batch]))
        bar.close()
        return out

    def run_text(self, embedder, texts: list[str]) -> list[np.ndarray]:
        """Caption embeddings through the cache, keyed by the caption's text."""
        import hashlib

        keys = [EmbeddingCache.key(hashlib.sha256(t.encode()).hexdigest(), embedder.name,
                                   {"weights": embedder.fingerprint, "protocol": "text",
                                    "version": cache_version(embedder)})
                for t in texts]
        out = [self.cache.get(embedder.name, k) for k in keys]
        todo = [i for i, v in enumerate(out) if v is None]
        if todo:
            for i, e in zip(todo, embedder.embed_text([texts[i] for i in todo])):
                self.cache.put(embedder.name, keys[i], e)
                out[i] = e
        return out


def _cut_lengths(pairs: list[tuple[Clip, Clip]], report: Report, metric: str) -> list[tuple[Clip, Clip, float]]:
    """Each pair with the duration both are cut to: the shorter clip's (audiocraft passes one length)."""
    import soundfile as sf

    out = []
    for g, r in pairs:
        try:
            dg, dr = sf.info(str(g.path)).duration, sf.info(str(r.path)).duration
        except Exception as e:   # soundfile raises its own error types for unreadable files
            report.skip(g, "generated", metric, f"cannot read the pair: {e}")
            continue
        if min(dg, dr) <= 0:
            report.skip(g, "generated", metric, "empty clip in the pair")
            continue
        out.append((g, r, min(dg, dr)))
    return out


# -- the metrics -----------------------------------------------------------------------------------------------
def fad(runner: Runner, embedder, generated: list[Clip], reference: list[Clip] | None, report: Report,
        metric: str = "fad", reference_stats: frechet.Gaussian | None = None, per_clip: bool = False,
        fad_inf: bool = False) -> None:
    prepare = (lambda mono: [fad_waveform(mono)]) if embedder.name == "vggish" else (lambda mono: [mono])
    protocol = "fad-peak-pcm16" if embedder.name == "vggish" else "audio"
    items = [(c, "generated", None) for c in generated] + [(c, "reference", None) for c in (reference or [])
                                                           if reference_stats is None]
    emb = runner.run(embedder, items, protocol, prepare, metric)
    sets = {}
    for which, clips in (("generated", generated), ("reference", reference or [])):
        rows = []
        for c in clips:
            e = emb.get(f"{which}/{c.key}")
            if e is None:
                continue
            if e.shape[0] == 0:
                report.skip(c, which, metric, "too short for one embedding (VGGish needs 1 s)")
                continue
            rows.append((c, e))
        sets[which] = rows
    gen = np.concatenate([e for _, e in sets["generated"]]) if sets["generated"] else np.zeros((0, 1))
    if reference_stats is None:
        ref_rows = np.concatenate([e for _, e in sets["reference"]]) if sets["reference"] else np.zeros((0, 1))
        if ref_rows.shape[0] < 2:
            raise ValueError(f"{metric}: the reference set gives {ref_rows.shape[0]} embedding(s); 2 are needed")
        reference_stats = frechet.fit(ref_rows)
    report.stats[embedder.name] = reference_stats
    if gen.shape[0] < 2:
        raise ValueError(f"{metric}: the generated set gives {gen.shape[0]} embedding(s); 2 are needed")
    value = {"value": frechet.frechet_distance(frechet.fit(gen), reference_stats),
             "clips": len(sets["generated"]), "reference_clips": len(sets["reference"]) or None,
             "embeddings": int(gen.shape[0]), "reference_embeddings": reference_stats.count,
             "embedder": embedder.name}
    if fad_inf:
        inf = frechet.fad_inf(gen, reference_stats)
        value["fad_inf"] = {"value": inf.value, "slope": inf.slope, "r2": inf.r2, "points": inf.points}
    if per_clip:
        for c, e in sets["generated"]:
            if e.shape[0] >= 2:
                report.cell(c.key, metric, frechet.frechet_distance(frechet.fit(e), reference_stats))
    report.values[metric] = value


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = KL_EPS) -> np.ndarray:
    """Σ p (log p - log(q + eps)) over the last axis; p = 0 contributes 0 (torch's kl_div)."""
    p, q = p.astype(np.float64), q.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return (plogp - p * np.log(q + eps)).sum(-1)


def kl(runner: Runner, embedder, pairs: list[tuple[Clip, Clip]], report: Report) -> None:
    from .passt import chunks

    cut = _cut_lengths(pairs, report, "kl")
    items = [(g, "generated", d) for g, _, d in cut] + [(r, "reference", d) for _, r, d in cut]
    probs = runner.run(embedder, items, "chunks-20s-min-0.15s", chunks, "kl")
    ref_gen, gen_ref, n_pairs, n_chunks = 0.0, 0.0, 0, 0
    for g, r, _ in cut:
        pg, pr = probs.get(f"generated/{g.key}"), probs.get(f"reference/{r.key}")
        if pg is None or pr is None:
            continue
        n = min(len(pg), len(pr))
        if n == 0:
            report.skip(g, "generated", "kl", "pair shorter than PaSST's 0.15 s minimum")
            continue
        a, b = kl_divergence(pr[:n], pg[:n]), kl_divergence(pg[:n], pr[:n])
        ref_gen, gen_ref, n_pairs, n_chunks = ref_gen + a.sum(), gen_ref + b.sum(), n_pairs + 1, n_chunks + n
        report.cell(g.key, "kl", float(a.mean()))
    if n_chunks == 0:
        raise ValueError("kl: no pair of clips could be compared")
    report.values["kl"] = {"value": ref_gen / n_chunks, "kl_ref_gen": ref_gen / n_chunks,
                           "kl_gen_ref": gen_ref / n_chunks, "clips": n_pairs, "chunks": n_chunks}


def clap(runner: Runner, embedder, generated: list[Clip], report: Report) -> None:
    with_text = []
    for c in generated:
        if c.caption:
            with_text.append(c)
        else:
            report.skip(c, "generated", "clap", "no caption")
    if not with_text:
        raise ValueError("clap: no generated clip has a caption (pass --captions, or put clip.txt beside clips)")
    audio = runner.run(embedder, [(c, "generated", None) for c in with_text], "audio", lambda mono: [mono], "clap")
    kept = [c for c in with_text if f"generated/{c.key}" in audio]
    text = runner.run_text(embedder, [c.caption for c in kept])
    total = 0.0
    for c, t in zip(kept, text):
        a = audio[f"generated/{c.key}"][0].astype(np.float64)
        cos = float(a @ t / max(np.linalg.norm(a) * np.linalg.norm(t), 1e-8))
        report.cell(c.key, "clap", cos)
        total += cos
    if not kept:
        raise ValueError("clap: no captioned clip could be read")
    report.values["clap"] = {"value": total / len(kept), "clips": len(kept)}


def chroma_similarity(gen: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """Two mono clips at 32 kHz, same length -> (sum of per-frame cosines, frames): audiocraft's
    ChromaCosineSimilarityMetric counts ceil(samples / hop) frames of the melody conditioner's chromagram."""
    from ..chroma import chromagram
    from ..config import MelodyConfig

    cfg = MelodyConfig()
    frames = math.ceil(gen.shape[-1] / cfg.hop_length)
    a, b = chromagram(gen[None], cfg)[0, :frames], chromagram(ref[None], cfg)[0, :frames]   # (T, 12)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-8)
    return float(cos.sum()), int(cos.shape[0])


def chroma(pairs: list[tuple[Clip, Clip]], report: Report, progress: bool = True) -> None:
    from tqdm import tqdm

    from ..chroma import CHROMA_SAMPLE_RATE

    total, frames, n_pairs = 0.0, 0, 0
    for g, r, d in tqdm(_cut_lengths(pairs, report, "chroma"), desc="chroma", unit="pair", disable=not progress):
        try:
            (wg, sg), (wr, sr) = read(g.path), read(r.path)
        except ValueError as e:
            report.skip(g, "generated", "chroma", str(e))
            continue
        xg = convert_audio(wg[:, : round(d * sg)], sg, CHROMA_SAMPLE_RATE)
        xr = convert_audio(wr[:, : round(d * sr)], sr, CHROMA_SAMPLE_RATE)
        n = min(xg.shape[-1], xr.shape[-1])
        s, t = chroma_similarity(xg[:n], xr[:n]) if n else (0.0, 0)
        if t == 0:
            report.skip(g, "generated", "chroma", "pair too short for one chroma frame")
            continue
        total, frames, n_pairs = total + s, frames + t, n_pairs + 1
        report.cell(g.key, "chroma", s / t)
    if frames == 0:
        raise ValueError("chroma: no pair of clips could be compared")
    report.values["chroma"] = {"value": total / frames, "clips": n_pairs, "frames": frames}
