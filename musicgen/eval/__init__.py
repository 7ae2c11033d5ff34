"""Quality evaluation as the MusicGen model card reports it: FAD (VGGish), KL (PaSST), CLAP score, chroma.

    from musicgen.eval import evaluate
    report, settings = evaluate("generated/", "musiccaps/", captions="musiccaps.csv")
    print(report.values["fad"]["value"])

    frechet.py   the Fréchet distance, FAD∞, saved reference statistics
    audio.py     audiocraft's convert_audio; FAD's 16-bit files as Google's FAD code normalises them
    vggish.py    VGGish (port of torchvggish)        passt.py  PaSST (port of hear21passt's 20 s model)
    htsat.py     HTS-AT, CLAP's audio tower          clap.py   LAION-CLAP: text tower, projections, tokenizer
    clips.py     sets, pairing, captions             cache.py  embeddings cached per clip
    metrics.py   the metrics themselves              report.py table, JSON, CSV, SVG
    generate.py  one clip per caption (the model card's settings)
    cli.py       `musicgen eval`

docs/evaluation.md writes down every protocol choice. Nothing here is imported by `import musicgen`.
"""
from __future__ import annotations

import os

DEFAULT_METRICS = ("fad", "kl", "clap")
EMBEDDERS = {"fad": "vggish", "fad-clap": "clap", "kl": "passt", "clap": "clap", "chroma": None}


def load_embedder(name: str, weights_dir=None, device: str = "cpu", progress: bool = True):
    """'vggish' | 'passt' | 'clap' with the released weights (from weights_dir, or the download cache)."""
    from . import clap, passt, vggish, weights

    if name == "vggish":
        path = weights.resolve(vggish.WEIGHTS, weights_dir, progress)
        return vggish.load(path, device, weights.sha256(path))
    if name == "passt":
        path = weights.resolve(passt.WEIGHTS, weights_dir, progress)
        return passt.load(path, device, weights.sha256(path))
    if name == "clap":
        path = weights.resolve(clap.WEIGHTS, weights_dir, progress)
        text = [weights.resolve(f"{clap.TEXT_FOLDER}/{f}", weights_dir, progress) for f in clap.TEXT_FILES]
        return clap.load(path, text[0].parent, device, weights.sha256(path))
    raise ValueError(f"unknown embedder {name!r}")


def evaluate(generated, reference=None, captions=None, metrics=DEFAULT_METRICS, weights_dir=None, device=None,
             cache_dir: str | os.PathLike | None | bool = True, reference_stats=None, fad_inf: bool = False,
             per_clip_fad: bool = False, progress: bool = True, embedders: dict | None = None):
    """Evaluate a set of generated clips (folder or .jsonl) against a reference set -> (Report, settings).

    captions: a CSV / jsonl file, a {key: caption} dict, or None (manifests and sidecar files are used).
    reference_stats: a path written with save_stats, or {embedder: Gaussian}; FAD then needs no reference.
    cache_dir: a folder, True for the default cache, None/False for none. embedders: ready-made embedders
    by name ('vggish', 'passt', 'clap') instead of the released weights (the tests use random ones)."""
    import torch

    from . import clips as clips_mod, frechet, metrics as m, weights
    from ..inputs import resolve_device
    from .cache import EmbeddingCache

    unknown = [x for x in metrics if x not in m.METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}: choose from {', '.join(m.METRICS)}")
    device = resolve_device(device)
    gen = clips_mod.list_clips(generated)
    ref = clips_mod.list_clips(reference) if reference is not None else None
    stats, stats_settings = ({}, None)
    if isinstance(reference_stats, (str, os.PathLike)):
        stats, stats_settings = frechet.load_stats(reference_stats)
    elif reference_stats:
        stats = dict(reference_stats)
    needs_ref = [x for x in metrics if x in ("kl", "chroma") or (x.startswith("fad") and EMBEDDERS[x] not in stats)]
    if ref is None and needs_ref:
        raise ValueError(f"{needs_ref[0]} needs --reference (or --reference-stats for FAD)")
    if "clap" in metrics:
        if isinstance(captions, (str, os.PathLike)):
            captions = clips_mod.read_captions(captions)
        clips_mod.attach_captions(gen, ref or [], captions)
    if cache_dir is True:
        cache_dir = weights.cache_dir() / "embeddings"
    cache = EmbeddingCache(cache_dir or None)
    report = m.Report()
    runner = m.Runner(cache, report, progress=progress)
    pairs, only_gen, only_ref = clips_mod.pair(gen, ref) if ref is not None else ([], [], [])
    if ref is not None and not pairs and any(x in metrics for x in ("kl", "chroma")):
        raise ValueError("no generated clip has a reference clip of the same relative path (KL and chroma pair them)")
    for c in only_gen if any(x in metrics for x in ("kl", "chroma")) else []:
        report.skip(c, "generated", "kl/chroma", "no reference clip with this relative path")
    for c in only_ref if any(x in metrics for x in ("kl", "chroma")) else []:
        report.skip(c, "reference", "kl/chroma", "no generated clip with this relative path")
    loaded = dict(embedders or {})

    def embedder(name):
        if name not in loaded:
            loaded[name] = load_embedder(name, weights_dir, device, progress)
        return loaded[name]

    with torch.inference_mode():
        for metric in metrics:
            if metric in ("fad", "fad-clap"):
                e = embedder(EMBEDDERS[metric])
                _check_stats(stats_settings, e, m.PROTOCOL, reference_stats)
                m.fad(runner, e, gen, ref, report, metric, stats.get(e.name), per_clip_fad, fad_inf)
            elif metric == "kl":
                m.kl(runner, embedder("passt"), pairs, report)
            elif metric == "clap":
                m.clap(runner, embedder("clap"), gen, report)
            elif metric == "chroma":
                m.chroma(pairs, report, progress)
    settings = {
        "metrics": list(metrics), "generated": str(generated),
        "reference": None if reference is None else str(reference),
        "reference_stats": None if not isinstance(reference_stats, (str, os.PathLike)) else str(reference_stats),
        "reference_stats_settings": stats_settings, "device": device,
        "embedders": {n: e.fingerprint for n, e in loaded.items()},
        "cache": {"folder": None if cache.folder is None else str(cache.folder), "hits": cache.hits,
                  "misses": cache.misses},
        "versions": _versions(), "protocol": m.PROTOCOL,
    }
    return report, settings


def _check_stats(saved: dict | None, embedder, protocol: int, path) -> None:
    """Saved reference statistics must come from the same weights and protocol as the generated set's."""
    if not saved or embedder.name not in saved.get("embedders", {}):
        return
    if saved["embedders"][embedder.name] != embedder.fingerprint or saved.get("protocol") != protocol:
        raise ValueError(f"{path} was computed with other {embedder.name} weights or protocol "
                         f"({saved['embedders'][embedder.name][:12]}…, protocol {saved.get('protocol')}); "
                         f"compute it again with --save-stats")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("musicgen", "torch", "numpy", "julius", "scipy", "tokenizers", "soundfile"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


__all__ = ["evaluate", "load_embedder", "DEFAULT_METRICS"]
