"""Command line: `musicgen generate "80s pop track with bassy drums and synth" --duration 8 -o pop.wav`.

A thin layer over the Python API. Every bad input is caught before the model loads where it can be, and
ends the program with one line on stderr and exit status 2; nothing is overwritten without --force.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

FORMATS = ("wav", "flac", "mp3", "ogg")
STRATEGIES = ("loudness", "peak", "clip", "none")


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we promise one line
        raise UsageError(message)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="musicgen", description="MusicGen text-to-music, fast and faithful.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate music from text prompts")
    g.add_argument("prompts", nargs="*", help="one or more text descriptions")
    g.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    g.add_argument("--model", default="facebook/musicgen-small",
                   help="hub id (facebook/musicgen-small, -medium, -large) or a local checkpoint folder")
    g.add_argument("-d", "--duration", type=_positive_float, default=8.0, help="seconds of audio (default 8)")
    g.add_argument("--seed", type=int, default=None, help="random seed for a reproducible run")
    g.add_argument("--top-k", type=int, default=250, help="sample among the k most likely codes (0: off)")
    g.add_argument("--top-p", type=_positive_float, default=0.0, help="nucleus sampling mass (0: off; wins over top-k)")
    g.add_argument("--temperature", type=_positive_float, default=1.0, help="softmax temperature (0: greedy)")
    g.add_argument("--guidance-scale", "--cfg", type=_positive_float, default=3.0, help="classifier-free guidance")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument("-o", "--output", type=Path, default=Path("musicgen.wav"),
                   help="output file; several prompts give numbered files (out_0.wav, out_1.wav, ...)")
    g.add_argument("--format", choices=FORMATS, default=None, help="audio format (default: from the file suffix)")
    g.add_argument("--strategy", choices=STRATEGIES, default="loudness",
                   help="level normalisation: loudness (-14 LUFS), peak, clip or none")
    g.add_argument("-f", "--force", action="store_true", help="overwrite existing files")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("--stream", action="store_true",
                   help="write 16-bit WAV while it is generated, about a second at a time (-o - : to stdout, "
                        "e.g. | aplay); the level is left as generated (clipped), not normalised")
    s = sub.add_parser("serve", help="HTTP service with continuous batching, streaming and a web page")
    s.add_argument("--model", default="facebook/musicgen-small", help="hub id or a local checkpoint folder")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--data-dir", type=Path, default=Path("musicgen-data"),
                   help="job database and result files (default ./musicgen-data); survives restarts")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    s.add_argument("--max-queue", type=int, default=32, help="waiting jobs before answering 429 (default 32)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $MUSICGEN_API_KEY, else none)")
    s.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    s.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    return parser


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read prompts file {args.prompts_file}: {e}") from None
        prompts += [line.strip() for line in lines if line.strip()]
        if not lines or not any(line.strip() for line in lines):
            raise UsageError(f"prompts file {args.prompts_file} has no prompts")
    if not prompts:
        raise UsageError("give at least one prompt (or --prompts-file)")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise UsageError(f"prompt {i + 1} is empty")
    return prompts


def _output_paths(args, count: int) -> list[Path]:
    out: Path = args.output
    fmt = (args.format or out.suffix.lstrip(".") or "wav").lower()
    if fmt not in FORMATS:
        raise UsageError(f"unknown output format {fmt!r} (from {out}): choose one of {', '.join(FORMATS)}")
    if out.suffix.lower() != "." + fmt:
        out = out.with_suffix("." + fmt)
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output folder {parent} is not writable")
    for p in paths:
        if p.is_dir():
            raise UsageError(f"output {p} is a folder")
        if p.exists() and not args.force:
            raise UsageError(f"{p} exists; pass --force to overwrite")
    return paths


def _validate_sampling(args) -> None:
    from .model import MAX_DURATION

    if args.duration <= 0:
        raise UsageError(f"--duration must be positive, got {args.duration:g}")
    if args.duration > MAX_DURATION:
        raise UsageError(f"--duration {args.duration:g} is longer than the model's {MAX_DURATION:g} s context")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0.0 <= args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in [0, 1], got {args.top_p:g}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature:g}")
    if args.guidance_scale < 0:
        raise UsageError(f"--guidance-scale must be >= 0, got {args.guidance_scale:g}")


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but no CUDA device is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name!r} asked for, but MPS is not available")
    return name


def cmd_generate(args) -> int:
    prompts = _read_prompts(args)
    _validate_sampling(args)
    paths = _output_paths(args, len(prompts))
    if args.stream:   # checked before the model loads
        if any(p.suffix.lower() != ".wav" for p in paths) and str(args.output) != "-":
            raise UsageError("--stream writes WAV only; use a .wav output (or -o - for stdout)")
        if str(args.output) == "-" and len(prompts) > 1:
            raise UsageError("--stream to stdout takes one prompt")
    device = _device(args.device)

    import musicgen

    model = musicgen.load(args.model, device=device, dtype=args.dtype)
    if args.stream:
        return _generate_streaming(model, prompts, paths, args)
    audio = model.generate(prompts, duration=args.duration, top_k=args.top_k, top_p=args.top_p,
                           temperature=args.temperature, guidance_scale=args.guidance_scale, seed=args.seed,
                           progress=not args.quiet)
    for path, wav in zip(paths, audio):
        musicgen.save_audio(path, wav, model.sample_rate, strategy=args.strategy, format=args.format)
        print(path)
    return 0


def _generate_streaming(model, prompts, paths, args) -> int:
    from .service import pcm16, wav_header

    to_stdout = str(args.output) == "-"
    outs = [sys.stdout.buffer] if to_stdout else [open(p, "wb") for p in paths]
    header = wav_header(model.sample_rate, model.audio_channels)
    for f in outs:
        f.write(header)
    written = 0
    chunks = model.stream(prompts, duration=args.duration, chunk_seconds=1.0, top_k=args.top_k, top_p=args.top_p,
                          temperature=args.temperature, guidance_scale=args.guidance_scale, seed=args.seed)
    for chunk in chunks:                                  # (B, channels, samples)
        for f, wav in zip(outs, chunk):
            f.write(pcm16(wav))
            f.flush()
        written += chunk.shape[-1]
        if not args.quiet:
            print(f"\rstreamed {written / model.sample_rate:.1f} s", end="", file=sys.stderr, flush=True)
    if not args.quiet:
        print(file=sys.stderr)
    if not to_stdout:
        for f, path in zip(outs, paths):                  # now the length is known: fix the header's sizes
            data = written * model.audio_channels * 2
            f.seek(4)
            f.write((36 + data).to_bytes(4, "little"))
            f.seek(40)
            f.write(data.to_bytes(4, "little"))
            f.close()
            print(path)
    return 0


def cmd_serve(args) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch < 1 or args.max_queue < 1:
        raise UsageError("--max-batch and --max-queue must be at least 1")
    try:
        import uvicorn

        from .service import Service, create_app
    except ImportError as e:
        raise UsageError(f"the service needs its extra: pip install 'musicgen[serve]' ({e.name} is missing)") from None
    import musicgen

    device = _device(args.device)
    model = musicgen.load(args.model, device=device, dtype=args.dtype)
    service = Service(model, args.data_dir, model_name=str(args.model), max_batch=args.max_batch,
                      max_queue=args.max_queue, api_key=args.api_key or os.environ.get("MUSICGEN_API_KEY"))
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    try:
        args = build_parser().parse_args(argv)
        return {"generate": cmd_generate, "serve": cmd_serve}[args.command](args)
    except (UsageError, CheckpointError, ValueError, FileExistsError) as e:
        print(f"musicgen: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"musicgen: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("musicgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
