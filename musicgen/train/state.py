"""What a run leaves in RUN/: checkpoints (atomic, the last K kept), metrics.jsonl (+ TensorBoard when installed),
and the loss curve.

    RUN/config.json                 the run's options (TrainConfig), written once; --resume reads it back
    RUN/checkpoints/step_000500.pt  trained weights (adapters only for LoRA), optimizer, schedule, gradient
                                    scaler, EMA, torch's random states and the step: everything a resume needs
    RUN/metrics.jsonl               one JSON object per step: step, loss, codebook_losses, lr, grad_norm,
                                    tokens_per_s, audio_s_per_s, and valid_loss / valid_codebook_losses when
                                    computed
    RUN/loss.png                    the loss curves at the end (needs matplotlib: the `train` extra)
    RUN/.lock                       held (flock) by the training that writes RUN, so a second one is refused

A checkpoint is written to a temporary file, flushed to disk and renamed into place, so a run killed at any
moment leaves whole checkpoints only; metrics lines past the checkpoint a run resumes from are dropped, so the
resumed file is the one an uninterrupted run would have written.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import torch

_NAME = re.compile(r"^step_(\d+)\.pt$")
LOCK = ".lock"


def lock_run(run: Path):
    """Hold an exclusive lock on RUN for as long as the returned file stays open (the OS drops it when the
    process dies, so a killed run leaves no stale lock). None where flock does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    f = open(run / LOCK, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ValueError(f"{run} is in use by another training; wait for it to end, or choose another -o RUN") from None
    return f


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, path) of the whole checkpoints in RUN, oldest first."""
    folder = Path(run) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(run: Path, step: int, payload: dict, keep: int) -> Path:
    folder = Path(run) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.pt"
    tmp = folder / f".step_{step:06d}.pt.tmp"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for _, old in checkpoints(run)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    # mmap: ranks that take only the small entries (FSDP ranks other than 0) do not read the weights
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class Metrics:
    """RUN/metrics.jsonl, continued from step `start` (lines after it are dropped), and TensorBoard scalars in
    RUN/tensorboard when the tensorboard package is installed. Only rank 0 writes."""

    def __init__(self, run: Path, enabled: bool, start: int):
        self.path = Path(run) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= start]
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run) / "tensorboard"), purge_step=start + 1)
        except ImportError:
            pass

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, list):
                    for i, v in enumerate(value):
                        self.tb.add_scalar(f"{key}/{i}", v, record["step"])
                elif key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break   # a line cut by a kill
    return out


def plot_loss(run: Path) -> Path | None:
    """RUN/loss.png: training loss per step (and its per-codebook curves), validation loss where computed."""
    records = read_metrics(Path(run) / "metrics.jsonl")
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("musicgen: no loss curve: matplotlib is not installed (pip install 'musicgen[train]')", file=sys.stderr)
        return None
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for k in range(len(records[0].get("codebook_losses", []))):
        ax.plot(steps, [r["codebook_losses"][k] for r in records], lw=0.8, alpha=0.5, label=f"codebook {k}")
    ax.plot(steps, [r["loss"] for r in records], lw=1.6, color="black", label="train loss")
    valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r and math.isfinite(r["valid_loss"])]
    if valid:
        ax.plot(*zip(*valid), "o-", color="tab:red", lw=1.6, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(run) / "loss.png"
    tmp = out.with_name(".loss.png.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out
