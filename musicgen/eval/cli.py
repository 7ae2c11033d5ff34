"""`musicgen eval`: score generated clips against references, or generate them first.

    musicgen eval gen/ --reference ref/ --captions captions.csv                  FAD, KL, CLAP score
    musicgen eval gen/ --reference ref/ --metrics chroma                         melody similarity
    musicgen eval gen/ --reference-stats musiccaps.npz --metrics fad             FAD against saved statistics
    musicgen eval --generate --model facebook/musicgen-small --captions musiccaps.csv --reference ref/ -o out/
                                                                                 the model card's protocol

Importing this module imports nothing heavy: `musicgen --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser("eval", help="quality metrics of generated audio: FAD, KL, CLAP score, chroma")
    e.add_argument("generated", nargs="?", type=Path, help="folder of generated audio, or a .jsonl manifest")
    e.add_argument("--reference", type=Path, help="folder or .jsonl of reference audio (paired by relative path)")
    e.add_argument("--captions", type=Path, help="CSV or jsonl with 'caption' and 'path' or 'ytid' (MusicCaps' CSV)")
    e.add_argument("--metrics", default=None,
                   help="comma-separated: fad, kl, clap, chroma, fad-clap (default fad,kl,clap; "
                        "--generate with a melody model adds chroma)")
    e.add_argument("--weights", type=Path, help="folder with the embedders' weight files under their official names "
                                                "(default: downloaded once into ~/.cache/musicgen/eval)")
    e.add_argument("--json", type=Path, help="JSON report; per-clip CSV and SVG plot are written beside it")
    e.add_argument("--save-stats", type=Path, help="save the reference set's FAD statistics (.npz) for reuse")
    e.add_argument("--reference-stats", type=Path, help="FAD against statistics saved with --save-stats")
    e.add_argument("--fad-inf", action="store_true", help="also FAD-inf (fadtk's extrapolation over sample sizes)")
    e.add_argument("--per-clip-fad", action="store_true", help="FAD of each generated clip against the reference")
    e.add_argument("--cache", type=Path, default=None, help="embedding cache folder (default in ~/.cache/musicgen)")
    e.add_argument("--no-cache", action="store_true", help="embed everything again, remember nothing")
    e.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    e.add_argument("-f", "--force", action="store_true", help="overwrite existing report files")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    g = e.add_argument_group("generation (--generate)")
    g.add_argument("--generate", action="store_true", help="generate one clip per caption first, then evaluate")
    g.add_argument("--model", default="facebook/musicgen-small", help="hub id or local checkpoint folder")
    g.add_argument("-o", "--output", type=Path, help="folder for the generated clips and the report")
    g.add_argument("--limit", type=int, default=None, help="only the first N captions (a quick run)")
    g.add_argument("--batch-size", type=int, default=8, help="clips generated together (default 8)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first batch (batch i: seed + its first index)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--quantize", choices=("int8", "int4"), default=None)
    return e


def _metrics(args) -> list[str]:
    from .metrics import METRICS

    if args.metrics is None:
        return ["fad", "kl", "clap"]
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    for m in names:
        if m not in METRICS:
            raise ValueError(f"unknown metric {m!r}: choose from {', '.join(METRICS)}")
    if not names:
        raise ValueError("--metrics names no metric")
    return list(dict.fromkeys(names))


def cmd_eval(args) -> int:
    metrics = _metrics(args)
    if args.generate:
        if args.generated is not None:
            raise ValueError("--generate writes the clips into -o OUT; give no GENERATED folder")
        if args.output is None or args.captions is None or args.reference is None:
            raise ValueError("--generate needs --captions, --reference and -o OUT")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    elif args.generated is None:
        raise ValueError("give the GENERATED folder (or --generate)")
    if args.reference is None and args.reference_stats is None:
        raise ValueError("give --reference (or --reference-stats for FAD alone)")
    if args.save_stats is not None and args.reference is None:
        raise ValueError("--save-stats needs --reference")
    json_path = args.json or (args.output / "report.json" if args.generate else None)
    if json_path is not None:
        if not args.generate and not json_path.parent.is_dir():
            raise ValueError(f"folder {json_path.parent} of the report does not exist")
        for p in (json_path, json_path.with_suffix(".csv"), json_path.with_suffix(".svg")):
            if p.exists() and not args.force:
                raise ValueError(f"{p} exists; pass --force to overwrite")
    for p in (args.reference, args.reference_stats, args.captions, args.generated, args.weights):
        if p is not None and not p.exists():
            raise ValueError(f"{p} does not exist")

    from ..inputs import resolve_device

    args.device = resolve_device(args.device)
    from . import evaluate, frechet, report as report_mod

    progress = not args.quiet
    extra = {}
    generated = args.generated
    if args.generate:
        generated, extra = _generate(args, progress)
        if extra.pop("melody") and "chroma" not in metrics:
            metrics.append("chroma")
    cache = False if args.no_cache else (args.cache or True)
    report, settings = evaluate(generated, args.reference, args.captions, metrics, args.weights, args.device, cache,
                                args.reference_stats, args.fad_inf, args.per_clip_fad, progress)
    settings.update(extra)
    print(report_mod.table(report))
    for item in report.skipped[:10]:
        print(f"skipped ({item['metric']}): {item['set']} {item['key']}: {item['reason']}", file=sys.stderr)
    if len(report.skipped) > 10:
        print(f"... and {len(report.skipped) - 10} more skipped (see the JSON report)", file=sys.stderr)
    if args.save_stats is not None:
        frechet.save_stats(args.save_stats, report.stats, {"embedders": settings["embedders"],
                                                           "protocol": settings["protocol"]})
        print(f"reference statistics: {args.save_stats}")
    if json_path is not None:
        for p in report_mod.write(report, settings, json_path):
            print(p)
    return 0


def _generate(args, progress) -> tuple[Path, dict]:
    """Generate the clips missing in args.output -> (a manifest of the clips, settings for the report)."""
    import musicgen

    from . import clips, generate, report as report_mod

    captions = clips.read_captions(args.captions)
    reference = clips.list_clips(args.reference)
    args.output.mkdir(parents=True, exist_ok=True)
    items, done, missing = generate.plan(captions, reference, args.output, args.limit)
    if missing:
        print(f"{len(missing)} caption(s) have no reference clip and are not generated (e.g. {missing[0]})",
              file=sys.stderr)
    if not items:
        raise ValueError("no caption has a reference clip with the same name")
    if done:
        print(f"{len(done)} clip(s) already in {args.output}: kept", file=sys.stderr)
    device = args.device
    model = musicgen.load(args.model, device=device, dtype=args.dtype,
                          quantize=args.quantize)
    if len(done) < len(items):
        generate.run(model, items, args.output, args.batch_size, args.seed, progress)
    keys = [(t[1], t[2]) for t in items]
    manifest = args.output / "generated.jsonl"
    report_mod.atomic_write(manifest, "".join(json.dumps({"path": f"{k}.wav", "caption": c}) + "\n" for k, c in keys))
    return manifest, {"melody": model.cfg.melody is not None,
                      "generation": {"model": str(args.model), "top_k": generate.TOP_K,
                                     "guidance_scale": generate.GUIDANCE, "seed": args.seed,
                                     "batch_size": args.batch_size, "dtype": args.dtype, "quantize": args.quantize,
                                     "limit": args.limit, "clips": len(keys)}}
