"""Evaluation speed on this machine: clips per second for each metric, with the embedders at their real shapes
(random weights: the released ones cannot be downloaded here, and the speed does not depend on them).

    python benchmarks/eval_speed.py                 # 16 generated + 16 reference clips of 10 s
    python benchmarks/eval_speed.py --clips 100     # the issue's target: 100 clips of 10 s, four metrics

Three runs of `musicgen.eval.evaluate` per metric:
    cold       empty cache: both sets embedded (a first evaluation against a new reference set)
    new gen    the reference set already in the cache, a new generated set (evaluating one more model)
    warm       everything cached (a re-run)
and, where a package offers the same computation, that package: fadtk and frechet-audio-distance both embed
with torch.hub's torchvggish `VGGish.forward(audio, 16000)`, one clip at a time: numpy features
(`waveform_to_examples`), then the VGG; they do not install next
to torch 2.13's CPU wheel (torchaudio), so torchvggish's forward is timed directly. Neither offers PaSST's
KL; frechet-audio-distance's CLAP score runs laion_clap, which does not install here either (numpy < 2).
Rates count generated clips: a cold run also embeds as many reference clips. Beside wall time the table gives
the process's CPU time: on a shared machine the wall time depends on the other work, and CPU time / threads is
what the run would take with the cores to itself.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import eval_support as es  # noqa: E402  (tiny tokenizer and test signals)

from musicgen.eval import evaluate  # noqa: E402


def real_shape_embedders(folder: Path) -> dict:
    from musicgen.eval.clap import CLAP, ClapEmbedder, RobertaConfig, Tokenizer
    from musicgen.eval.passt import PaSST, PasstEmbedder
    from musicgen.eval.vggish import VGGish, VGGishEmbedder

    tiny = es.clap_embedder(folder / "bpe")   # only for its tokenizer files
    torch.manual_seed(0)
    return {"vggish": VGGishEmbedder(VGGish(), "bench"), "passt": PasstEmbedder(PaSST(), "bench"),
            "clap": ClapEmbedder(CLAP(text=RobertaConfig()), Tokenizer(folder / "bpe"), "bench"), "_tiny": tiny}


def make(folder: Path, n: int, seconds: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        freq = float(rng.uniform(110, 880))
        es.write(folder, f"clip{i:03d}.wav", es.tone(seconds, 32000, freq, 0.05, seed * 1000 + i))
    (folder / "captions.csv").write_text("ytid,caption\n" + "".join(f"clip{i:03d},lofi hip hop beat with piano {i}\n"
                                                                      for i in range(n)))


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all the process's threads)."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--metrics", default="fad,kl,clap,chroma")
    args = ap.parse_args()
    metrics = args.metrics.split(",")
    work = Path(tempfile.mkdtemp(prefix="eval_speed."))
    make(work / "ref", args.clips, args.seconds, 1)
    make(work / "gen", args.clips, args.seconds, 2)
    make(work / "gen2", args.clips, args.seconds, 3)
    emb = real_shape_embedders(work)
    del emb["_tiny"]
    rows = []
    for metric in metrics:
        cache = work / f"cache-{metric}"

        def run(gen, m=metric, c=cache):
            evaluate(work / gen, work / "ref", work / gen / "captions.csv", [m], cache_dir=c, embedders=emb,
                     progress=False, device="cpu")
        cold = timed(lambda: run("gen"))
        new = timed(lambda: run("gen2"))
        warm = timed(lambda: run("gen2"))
        rows.append((metric, cold, new, warm))
        print(f"{metric}: cold {cold[0]:.1f} s, new gen {new[0]:.1f} s, warm {warm[0]:.2f} s", file=sys.stderr,
              flush=True)

    # the packages' way to the same VGGish embeddings: torchvggish's forward, one clip at a time
    ref_rate = None
    try:
        from torchvggish import torchvggish as tv, vggish_input

        model = tv.VGG(tv.make_layers(), postprocess=False).eval()
        model.embeddings = torch.nn.Sequential(*list(model.embeddings.children())[:-1])   # as fadtk does
        model.load_state_dict(emb["vggish"].model.state_dict())
        clips = [sf.read(str(p), dtype="float32")[0] for p in sorted((work / "gen").glob("*.wav"))]
        from musicgen.eval.audio import convert_audio
        mono = [convert_audio(torch.from_numpy(c)[None], 32000, 16000).numpy().astype(np.float64) for c in clips]
        with torch.inference_mode():
            theirs = timed(lambda: [model(vggish_input.waveform_to_examples(x, 16000).detach()) for x in mono])
            ours = timed(lambda: emb["vggish"].embed([torch.from_numpy(x) for x in mono]))
        ref_rate = (args.clips / theirs[0], args.clips / ours[0], args.clips / theirs[1], args.clips / ours[1])
    except ImportError:
        pass

    n, threads = args.clips, torch.get_num_threads()
    rows.append(("all", *(tuple(sum(r[i][j] for r in rows) for j in (0, 1)) for i in (1, 2, 3))))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nmusicgen eval speed: {n} generated + {n} reference clips of {args.seconds:g} s, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (load average {load:.1f}), "
          f"torch {torch.__version__} ({threads} threads), float32, random weights at the released shapes\n")
    print(f"{'metric':<7} {'cold wall s':>11} {'CPU s':>7} {'clips/s':>8}   {'new gen wall s':>14} {'CPU s':>7} "
          f"{'clips/s':>8}   {'warm wall s':>11} {'clips/s':>8}")
    for metric, cold, new, warm in rows:
        print(f"{metric:<7} {cold[0]:>11.1f} {cold[1]:>7.1f} {n / cold[0]:>8.3f}   {new[0]:>14.1f} {new[1]:>7.1f} "
              f"{n / new[0]:>8.3f}   {warm[0]:>11.2f} {n / warm[0]:>8.1f}")
    _, cold, new, _ = rows[-1]
    for name, (wall, cpu) in (("cold", cold), ("new gen", new)):
        print(f"100 clips, {'+'.join(metrics)}, {name}: {wall / n * 100 / 60:.1f} min measured; with the {threads} "
              f"cores to itself {cpu / threads / n * 100 / 60:.1f} to {cpu / n * 100 / 60:.1f} min (CPU time / "
              f"threads to CPU time; target < 10 min)")
    if ref_rate is not None:
        print(f"\nVGGish embedding alone, {n} clips at 16 kHz, clips/s (wall, and per CPU second):\n"
              f"  torchvggish's forward, one clip at a time (fadtk's and frechet-audio-distance's call)  "
              f"{ref_rate[0]:.2f}  ({ref_rate[2]:.2f})\n"
              f"  musicgen.eval                                                                            "
              f"{ref_rate[1]:.2f}  ({ref_rate[3]:.2f})")


if __name__ == "__main__":
    main()
