"""Speed of this project against transformers on the same random-weight checkpoints at the real MusicGen shapes.

    python benchmarks/speed.py                                   # CPU: small and medium, batch 1 and 4
    python benchmarks/speed.py --sizes small --batches 1 --seconds 5
    python benchmarks/speed.py --device cuda --sizes medium --modes float32,bfloat16,bfloat16+compile
    python benchmarks/speed.py --codec --batches 1,2 --seconds 10    # EnCodec encode / decode alone
    python benchmarks/speed.py --load --sizes small,medium           # load time and memory per mode

Speed does not depend on weight values, so checkpoints are built once with transformers (random weights, the
published config values of facebook/musicgen-{small,medium,large}) into --cache and reused. Every row runs in
its own process (clean peak memory). Guidance 3.0, top-k 250 throughout.

Columns: decoding steps/s (LM steps only: ours = positions / (generate_codes - text encoding); transformers =
rate of decoder forward calls inside generate()), the LM weight bytes one step reads times steps/s (the memory
traffic decoding achieves, to hold against the machine's bandwidth), time to first audio (the first streamed
chunk where `model.stream` exists, otherwise the whole request), whole request for --seconds of audio (text ->
audio), the text encoder and the codec decode timed on their own (transformers: its text encoder and
audio_encoder.decode on codes of the same length; its request includes both), a continuation request (a
10 s audio prompt continued by 1 s, audio out: encoding the prompt, one prefill over its frames, 50 steps,
decoding), peak memory (CPU: max RSS; CUDA: max allocated), and the ratio of steps/s to transformers float32
at the same size/batch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT_SECONDS = 10.0   # the audio prompt of the "continue" column
SIZES = {  # facebook/musicgen-* decoder shapes
    "small": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096),
    "medium": dict(hidden_size=1536, num_hidden_layers=48, num_attention_heads=24, ffn_dim=6144),
    "large": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, ffn_dim=8192),
}
PROMPTS = ["80s pop track with bassy drums and synth", "lofi hip hop beat with mellow piano and vinyl crackle",
           "epic orchestral soundtrack with strings, brass and choir", "techno with driving kick drum and acid bass"]


# -- checkpoints -----------------------------------------------------------------------------------------
def build_checkpoint(size: str, folder: Path) -> None:
    """A hub-format checkpoint with random weights at the published shapes (transformers is the builder)."""
    import torch
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig,
                              MusicgenForConditionalGeneration, T5Config)

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_checkpoint, train_spm

    text = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                    feed_forward_proj="relu")
    codec = EncodecConfig(sampling_rate=32000, upsampling_ratios=[8, 5, 4, 4], use_causal_conv=False,
                          use_conv_shortcut=False, codebook_size=2048, num_filters=64, hidden_size=128,
                          codebook_dim=128, target_bandwidths=[2.2], normalize=False, chunk_length_s=None,
                          audio_channels=1, compress=2, num_lstm_layers=2, residual_kernel_size=3)
    decoder = MusicgenDecoderConfig(vocab_size=2048, num_codebooks=4, max_position_embeddings=2048,
                                    pad_token_id=2048, bos_token_id=2048, **SIZES[size])
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(MusicgenConfig(text_encoder=text, audio_encoder=codec, decoder=decoder))
    for name, attr in (("pad_token_id", 2048), ("decoder_start_token_id", 2048), ("bos_token_id", 2048)):
        setattr(model.generation_config, name, attr)
    spm = train_spm(folder / "_spm")
    save_checkpoint(model.eval(), folder, spm)


def ensure_checkpoint(size: str, cache: Path) -> Path:
    folder = cache / size
    if not (folder / "config.json").is_file():
        print(f"building a random {size} checkpoint in {folder} (once) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, "--build", size, "--cache", str(cache)], check=True)
    return folder


# -- one measurement, in its own process -----------------------------------------------------------------
def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


MODE_HELP = ("float32, bfloat16, float16, int8 or int4, each optionally with +compile (load(compile=True)), "
             "+reference (the PyTorch layer loop where the fused CPU step would run) or +nokernels (as a machine "
             "without the native kernels: MUSICGEN_NO_KERNELS=1)")


def load_mode(folder: Path, mode: str, device: str):
    """musicgen.load in one of our modes (MODE_HELP). +nokernels is set up by the caller: it must be in the
    environment before the kernels are first looked up (run_row does it for its worker process)."""
    import musicgen
    from musicgen import accel

    dtype = "bfloat16" if "bfloat16" in mode else "float16" if "float16" in mode else "float32"
    quantize = "int8" if "int8" in mode else "int4" if "int4" in mode else None
    with accel.override(backend="reference" if "reference" in mode else "auto"):
        return musicgen.load(folder, device=device, dtype=dtype, quantize=quantize, compile="compile" in mode)


def measure_ours(folder: Path, mode: str, batch: int, seconds: float, device: str) -> dict:
    import torch

    model = load_mode(folder, mode, device)
    prompts = (PROMPTS * batch)[:batch]
    kw = dict(top_k=250, guidance_scale=3.0, seed=0)
    # warm-up: compiles, and on a GPU records a CUDA graph per attention window the request uses
    model.generate(prompts, duration=seconds if "compile" in mode else 0.2, **kw)
    sync(device)
    t0 = time.perf_counter()
    model.encode_text(prompts)
    sync(device)
    text_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes = model.generate_codes(prompts, duration=seconds, **kw)
    sync(device)
    codes_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.decode(codes)
    sync(device)
    decode_s = time.perf_counter() - t0
    steps = codes.shape[-1] + model.cfg.lm.num_codebooks - 1
    request_s = codes_s + decode_s
    prompt = 0.1 * torch.randn(batch, 1, round(PROMPT_SECONDS * model.sample_rate),
                               generator=torch.Generator().manual_seed(0))
    sync(device)
    t0 = time.perf_counter()
    model.generate(prompts, duration=PROMPT_SECONDS + 1, prompt_audio=prompt, **kw)
    sync(device)
    continue_s = time.perf_counter() - t0
    first_audio_s = request_s
    if hasattr(model, "stream"):
        t0 = time.perf_counter()
        for _ in model.stream(prompts[0], duration=seconds, **kw):
            sync(device)
            first_audio_s = time.perf_counter() - t0
            break
    return dict(steps_per_s=steps / (codes_s - text_s), first_audio_s=first_audio_s, request_s=request_s,
                decode_s=decode_s, text_s=text_s, continue_s=continue_s, peak_mb=peak_memory_mb(device),
                weight_bytes=step_bytes(model.lm.state_dict()), backend=model.backend.name)


def measure_transformers(folder: Path, mode: str, batch: int, seconds: float, device: str) -> dict:
    import torch
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    dtype = torch.bfloat16 if "bfloat16" in mode else torch.float16 if "float16" in mode else torch.float32
    model = MusicgenForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = (PROMPTS * batch)[:batch]
    K = model.decoder.num_codebooks
    steps = round(seconds * 50) + K - 1

    times: list[float] = []   # one decoder forward per decoding step (its prefill included)

    def tick(*_):
        sync(device)
        times.append(time.perf_counter())

    def run(n):
        inputs = tok(prompts, padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            return model.generate(**inputs, do_sample=True, top_k=250, guidance_scale=3.0, max_new_tokens=n)

    run(10)                                                                   # warm-up
    hook = model.decoder.register_forward_hook(tick)
    sync(device)
    t0 = time.perf_counter()
    run(steps)
    sync(device)
    request_s = time.perf_counter() - t0
    rate = (len(times) - 1) / (times[-1] - times[0])
    hook.remove()
    prompt = 0.1 * torch.randn(batch, 1, round(PROMPT_SECONDS * 32000), generator=torch.Generator().manual_seed(0))
    inputs = tok(prompts, padding=True, return_tensors="pt").to(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, input_values=prompt.to(device, dtype), do_sample=True, top_k=250,
                       guidance_scale=3.0, max_new_tokens=50)
    sync(device)
    continue_s = time.perf_counter() - t0
    # its text encoder and codec decode on their own (generate() runs both inside the request above)
    inputs = tok(prompts, padding=True, return_tensors="pt").to(device)
    codes = torch.randint(0, model.config.audio_encoder.codebook_size, (1, batch, K, round(seconds * 50)),
                          device=device)
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        model.text_encoder(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
        sync(device)
        text_s = time.perf_counter() - t0
        model.audio_encoder.decode(codes[..., :10], [None])                 # warm-up
        sync(device)
        t0 = time.perf_counter()
        model.audio_encoder.decode(codes, [None])
        sync(device)
        decode_s = time.perf_counter() - t0
    return dict(steps_per_s=rate, first_audio_s=request_s, request_s=request_s, decode_s=decode_s,
                text_s=text_s, continue_s=continue_s, peak_mb=peak_memory_mb(device),
                weight_bytes=step_bytes(model.decoder.state_dict()))


def step_bytes(state: dict) -> int:
    """Bytes of LM weights one decoding step reads: everything but the embedding tables (a few rows each), the
    sinusoidal position table and the cross-attention key/value projections (applied once per generation)."""
    once = ("embed", "position", "cross_attn.kv.", "encoder_attn.k_proj.", "encoder_attn.v_proj.")
    return sum(t.numel() * t.element_size() for name, t in state.items() if not any(o in name for o in once))


# -- the table -----------------------------------------------------------------------------------------
def run_row(impl: str, size: str, mode: str, batch: int, args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", impl, size, mode, str(batch), "--seconds", str(args.seconds),
           "--device", args.device, "--cache", str(args.cache)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if "nokernels" in mode:
        env["MUSICGEN_NO_KERNELS"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"{impl} {size} {mode} b{batch} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(impl=impl, size=size, mode=mode, batch=batch)
    print(f"  {impl:12s} {size:6s} {mode:18s} b{batch}: {row['steps_per_s']:.1f} steps/s "
          f"({row.get('backend', 'transformers')})", file=sys.stderr, flush=True)
    for line in dict.fromkeys(ln for ln in proc.stderr.splitlines() if ln.startswith("musicgen:")):
        print(f"    {line}", file=sys.stderr, flush=True)   # what the package said once: compile time, CUDA graphs
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="small,medium")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--modes", default=None, help=f"ours: {MODE_HELP} (default CPU: float32,bfloat16,float16,int8,"
                   "int4; CUDA: float32,bfloat16,bfloat16+compile,int8+compile)")
    p.add_argument("--hf-modes", default=None, help="transformers rows (default: float32; CUDA: float32,bfloat16; "
                   "'none': no transformers rows)")
    p.add_argument("--seconds", type=float, default=10.0, help="audio per request")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "musicgen-bench")
    p.add_argument("--codec", action="store_true", help="only the codec: encode and decode, ours and "
                   "transformers', per --batches")
    p.add_argument("--load", action="store_true", help="only loading: seconds and peak memory per size and mode")
    p.add_argument("--load-worker", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--build", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.build:
        build_checkpoint(args.build, args.cache / args.build)
        return
    if args.worker:
        impl, size, mode, batch = args.worker
        fn = measure_ours if impl == "musicgen" else measure_transformers
        print(json.dumps(fn(args.cache / size, mode, int(batch), args.seconds, args.device)))
        return

    if args.load_worker:
        impl, mode, folder = args.load_worker
        print(json.dumps(measure_load(Path(folder), impl, mode)))
        return
    if args.codec:
        codec_table(args)
        return
    if args.load:
        load_table(args)
        return
    cuda = args.device.startswith("cuda")
    modes = (args.modes or ("float32,bfloat16,bfloat16+compile,int8+compile" if cuda else
                            "float32,bfloat16,float16,int8,int4")).split(",")
    hf_modes = (args.hf_modes or ("float32,bfloat16" if cuda else "float32")).split(",")
    hf_modes = [] if hf_modes == ["none"] else hf_modes
    rows = []
    for size in args.sizes.split(","):
        ensure_checkpoint(size, args.cache)
        for batch in map(int, args.batches.split(",")):
            rows += [run_row("transformers", size, m, batch, args) for m in hf_modes]
            rows += [run_row("musicgen", size, m, batch, args) for m in modes]
    print_table([r for r in rows if r], args)


def print_table(rows: list[dict], args) -> None:
    import torch

    if args.device.startswith("cuda"):
        hw = torch.cuda.get_device_name()
    else:
        hw = f"{cpu_name()}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"
    print(f"\ndevice: {args.device} ({hw}); torch {torch.__version__}; {args.seconds:g} s of audio per request; "
          "guidance 3.0, top-k 250; random weights at the published shapes\n")
    print("| size | batch | implementation | mode | backend | steps/s | × transformers | weights GB/s | first audio (s) | "
          f"request (s) | text (s) | codec decode (s) | continue {PROMPT_SECONDS:g} s by 1 s (s) | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next((b for b in rows if b["impl"] == "transformers" and b["size"] == r["size"]
                     and b["batch"] == r["batch"] and b["mode"] == "float32"), None)
        ratio = f"{r['steps_per_s'] / base['steps_per_s']:.1f}×" if base else "-"
        gbs = r["weight_bytes"] * r["steps_per_s"] / 1e9
        print(f"| {r['size']} | {r['batch']} | {r['impl']} | {r['mode']} | {r.get('backend', '-')} | "
              f"{r['steps_per_s']:.1f} | {ratio} | {gbs:.1f} | "
              f"{r['first_audio_s']:.2f} | {r['request_s']:.2f} | {_s(r['text_s'])} | {_s(r['decode_s'])} | "
              f"{r['continue_s']:.2f} | "
              f"{r['peak_mb']:.0f} |")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _s(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"


# -- loading --------------------------------------------------------------------------------------------
def measure_load(folder: Path, impl: str, mode: str) -> dict:
    """Seconds and peak RSS of loading the checkpoint, ready to generate (in its own process)."""
    t0 = time.perf_counter()
    import torch
    if impl == "transformers":
        from transformers import MusicgenForConditionalGeneration
        imported = time.perf_counter()
        MusicgenForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    else:
        import musicgen
        imported = time.perf_counter()
        dtype = "bfloat16" if mode == "bfloat16" else "float32"
        musicgen.load(folder, dtype=dtype, quantize=mode if mode in ("int8", "int4") else None)
    done = time.perf_counter()
    return dict(import_s=imported - t0, load_s=done - imported, peak_mb=peak_memory_mb("cpu"))


def load_table(args) -> None:
    """Load time per size and mode, second of two runs (the checkpoint file then sits in the page cache)."""
    import torch

    print(f"\nloading ({cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}); second of two runs, "
          "each in its own process\n")
    print("| size | implementation | mode | import (s) | load (s) | peak memory (MB) |")
    print("|---|---|---|---|---|---|")
    modes = (args.modes or "float32,bfloat16,int8,int4").split(",")
    for size in args.sizes.split(","):
        folder = ensure_checkpoint(size, args.cache)
        for impl, mode in [("transformers", "float32")] + [("musicgen", m) for m in modes]:
            row = None
            for _ in range(2):
                cmd = [sys.executable, __file__, "--load-worker", impl, mode, str(folder)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
                if proc.returncode != 0:
                    print(f"{impl} {size} {mode} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    break
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            if row:
                print(f"| {size} | {impl} | {mode} | {row['import_s']:.2f} | {row['load_s']:.2f} | "
                      f"{row['peak_mb']:.0f} |", flush=True)


# -- the codec alone -------------------------------------------------------------------------------------
def codec_table(args) -> None:
    """EnCodec encode and decode of --seconds of audio per row: ours (musicgen/accel/codec.py), ours through
    the layer modules (`Encoder.reference`, `Decoder.reference`) and transformers' EncodecModel, on the same
    checkpoint; best of 3. Then what the fast path saves on whole requests of musicgen-small in int4 (the
    fastest mode, where the codec weighs most): --seconds of audio from text, and a 10 s prompt continued by
    1 s, each with the fast codec and with the layer modules."""
    import torch
    import musicgen
    from musicgen.accel import codec as fast_codec

    folder = ensure_checkpoint("small", args.cache)        # every MusicGen size has the same codec
    model = musicgen.load(folder, quantize="int4")
    ours = model.codec
    from transformers import MusicgenForConditionalGeneration
    theirs = MusicgenForConditionalGeneration.from_pretrained(folder).audio_encoder
    theirs.eval()
    samples = round(args.seconds * ours.sample_rate)

    print(f"\ncodec ({cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}): seconds for "
          f"{args.seconds:g} s of 32 kHz audio per row\n")
    print("| batch | implementation | encode (s) | decode (s) | × transformers (decode) |")
    print("|---|---|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        audio = 0.1 * torch.randn(batch, 1, samples, generator=torch.Generator().manual_seed(0))
        codes = torch.randint(0, ours.cfg.codebook_size, (batch, ours.num_codebooks, samples // ours.hop_length))
        with torch.inference_mode():
            ref_dec = _best_time(lambda: theirs.decode(codes[None], [None]))
            ref_enc = _best_time(lambda: theirs.encode(audio, bandwidth=theirs.config.target_bandwidths[0]))
            rows = [("transformers", ref_enc, ref_dec)]
            modules = (lambda: ours.quantizer.encode(ours.encoder.reference(audio)),
                       lambda: ours.decoder.reference(ours.quantizer.decode(codes)))
            rows.append(("musicgen (modules)", _best_time(modules[0]), _best_time(modules[1])))
            rows.append(("musicgen", _best_time(lambda: ours.encode(audio)), _best_time(lambda: ours.decode(codes))))
        for name, enc, dec in rows:
            print(f"| {batch} | {name} | {enc:.2f} | {dec:.2f} | {ref_dec / dec:.1f}× |", flush=True)

    prompt = 0.1 * torch.randn(1, 1, round(PROMPT_SECONDS * model.sample_rate), generator=torch.Generator().manual_seed(0))
    kw = dict(top_k=250, guidance_scale=3.0, seed=0)
    requests = {f"{args.seconds:g} s from text": lambda: model.generate(PROMPTS[:1], duration=args.seconds, **kw),
                f"{PROMPT_SECONDS:g} s prompt continued by 1 s": lambda: model.generate(
                    PROMPTS[:1], duration=PROMPT_SECONDS + 1, prompt_audio=prompt, **kw)}
    print("\nwhole requests, small int4, batch 1 (best of 3, seconds)\n")
    print("| request | codec through the layer modules | fast codec | saved |")
    print("|---|---|---|---|")
    enabled = fast_codec.enabled
    for name, request in requests.items():
        fast_codec.enabled = lambda x: False
        slow = _best_time(request)
        fast_codec.enabled = enabled
        fast = _best_time(request)
        print(f"| {name} | {slow:.2f} | {fast:.2f} | {1 - fast / slow:.0%} |", flush=True)


def _best_time(fn, repeats: int = 3) -> float:
    """Fastest of `repeats` timed calls of fn, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


if __name__ == "__main__":
    main()
