"""Training runs end to end on tiny checkpoints: a model that learns its clips and generates them back from
its export, resume after SIGKILL, LoRA, accumulation, precisions, and mono, stereo and melody checkpoints."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import musicgen
from musicgen.train import TrainConfig, prepare, train
from musicgen.train import state as st
from musicgen.train.dataset import CodesData
from musicgen.train.loss import batch_loss, delayed_batch
from musicgen.train.network import Network, text_states
from train_common import one_thread  # noqa: F401  (autouse)
from train_common import assert_states_close, diverse_checkpoint, env, final_state, metrics, run_cli, write_clips


def config(data, model, run, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), model=str(model), run=str(run), progress=False, **kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, spm_model):
    return diverse_checkpoint(tmp_path_factory.mktemp("diverse"), spm_model)


@pytest.fixture(scope="module")
def memorized(ckpt, tmp_path_factory):
    """Three 0.4 s clips with their captions, learnt by heart: no dropout, crops of the whole clip."""
    tmp = tmp_path_factory.mktemp("memo")
    prepare(write_clips(tmp / "clips", seconds=0.4), tmp / "data", str(ckpt), segment=0.4, progress=False)
    final = train(config(tmp / "data", ckpt, tmp / "run", steps=120, batch_size=3, lr=1e-2, warmup=5,
                         cfg_dropout=0.0, word_dropout=0.0))
    return tmp / "data", tmp / "run", final


def test_learns_its_clips_and_generates_them_from_the_export(memorized):
    data, run, final = memorized
    log = metrics(run)
    assert [r["step"] for r in log] == list(range(1, 121))
    assert log[0]["loss"] > 3.0 and log[-1]["loss"] < 0.01
    assert {"loss", "codebook_losses", "lr", "grad_norm", "tokens_per_s"} <= set(log[0]) and len(log[0]["codebook_losses"]) == 4
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = musicgen.load(final)
    d = CodesData(data)
    for i, e in enumerate(d.splits["train"]):          # greedy, no guidance: the clip's own codes
        codes = model.generate_codes([e["caption"]], duration=0.4, temperature=0.0, guidance_scale=1.0)[0]
        clip = torch.from_numpy(d.codes("train", i).astype(np.int64))
        T = clip.shape[-1]
        for k in range(4):   # codebook k never learns a segment's last k frames (audiocraft's valid steps)
            assert torch.equal(codes[k, :T - k], clip[k, :T - k]), (e["caption"], k)


def test_step_one_logs_the_first_batch_before_any_update(memorized, ckpt):
    data, run, _ = memorized
    model = musicgen.load(ckpt)
    d = CodesData(data)
    cfg = config(data, ckpt, run, cfg_dropout=0.0, word_dropout=0.0)
    from musicgen.train.dataset import Augment

    batch = d.collate(d.train_rows(1, 3, 20, cfg.seed, Augment(0.0, 0.0)), "train", 64)
    inputs, targets = delayed_batch(batch.codes, batch.lengths, 64)
    states, mask = text_states(model, batch.captions)
    with torch.no_grad():
        loss, per_codebook = batch_loss(Network(model)(inputs, states, mask), targets)
    first = metrics(run)[0]
    assert first["loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert first["codebook_losses"] == pytest.approx(per_codebook.tolist(), abs=1e-5)


def test_export_loads_in_transformers_and_converts_to_audiocraft(memorized, tmp_path):
    from transformers import MusicgenForConditionalGeneration

    final = memorized[2]
    hf, info = MusicgenForConditionalGeneration.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = musicgen.load(final)
    codes = torch.randint(0, 64, (1, 4, 6), generator=torch.Generator().manual_seed(0))
    states, mask = ours.encode_text(["techno with driving kick drum"])
    with torch.inference_mode():
        logits = ours.lm(codes, ours.lm.cross_kv(states), ours.lm.cross_bias(mask, states.dtype))
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(final)(["techno with driving kick drum"], return_tensors="pt")
    with torch.no_grad():
        ref = hf.eval()(**enc, decoder_input_ids=codes.reshape(4, 6)).logits.reshape(1, 4, 6, -1)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    r = run_cli("convert", final, tmp_path / "ac")
    assert r.returncode == 0, r.stderr
    back = musicgen.load(tmp_path / "ac")
    for k, v in ours.lm.state_dict().items():
        assert torch.equal(back.lm.state_dict()[k], v), k


# a run that kills itself (SIGKILL) while writing its step-16 checkpoint: after the temporary file, before the rename
KILLED_AT_16 = """
import os, signal, sys
real = os.replace
def replace(src, dst):
    if str(dst).endswith("step_000016.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
from musicgen.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def crops(ckpt, tmp_path_factory):
    """Four 1.3 s clips in 1 s segments (and a short 0.3 s one), trained on random 0.5 s crops anywhere in the
    clips: crops that span two stored segments."""
    tmp = tmp_path_factory.mktemp("crops")
    captions = ["lofi hip hop beat", "epic orchestral soundtrack", "techno with kick drum", "calm acoustic guitar"]
    prepare(write_clips(tmp / "clips", seconds=1.3, captions=captions), tmp / "data", str(ckpt), segment=1.0,
            progress=False)
    return tmp / "data"


def test_resume_after_sigkill_equals_an_uninterrupted_run(crops, ckpt, tmp_path):
    """Killed at step 16, resumed from step 14: the EMA (stepped at 10 and 20) goes on with its saved count."""
    opts = dict(steps=22, batch_size=4, lr=3e-3, duration=0.5, save_every=2, keep=2, ema=0.9)
    whole = train(config(crops, ckpt, tmp_path / "whole", **opts))
    args = ["train", crops, "--model", ckpt, "-o", tmp_path / "run", "-q"] + \
        [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", v)]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_16, *map(str, args)], capture_output=True, text=True,
                            env=env(), timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert [s for s, _ in st.checkpoints(tmp_path / "run")] == [12, 14]        # step 16's never became a checkpoint
    assert (tmp_path / "run" / "checkpoints" / ".step_000016.pt.tmp").exists()
    assert len(metrics(tmp_path / "run")) == 16 and not (tmp_path / "run" / "final").exists()
    assert st.load_checkpoint(st.checkpoints(tmp_path / "run")[-1][1])["ema"]["count"] == 1.0
    r = run_cli("train", crops, "-o", tmp_path / "run", "--resume", "-q")
    assert r.returncode == 0, r.stderr
    assert_states_close(final_state(tmp_path / "run" / "final"), final_state(whole), atol=1e-6)
    resumed, reference = metrics(tmp_path / "run"), metrics(tmp_path / "whole")
    assert [m["step"] for m in resumed] == list(range(1, 23))
    for a, b in zip(resumed, reference):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["lr"] == pytest.approx(b["lr"])
    assert [s for s, _ in st.checkpoints(tmp_path / "run")] == [20, 22]         # the last --keep 2
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))


def test_ema_is_audiocrafts_bias_corrected_average_every_10_steps():
    """audiocraft's ModuleDictEMA(unbias=True) stepped every optim.ema.updates = 10 optimizer steps, written out:
    count = count x decay + 1, ema = ema (1 - 1/count) + weights / count. A weight moving from 0 (the starting
    checkpoint) to 1 over 1000 steps: its first EMA step takes the weights whole, the start washes out."""
    from musicgen.train.loop import EMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], 0.99)
    count, expected = 0.0, torch.zeros(3)
    for step in range(1, 1001):
        with torch.no_grad():
            p.fill_(step / 1000)
        ema.update(step)
        if step % 10 == 0:
            count = count * 0.99 + 1
            expected = expected * (1 - 1 / count) + p.detach() / count
        if step == 10:
            assert torch.equal(ema.weights()["w"], torch.full((3,), 0.01))
        if step == 15:
            assert torch.equal(ema.weights()["w"], torch.full((3,), 0.01))        # no step between the 10s
    torch.testing.assert_close(ema.weights()["w"], expected, rtol=1e-6, atol=0)
    assert ema.count == pytest.approx(count)
    again = EMA([("w", p)], 0.99)
    again.load_state_dict(ema.state_dict())
    assert again.count == ema.count and torch.equal(again.weights()["w"], ema.weights()["w"])
    old = EMA([("w", p)], 0.99)
    old.load_state_dict({"w": torch.ones(3)})   # a checkpoint from before the count was kept: the steady state
    assert old.count == pytest.approx(100) and torch.equal(old.weights()["w"], torch.ones(3))


def test_accumulation_and_activation_checkpointing_change_nothing(crops, ckpt, tmp_path):
    opts = dict(steps=3, batch_size=4, lr=3e-3, duration=0.5)
    a = train(config(crops, ckpt, tmp_path / "a", **opts))
    b = train(config(crops, ckpt, tmp_path / "b", accumulate=4, grad_checkpoint=True, **opts))
    assert_states_close(final_state(a), final_state(b), atol=1e-5)   # sums in another order: rounding only


def test_clipping_inside_the_fused_adamw_equals_clip_grad_norm(crops, ckpt, tmp_path, monkeypatch):
    """The trainer hands the clipping coefficient to the fused AdamW (`optimizer.grad_scale`) instead of scaling
    every gradient in place first: the same weights as clip_grad_norm_ and a plain step, with every step clipped
    (AdamW cancels a constant scale, not one that changes from step to step: no clipping ends elsewhere)."""
    from musicgen.train import loop

    opts = dict(steps=4, batch_size=4, lr=3e-3, duration=0.5, clip=0.05)
    init, folds = loop.Trainer.__init__, []

    def spy(self, *a, fold=True, **k):
        init(self, *a, **k)
        folds.append(self.fold_clip)
        self.fold_clip = self.fold_clip and fold

    monkeypatch.setattr(loop.Trainer, "__init__", spy)
    folded = train(config(crops, ckpt, tmp_path / "folded", **opts))
    assert folds == [True] and all(m["grad_norm"] > 0.05 for m in metrics(tmp_path / "folded"))
    monkeypatch.setattr(loop.Trainer, "__init__", lambda self, *a, **k: spy(self, *a, fold=False, **k))
    plain = train(config(crops, ckpt, tmp_path / "plain", **opts))
    unclipped = train(config(crops, ckpt, tmp_path / "unclipped", **{**opts, "clip": 1e9}))
    assert_states_close(final_state(folded), final_state(plain), atol=1e-6)
    far = max((final_state(folded)[k] - v).abs().max().item() for k, v in final_state(unclipped).items())
    assert far > 1e-4


def test_the_codec_stays_only_for_samples(crops, ckpt, tmp_path):
    """A run without samples frees the codec once DATA's fingerprint is checked; a run with samples keeps it."""
    from musicgen.train.distributed import Dist
    from musicgen.train.loop import Trainer

    plain = Trainer(config(crops, ckpt, tmp_path / "plain", steps=1), Dist(device=torch.device("cpu")), resume=False)
    assert plain.model.codec is None
    assert "codec" not in {n.split(".")[0] for n, _ in plain.net.named_parameters()}
    sampled = Trainer(config(crops, ckpt, tmp_path / "sampled", steps=1, sample_every=1, sample_prompts=("lofi",)),
                      Dist(device=torch.device("cpu")), resume=False)
    assert sampled.model.codec is not None
    with pytest.raises(ValueError, match="at least one frame"):   # before the first step, not at the first sample
        Trainer(config(crops, ckpt, tmp_path / "tiny", steps=1, sample_every=1, sample_prompts=("lofi",),
                       sample_duration=0.01), Dist(device=torch.device("cpu")), resume=False)


def test_dropouts_default_to_the_checkpoints_audiocraft_values(crops, ckpt, melody_ckpt_dir, tmp_path):
    """audiocraft trains text checkpoints with guidance and word dropout 0.3 (text2music.yaml), melody ones with
    0.2 (chroma2music.yaml); the options given win, and the run's config keeps None for "the checkpoint's"."""
    from musicgen.train.distributed import Dist
    from musicgen.train.loop import Trainer

    prepare(write_clips(tmp_path / "clips", seconds=0.5, captions=["a tune"]), tmp_path / "melody_data",
            str(melody_ckpt_dir), segment=0.5, demucs=False, progress=False)
    cases = [(crops, ckpt, {}, (0.3, 0.3)), (tmp_path / "melody_data", melody_ckpt_dir, {}, (0.2, 0.2)),
             (tmp_path / "melody_data", melody_ckpt_dir, dict(cfg_dropout=0.1, word_dropout=0.0), (0.1, 0.0))]
    for i, (data, model, given, expected) in enumerate(cases):
        trainer = Trainer(config(data, model, tmp_path / f"run{i}", steps=1, **given), Dist(device=torch.device("cpu")),
                          resume=False)
        trainer.close()
        assert (trainer.augment.cfg_dropout, trainer.augment.word_dropout) == expected
    assert json.loads((tmp_path / "run1" / "config.json").read_text())["cfg_dropout"] is None


def test_lora_trains_adapters_only_and_exports_them_merged(crops, ckpt, tmp_path):
    final = train(config(crops, ckpt, tmp_path / "run", steps=6, batch_size=4, lr=1e-2, duration=0.5,
                         lora_rank=4, save_every=6, sample_every=3, sample_prompts=("lofi", "techno"),
                         sample_duration=0.2))
    samples = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert samples == ["step_000003_0.wav", "step_000003_1.wav", "step_000006_0.wav", "step_000006_1.wav"]
    (step, path), = st.checkpoints(tmp_path / "run")
    saved = st.load_checkpoint(path)["model"]
    assert saved and all(".lora_a" in k or ".lora_b" in k for k in saved)
    assert len(saved) == 2 * 2 * 7                                              # A and B, 7 linears, 2 layers
    base, tuned = final_state(ckpt), final_state(final)
    assert base.keys() == tuned.keys()
    layer = "decoder.model.decoder.layers.1."
    for name in ("fc1.weight", "self_attn.q_proj.weight", "encoder_attn.v_proj.weight", "self_attn.out_proj.weight"):
        assert not torch.equal(base[layer + name], tuned[layer + name]), name     # adapters merged in
    for name in ("self_attn_layer_norm.weight", "final_layer_norm.bias"):
        assert torch.equal(base[layer + name], tuned[layer + name])
    assert torch.equal(base["decoder.lm_heads.0.weight"], tuned["decoder.lm_heads.0.weight"])
    assert torch.equal(base["enc_to_dec_proj.weight"], tuned["enc_to_dec_proj.weight"])
    assert metrics(tmp_path / "run")[-1]["loss"] < metrics(tmp_path / "run")[0]["loss"]


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_autocast_precisions_train(crops, ckpt, tmp_path, precision):
    train(config(crops, ckpt, tmp_path / "run", steps=4, batch_size=4, lr=3e-3, duration=0.5,
                 precision=precision))
    log = metrics(tmp_path / "run")
    assert all(np.isfinite(r["loss"]) for r in log) and log[-1]["loss"] < log[0]["loss"]
    (_, path), = st.checkpoints(tmp_path / "run")
    assert st.load_checkpoint(path)["scaler"] if precision == "float16" else True


@pytest.fixture(scope="module")
def stereo_ckpt_dir(tmp_path_factory, spm_model):
    return diverse_checkpoint(tmp_path_factory.mktemp("stereo"), spm_model, stereo=True)


@pytest.mark.parametrize("kind", ["stereo", "melody"])
def test_stereo_and_melody_checkpoints_train(kind, stereo_ckpt_dir, melody_ckpt_dir, tmp_path):
    ckpt = stereo_ckpt_dir if kind == "stereo" else melody_ckpt_dir
    clips = write_clips(tmp_path / "clips", seconds=0.5, channels=2 if kind == "stereo" else 1)
    prepare(clips, tmp_path / "data", str(ckpt), segment=0.5, demucs=False, progress=False, valid_fraction=0.34)
    final = train(config(tmp_path / "data", ckpt, tmp_path / "run", steps=10, batch_size=2, lr=1e-2, valid_every=5,
                         cfg_dropout=0.0))
    log = metrics(tmp_path / "run")
    assert log[-1]["loss"] < log[0]["loss"] and "valid_loss" in log[4] and "valid_loss" not in log[3]
    assert len(log[0]["codebook_losses"]) == (8 if kind == "stereo" else 4)
    model = musicgen.load(final)
    assert model.audio_channels == (2 if kind == "stereo" else 1) and model.supports_melody == (kind == "melody")
    from transformers import MusicgenForConditionalGeneration, MusicgenMelodyForConditionalGeneration

    cls = MusicgenMelodyForConditionalGeneration if kind == "melody" else MusicgenForConditionalGeneration
    _, info = cls.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
