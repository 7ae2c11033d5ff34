"""Load test of `musicgen serve`: N requests one at a time, then N at once, over loopback HTTP.

    python benchmarks/serve_load.py                          # 8 requests, tiny random model, 4 s each
    python benchmarks/serve_load.py --requests 8 --dim 256 --layers 4 --duration 4
    python benchmarks/serve_load.py --dim 1024 --layers 24 --quantize int4   # musicgen-small's width and depth
    python benchmarks/serve_load.py --dim 1024 --layers 24 --dtype bfloat16

Builds a random checkpoint in the hub format (transformers, a test dependency, writes it; cached under
--cache), starts the real server (`python -m musicgen serve`) on a free port, and prints a table: wall time,
requests/s and seconds of audio per second for sequential and concurrent requests, and their ratio.
Bounded: at most 64 requests, and --timeout seconds per phase.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def build_checkpoint(folder: Path, dim: int, layers: int) -> Path:
    if (folder / "config.json").exists():
        return folder
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_hf_model, save_checkpoint, train_spm

    spm = train_spm(folder / "spm")
    return save_checkpoint(build_hf_model(lm_dim=dim, layers=layers, vocab=2048), folder, spm)


def run_one(client: httpx.Client, body: dict, timeout: float) -> float:
    t0 = time.perf_counter()
    job = client.post("/v1/generate", json=body).raise_for_status().json()["id"]
    while True:
        j = client.get(f"/v1/jobs/{job}", params={"wait": 30}).json()     # long poll
        if j["status"] == "done":
            return time.perf_counter() - t0
        if j["status"] in ("failed", "cancelled") or time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"job {job}: {j['status']} {j.get('error')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds of audio per request")
    ap.add_argument("--dim", type=int, default=48, help="LM width of the random model (musicgen-small: 1024)")
    ap.add_argument("--layers", type=int, default=2, help="LM layers (musicgen-small: 24)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--quantize", choices=["int8", "int4"], help="serve the model quantised (default: float32)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the served model's dtype")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per phase")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "musicgen-serve-bench")
    args = ap.parse_args()
    n = max(1, min(args.requests, 64))
    ckpt = build_checkpoint(args.cache / f"ckpt-d{args.dim}-l{args.layers}", args.dim, args.layers)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = Path(tempfile.mkdtemp(prefix="musicgen-serve-data-"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    server = subprocess.Popen([sys.executable, "-m", "musicgen", "serve", "--model", str(ckpt), "--port", str(port),
                               "--data-dir", str(data), "--max-batch", str(args.max_batch), "--max-queue", "64"]
                              + (["--quantize", args.quantize] if args.quantize else []) + ["--dtype", args.dtype],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        deadline = time.time() + 120
        while True:
            try:
                client.get("/health").raise_for_status()
                break
            except httpx.TransportError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("server did not start")
                time.sleep(0.2)
        info = client.get("/v1/model").json()
        body = lambda i: dict(prompt=f"lofi hip hop beat number {i}", duration=args.duration, seed=i)  # noqa: E731
        run_one(client, body(-1 % 1000), args.timeout)                      # warm-up

        t0 = time.perf_counter()
        for i in range(n):
            run_one(client, body(i), args.timeout)
        sequential = time.perf_counter() - t0

        before = client.get("/health").json()
        latencies: list[float] = []
        threads = [threading.Thread(target=lambda i=i: latencies.append(run_one(
            httpx.Client(base_url=client.base_url, timeout=60), body(i), args.timeout))) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent = time.perf_counter() - t0
        after = client.get("/health").json()
        if len(latencies) != n:
            raise SystemExit("some concurrent requests failed")
    finally:
        server.terminate()
        server.wait(timeout=30)

    import torch
    steps = after["steps"] - before["steps"]
    req_steps = after["request_steps"] - before["request_steps"]
    print(f"musicgen serve load test: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), {args.quantize or args.dtype}"
          + (f" ({args.dtype})" if args.quantize and args.dtype != "float32" else ""))
    print(f"random model: LM dim {info['dim']}, {info['layers']} layers, {info['parameters'] / 1e6:.1f} M parameters; "
          f"{n} requests of {args.duration:g} s, max batch {args.max_batch}")
    print()
    print("| mode | requests | wall s | requests/s | audio s/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, wall in (("sequential", sequential), ("concurrent", concurrent)):
        print(f"| {name} | {n} | {wall:.2f} | {n / wall:.2f} | {n * args.duration / wall:.2f} | "
              f"{sequential / wall:.2f}x |")
    print()
    print(f"concurrent: {steps} batched steps for {req_steps} request-steps "
          f"(mean batch {req_steps / max(1, steps):.2f}); latency mean {sum(latencies) / n:.2f} s, "
          f"max {max(latencies):.2f} s")


if __name__ == "__main__":
    main()
