"""torchrun on CPU (gloo, 2 processes): DDP and FSDP training equal one process with the same global batch, FSDP
resumes from its checkpoints, and `musicgen prepare` shares its files over ranks."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from musicgen.train import TrainConfig, prepare, train
from musicgen.train import state as st
from musicgen.train.dataset import CodesData
from train_common import one_thread  # noqa: F401  (autouse)
from train_common import assert_states_close, diverse_checkpoint, final_state, metrics, torchrun, write_clips

CAPTIONS = ["lofi hip hop beat", "epic orchestral soundtrack", "techno with kick drum", "calm acoustic guitar"]
OPTS = dict(steps=4, batch_size=4, lr=3e-3, duration=0.5, save_every=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, spm_model):
    tmp = tmp_path_factory.mktemp("dist")
    ckpt = diverse_checkpoint(tmp / "ckpt", spm_model)
    clips = write_clips(tmp / "clips", seconds=1.0, captions=CAPTIONS)
    prepare(clips, tmp / "data", str(ckpt), segment=1.0, progress=False)
    reference = train(TrainConfig(data=str(tmp / "data"), model=str(ckpt), run=str(tmp / "one"), progress=False, **OPTS))
    return ckpt, clips, tmp / "data", reference


def _args(opts: dict) -> list:
    return [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", v)] + ["-q"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(setup, tmp_path, mode):
    ckpt, _, data, reference = setup
    run = tmp_path / mode
    r = torchrun(2, "train", data, "--model", ckpt, "-o", run, *_args(OPTS), *(["--fsdp"] if mode == "fsdp" else []))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_states_close(final_state(run / "final"), final_state(reference), atol=1e-5)
    for a, b in zip(metrics(run), metrics(reference.parent)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    if mode == "fsdp":   # resume from the step-2 checkpoint: rank 0 reads it, the others get their shards
        for _, path in st.checkpoints(run)[1:]:
            path.unlink()
        shutil.rmtree(run / "final")
        r = torchrun(2, "train", data, "-o", run, "--resume", "-q")
        assert r.returncode == 0, r.stderr[-3000:]
        assert_states_close(final_state(run / "final"), final_state(reference), atol=1e-5)


def test_prepare_shares_files_over_ranks(setup, tmp_path):
    ckpt, clips, data, _ = setup
    r = torchrun(2, "prepare", clips, "-o", tmp_path / "data", "--model", ckpt, "--segment", 1.0, "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "data" / "parts").glob("*.jsonl")) == ["rank0.jsonl", "rank1.jsonl"]
    one, two = CodesData(data), CodesData(tmp_path / "data")
    assert [e["source"] for e in one.splits["train"]] == [e["source"] for e in two.splits["train"]]
    assert {e["part"] for e in two.splits["train"]} == {"rank0", "rank1"}
    for i in range(len(one)):
        assert np.array_equal(one.codes("train", i), two.codes("train", i))
