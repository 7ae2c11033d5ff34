"""The model card's protocol in one step: one clip per caption, as long as the caption's reference clip, with
top-k 250 and guidance 3 (audiocraft's evaluation grid), written as OUT/<key>.wav.

Resumable: a clip already in OUT is kept (files are written atomically, so one that exists is whole). Captions
of equal duration are generated together in batches; batch i is seeded with seed + its first caption's index.
Generated clips are stored with the loudness strategy (-14 LUFS), as audiocraft normalises generated audio
before its metrics.
"""
from __future__ import annotations

from pathlib import Path

from .clips import Clip

TOP_K, GUIDANCE = 250, 3.0


def plan(captions: dict[str, str], reference: list[Clip], out: Path, limit: int | None) -> tuple[list, list, list]:
    """-> (todo [(index, key, caption, ref clip, seconds)], done [(key, caption)], captions without a reference)."""
    import soundfile as sf

    refs = {c.key: c for c in reference}
    by_name = {Path(c.key).name: c for c in reference}
    todo, done, missing = [], [], []
    for i, (key, caption) in enumerate(captions.items()):
        ref = refs.get(key) or by_name.get(Path(key).name)
        if ref is None:
            missing.append(key)
            continue
        if limit is not None and len(todo) + len(done) >= limit:
            break
        if (out / f"{ref.key}.wav").is_file():
            done.append((ref.key, caption))
            continue
        try:
            seconds = sf.info(str(ref.path)).duration
        except Exception as e:   # soundfile's own error types
            raise ValueError(f"cannot read reference clip {ref.path}: {e}") from None
        todo.append((i, ref.key, caption, ref, seconds))
    return todo, done, missing


def run(model, todo: list, out: Path, batch_size: int = 8, seed: int = 0, progress: bool = True) -> None:
    from tqdm import tqdm

    from ..audio import load_audio, save_audio

    by_duration: dict[float, list] = {}
    for item in todo:
        by_duration.setdefault(round(item[4], 3), []).append(item)
    bar = tqdm(total=len(todo), desc="generate", unit="clip", disable=not progress)
    for seconds, items in by_duration.items():
        for s in range(0, len(items), batch_size):
            batch = items[s:s + batch_size]
            extra = {}
            if model.cfg.melody is not None:   # melody checkpoints are conditioned on the reference's chroma
                extra = dict(melody=[load_audio(it[3].path, sample_rate=model.sample_rate)[0] for it in batch],
                             melody_sample_rate=model.sample_rate)
            audio = model.generate([it[2] for it in batch], duration=seconds, top_k=TOP_K,
                                   guidance_scale=GUIDANCE, seed=seed + batch[0][0], **extra)
            for it, wav in zip(batch, audio):
                path = out / f"{it[1]}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_audio(path, wav, model.sample_rate, strategy="loudness")
            bar.update(len(batch))
    bar.close()
