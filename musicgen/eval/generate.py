"""The model card's protocol in one step: one clip per caption, as long as the caption's reference clip, with
top-k 250 and guidance 3 (audiocraft's evaluation grid), written as OUT/<key>.wav.

Captions of equal duration are generated together in batches; a batch is seeded with seed + its first
caption's index. Resumable: a clip already in OUT is kept (files are written atomically, so one that exists is
whole). Batches are formed over every caption, done or not, so a resumed run makes the clips that an
uninterrupted one makes: a batch with a clip missing is generated whole again, and only the missing ones are
written.
Generated clips are stored with the loudness strategy (-14 LUFS), as audiocraft normalises generated audio
before its metrics.
"""
from __future__ import annotations

from pathlib import Path

from .clips import Clip

TOP_K, GUIDANCE = 250, 3.0


def plan(captions: dict[str, str], reference: list[Clip], out: Path, limit: int | None) -> tuple[list, list, list]:
    """-> (items [(index, key, caption, ref clip, seconds)] for every caption with a reference clip, up to
    `limit`; done [(key, caption)]: those whose clip is already in `out`; captions without a reference)."""
    import soundfile as sf

    refs = {c.key: c for c in reference}
    by_name = {Path(c.key).name: c for c in reference}
    items, done, missing = [], [], []
    for i, (key, caption) in enumerate(captions.items()):
        ref = refs.get(key) or by_name.get(Path(key).name)
        if ref is None:
            missing.append(key)
            continue
        if limit is not None and len(items) >= limit:
            break
        try:
            seconds = sf.info(str(ref.path)).duration
        except Exception as e:   # soundfile's own error types
            raise ValueError(f"cannot read reference clip {ref.path}: {e}") from None
        items.append((i, ref.key, caption, ref, seconds))
        if (out / f"{ref.key}.wav").is_file():
            done.append((ref.key, caption))
    return items, done, missing


def batches(items: list, batch_size: int) -> list[list]:
    """`plan`'s items in generation batches: captions of the same duration (to the millisecond) in caption
    order, `batch_size` at a time."""
    by_duration: dict[float, list] = {}
    for item in items:
        by_duration.setdefault(round(item[4], 3), []).append(item)
    return [group[s:s + batch_size] for group in by_duration.values() for s in range(0, len(group), batch_size)]


def run(model, items: list, out: Path, batch_size: int = 8, seed: int = 0, progress: bool = True) -> None:
    """Generate the clips of `items` (from `plan`) that are not in `out` yet."""
    from tqdm import tqdm

    from ..audio import load_audio, save_audio

    missing = {it[1] for it in items if not (out / f"{it[1]}.wav").is_file()}
    bar = tqdm(total=len(missing), desc="generate", unit="clip", disable=not progress)
    for batch in batches(items, batch_size):
        if not any(it[1] in missing for it in batch):
            continue
        extra = {}
        if model.cfg.melody is not None:   # melody checkpoints are conditioned on the reference's chroma
            extra = dict(melody=[load_audio(it[3].path, sample_rate=model.sample_rate)[0] for it in batch],
                         melody_sample_rate=model.sample_rate)
        audio = model.generate([it[2] for it in batch], duration=batch[0][4], top_k=TOP_K,
                               guidance_scale=GUIDANCE, seed=seed + batch[0][0], **extra)
        for it, wav in zip(batch, audio):
            if it[1] in missing:
                path = out / f"{it[1]}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_audio(path, wav, model.sample_rate, strategy="loudness")
                bar.update(1)
    bar.close()
