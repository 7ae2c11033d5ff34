"""Command line: `musicgen generate "80s pop track with bassy drums and synth" --duration 8 -o pop.wav`.

    musicgen generate "lofi" --melody tune.wav --model facebook/musicgen-melody   melody conditioning
    musicgen generate "lofi" --continue intro.wav -d 20                           continuation (output starts
                                                                                  with intro.wav)
    musicgen generate --unconditional --batch-size 4 -d 10                        no text
    musicgen generate "ambient" -d 120                                            long-form (window slides 18 s)
    musicgen convert SRC DST                                                      Hugging Face <-> audiocraft
    musicgen eval gen/ --reference ref/ --captions caps.csv                       FAD, KL, CLAP score

A thin layer over the Python API. Every bad input is caught before the model loads where it can be, and
ends the program with one line on stderr and exit status 2; nothing is overwritten without --force.
"""
from __future__ import annotations

import argparse
import logging
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
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="LM and text-encoder precision (float32 is the exact reference path)")
    g.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only int8 LM and text encoder; int4: the LM's layers in 4 bits (fastest on CPU)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (CUDA graphs on GPU); pays a one-time warm-up")
    g.add_argument("-o", "--output", type=Path, default=Path("musicgen.wav"),
                   help="output file; several prompts give numbered files (out_0.wav, out_1.wav, ...)")
    g.add_argument("--format", choices=FORMATS, default=None, help="audio format (default: from the file suffix)")
    g.add_argument("--strategy", choices=STRATEGIES, default="loudness",
                   help="level normalisation: loudness (-14 LUFS), peak, clip or none")
    g.add_argument("-f", "--force", action="store_true", help="overwrite existing files")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("--melody", type=Path, help="audio file whose melody (chromagram) conditions melody models")
    g.add_argument("--no-demucs", action="store_true", help="take the melody from the full mix, without Demucs")
    g.add_argument("--continue", dest="continue_from", type=Path,
                   help="audio file to continue: the output starts with it; --duration is the total length")
    g.add_argument("--unconditional", action="store_true", help="generate without text (no prompts allowed)")
    g.add_argument("--batch-size", type=int, default=None, help="clips to generate when there is no text")
    g.add_argument("--max-batch", type=int, default=4,
                   help="clips generated together (default 4); more are generated in turns, each turn's files "
                        "written when it ends, turn i seeded with --seed + i")
    g.add_argument("--extend-stride", type=_positive_float, default=18.0,
                   help="seconds the window (30 s for the published models) advances by in longer audio "
                        "(default 18)")
    g.add_argument("--stream", action="store_true",
                   help="write 16-bit WAV while it is generated, about a second at a time (-o - : to stdout, "
                        "e.g. | aplay); the level is left as generated (clipped), not normalised")
    c = sub.add_parser("convert", help="convert a checkpoint between the Hugging Face and audiocraft formats")
    c.add_argument("src", help="checkpoint folder (either format) or hub id")
    c.add_argument("dst", type=Path, help="output folder, written in the other format")
    c.add_argument("-f", "--force", action="store_true", help="write into a non-empty folder")
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
    s.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only int8 LM and text encoder; int4: the LM's layers in 4 bits")
    from .eval.cli import add_parser as add_eval_parser          # eval (musicgen/eval/)
    from .train.cli import add_parsers as add_train_parsers      # prepare, train (musicgen/train/)

    add_train_parsers(sub)
    add_eval_parser(sub)
    return parser


def _read_prompts(args) -> list[str] | None:
    if args.unconditional:
        if args.prompts or args.prompts_file is not None:
            raise UsageError("--unconditional takes no prompts")
        return None
    if not args.prompts and args.prompts_file is None and (args.melody or args.continue_from):
        return None   # melody / continuation alone, without text
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
        raise UsageError("give at least one prompt (or --prompts-file, or --unconditional)")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise UsageError(f"prompt {i + 1} is empty")
    return prompts


def _output_paths(args, count: int) -> list[Path]:
    """The files to write (none for -o -, standard output), checked before anything is generated."""
    out: Path = args.output
    if str(out) == "-":
        if not args.stream:
            raise UsageError("-o - writes to standard output, which needs --stream")
        if (args.format or "wav") != "wav":
            raise UsageError("--stream writes WAV only")
        if count > 1:
            raise UsageError("--stream to stdout takes one prompt")
        return []
    if out.is_dir():
        raise UsageError(f"output {out} is a folder")
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
    if args.duration <= 0:
        raise UsageError(f"--duration must be positive, got {args.duration:g}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0.0 <= args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in [0, 1], got {args.top_p:g}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature:g}")
    if args.guidance_scale < 0:
        raise UsageError(f"--guidance-scale must be >= 0, got {args.guidance_scale:g}")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise UsageError(f"--seed must be in 0 .. 2**63 - 1, got {args.seed}")


def cmd_generate(args) -> int:
    prompts = _read_prompts(args)
    _validate_sampling(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.batch_size is not None and prompts is not None and args.batch_size != len(prompts):
        raise UsageError(f"--batch-size {args.batch_size} does not match the {len(prompts)} prompt(s)")
    if args.max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {args.max_batch}")
    rows = len(prompts) if prompts is not None else (args.batch_size or 1)
    paths = _output_paths(args, rows)
    if args.stream and any(p.suffix.lower() != ".wav" for p in paths):   # checked before the model loads
        raise UsageError("--stream writes WAV only; use a .wav output (or -o - for stdout)")
    # memory grows with the rows decoded together (a cache per row): a long prompts file goes in turns
    turns = [(start, min(start + args.max_batch, rows)) for start in range(0, rows, args.max_batch)]
    from .inputs import resolve_device

    device = resolve_device(args.device)

    import musicgen

    extra = {}
    if args.melody is not None:
        wav, sr = musicgen.load_audio(args.melody)
        extra.update(melody=wav, melody_sample_rate=sr, demucs=not args.no_demucs)
    if args.continue_from is not None:
        wav, sr = musicgen.load_audio(args.continue_from)
        extra.update(prompt_audio=wav, prompt_sample_rate=sr)
    model = musicgen.load(args.model, device=device, dtype=args.dtype, quantize=args.quantize, compile=args.compile)
    window = model.cfg.max_duration   # the checkpoint's (30 s for the published models)
    if args.duration > window and not 0 < args.extend_stride < window:
        raise UsageError(f"--extend-stride must be in (0, {window:g}) seconds, got {args.extend_stride:g}")
    if args.stream and args.duration > window:
        raise UsageError(f"--stream covers one {window:g} s window: ask for at most {window:g} s")
    for turn, (start, end) in enumerate(turns):
        part = None if prompts is None else prompts[start:end]
        seed = None if args.seed is None else (args.seed + turn) % 2 ** 63
        if len(turns) > 1 and not args.quiet:
            print(f"clips {start + 1}-{end} of {rows}", file=sys.stderr, flush=True)
        if args.stream:
            _generate_streaming(model, part, paths[start:end], args, end - start, seed, extra)
            continue
        audio = model.generate(part, duration=args.duration, top_k=args.top_k, top_p=args.top_p,
                               temperature=args.temperature, guidance_scale=args.guidance_scale, seed=seed,
                               progress=not args.quiet, batch_size=end - start, extend_stride=args.extend_stride,
                               **extra)
        for path, wav in zip(paths[start:end], audio):
            musicgen.save_audio(path, wav, model.sample_rate, strategy=args.strategy, format=args.format)
            print(path, flush=True)
    return 0


def cmd_convert(args) -> int:
    from .convert import convert

    written = convert(args.src, args.dst, force=args.force)
    print(f"{args.dst} ({written} format)")
    return 0


def _generate_streaming(model, prompts, paths, args, rows: int, seed: int | None, extra: dict) -> None:
    """Write WAV while it is generated. The outputs are opened only once the first chunk exists, so that a
    request the model refuses (too long, a melody for a text model, ...) leaves existing files as they were;
    an interrupted stream leaves a valid WAV of what was written."""
    import itertools

    from .audio import pcm16, wav_header

    chunks = model.stream(prompts, duration=args.duration, chunk_seconds=1.0, top_k=args.top_k, top_p=args.top_p,
                          temperature=args.temperature, guidance_scale=args.guidance_scale, seed=seed,
                          batch_size=rows, **extra)
    first = next(chunks, None)                            # (B, channels, samples): the checks have run
    outs = [open(p, "wb") for p in paths] if paths else [sys.stdout.buffer]
    header = wav_header(model.sample_rate, model.audio_channels)
    written = 0
    try:
        for f in outs:
            f.write(header)
        for chunk in itertools.chain([] if first is None else [first], chunks):
            for f, wav in zip(outs, chunk):
                f.write(pcm16(wav))
                f.flush()
            written += chunk.shape[-1]
            if not args.quiet:
                print(f"\rstreamed {written / model.sample_rate:.1f} s", end="", file=sys.stderr, flush=True)
        if not args.quiet:
            print(file=sys.stderr)
    finally:
        for f in outs if paths else []:                  # now the length is known: fix the header's sizes
            data = written * model.audio_channels * 2
            f.seek(4)
            f.write((36 + data).to_bytes(4, "little"))
            f.seek(40)
            f.write(data.to_bytes(4, "little"))
            f.close()
    for path in paths:
        print(path, flush=True)


def cmd_serve(args) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch < 1 or args.max_queue < 1:
        raise UsageError("--max-batch and --max-queue must be at least 1")
    try:
        import uvicorn

        from .serve.auth import RedactTokens
        from .serve.jobs import JobStore
        from .serve.service import Service, create_app
    except ImportError as e:
        raise UsageError(f"the service needs its extra: pip install 'musicgen[serve]' ({e.name} is missing)") from None
    import musicgen
    from .inputs import resolve_device

    device = resolve_device(args.device)
    # what can fail without the model is tried before it loads: the address, then the job database
    sock = _listen(args.host, args.port)
    try:
        store = JobStore(args.data_dir)
        model = musicgen.load(args.model, device=device, dtype=args.dtype, quantize=args.quantize)
        service = Service(model, args.data_dir, model_name=str(args.model), max_batch=args.max_batch,
                          max_queue=args.max_queue, api_key=args.api_key or os.environ.get("MUSICGEN_API_KEY"),
                          store=store)
        server = uvicorn.Server(uvicorn.Config(create_app(service), host=args.host, port=args.port,
                                               log_level="info"))
        logging.getLogger("uvicorn.access").addFilter(RedactTokens())   # after Config has set up logging
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def _listen(host: str, port: int):
    """A socket bound to host:port and listening, as uvicorn would make it (SO_REUSEADDR), or one UsageError."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def cmd_eval(args) -> int:
    from .eval.cli import cmd_eval as run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        commands = {"generate": cmd_generate, "convert": cmd_convert, "serve": cmd_serve, "eval": cmd_eval}
        return (commands.get(args.command) or args.func)(args)
    except (UsageError, ValueError, FileExistsError) as e:   # checkpoint.CheckpointError is a ValueError
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
