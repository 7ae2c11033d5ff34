"""The Python API with inputs a user gets wrong, and checkpoints with odd contents: each is a ValueError (a
CheckpointError for files) naming the problem, raised before any long work, or it works as documented."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import musicgen
from musicgen.checkpoint import CheckpointError


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_checkpoint_keeps_the_codec_in_float32(ckpt_dir, tmp_path, dtype):
    folder = shutil.copytree(ckpt_dir, tmp_path / "half")
    state = load_file(folder / "model.safetensors")
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    model = musicgen.load(folder)
    assert {p.dtype for p in model.codec.parameters()} == {torch.float32}
    audio = model.generate(["a"], duration=0.2, seed=0, prompt_audio=torch.randn(1, 3200) * 0.1)
    assert audio.dtype == torch.float32 and audio.shape == (1, 1, 6400)


def test_seeds_are_integers_in_range(model):
    codes = model.generate_codes(["a"], duration=0.1, seed=np.int64(3))
    assert torch.equal(codes, model.generate_codes(["a"], duration=0.1, seed=3))
    for seed in (2 ** 64, -1, "abc", 1.7, True):
        with pytest.raises(ValueError, match="seed must be"):
            model.generate_codes(["a"], duration=0.1, seed=seed)


def test_prompts_longer_than_the_window_or_the_duration_are_refused_before_encoding(model, monkeypatch):
    """audiocraft refuses a prompt longer than min(duration, 30 s); so do we, from its length in samples, before
    it is resampled and encoded (a sample rate of 1 would make one second of samples hours long)."""
    monkeypatch.setattr(model, "encode", lambda audio: pytest.fail("encoded a prompt that is too long"))
    with pytest.raises(ValueError, match=r"1550 frames \(31 s\): longer than the 1500 frames \(30 s\) to generate "
                                         r"in one window"):
        model.generate_codes(["a"], duration=40, prompt_audio=torch.zeros(1, 31 * 32000))
    with pytest.raises(ValueError, match=r"audio prompt is 800000 frames \(16000 s\): longer"):
        model.generate_codes(["a"], duration=1, prompt_audio=torch.zeros(1, 16000), prompt_sample_rate=1)


def test_extend_stride_is_checked_in_frames(model):
    for stride in (30, 30.5, 0.001, "5", 0):
        with pytest.raises(ValueError, match="extend_stride must be in"):
            model.generate_codes(["a"], duration=40, extend_stride=stride)


def test_encode_and_decode_check_what_they_get(model):
    K = model.cfg.lm.num_codebooks
    assert model.encode(torch.zeros(2, 1, 0)).shape == (2, K, 0)
    assert model.decode(torch.zeros(2, K, 0, dtype=torch.long)).shape == (2, 1, 0)
    codes = np.random.default_rng(0).integers(0, model.cfg.codec.codebook_size, (1, K, 5))
    assert torch.equal(model.decode(codes), model.decode(torch.from_numpy(codes)))
    with pytest.raises(ValueError, match="codes must be integers"):
        model.decode(torch.zeros(1, K, 5))
    with pytest.raises(ValueError, match="audio must hold float samples"):
        model.encode(torch.zeros(1, 1, 640, dtype=torch.int16))


def test_prompt_codes_are_checked(model):
    K, size = model.cfg.lm.num_codebooks, model.cfg.codec.codebook_size
    for codes, message in ((torch.zeros(1, K - 1, 5, dtype=torch.long), "must be \\(batch"),
                           (torch.full((1, K, 5), size), "must lie in"),
                           (torch.full((1, K, 5), -1), "must lie in"),
                           (torch.zeros(1, K, 5), "must be integers")):
        with pytest.raises(ValueError, match=message):
            model.new_request(["a"], duration=0.5, prompt_codes=codes)


def test_encode_text_takes_one_string_or_a_list(model):
    one, mask = model.encode_text("lofi beat")
    assert one.shape[0] == 1 and torch.equal(one, model.encode_text(["lofi beat"])[0])
    with pytest.raises(ValueError, match="at least one prompt"):
        model.encode_text([])


def test_stream_names_the_options_it_does_not_take(model):
    for option in ("extend_stride", "progress"):
        with pytest.raises(ValueError, match=f"stream\\(\\) takes no {option}"):
            next(model.stream(["a"], duration=0.2, **{option: 1}))


def test_unknown_device_is_one_error_before_reading(ckpt_dir, monkeypatch):
    monkeypatch.setattr(musicgen.checkpoint, "read_weights", lambda folder: pytest.fail("read the weights"))
    with pytest.raises(ValueError, match="unknown device 'bogus'"):
        musicgen.load(ckpt_dir, device="bogus")


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["decoder"].update(num_attention_heads=5), "does not split into 5 heads"),
    (lambda c: c["decoder"].update(num_attention_heads=0), "num_heads must be a positive integer"),
    (lambda c: c["decoder"].update(hidden_size="48"), "dim must be a positive integer"),
    (lambda c: c["audio_encoder"].update(sampling_rate=0), "sampling_rate must be a positive integer"),
    (lambda c: c["audio_encoder"].update(target_bandwidths=[]), "target_bandwidths must be positive"),
    (lambda c: c.update(decoder=None), "'decoder' is not a mapping"),
    (lambda c: c.clear() or c.update(x=[1, 2]), "no 'text_encoder' section"),
])
def test_config_values_of_the_wrong_kind_are_one_checkpoint_error(ckpt_dir, tmp_path, edit, message):
    folder = shutil.copytree(ckpt_dir, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        musicgen.load(folder)


def test_a_config_that_is_not_an_object_is_one_checkpoint_error(ckpt_dir, tmp_path):
    folder = shutil.copytree(ckpt_dir, tmp_path / "ckpt")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a MusicGen config"):
        musicgen.load(folder)


def test_a_model_pickles_and_its_copy_generates_the_same(model, spm_model):
    """pickle (torch.save(model), multiprocessing) works: the tokenizers pickle as their data, not as closures."""
    import pickle

    from musicgen.tokenizer import TextTokenizer

    copy = pickle.loads(pickle.dumps(model))
    assert torch.equal(copy.generate_codes(["lofi"], duration=0.2, seed=1),
                       model.generate_codes(["lofi"], duration=0.2, seed=1))
    sp = TextTokenizer._from_sentencepiece(spm_model)
    ids, mask = pickle.loads(pickle.dumps(sp))(["lofi beat", "a"])
    assert torch.equal(ids, sp(["lofi beat", "a"])[0]) and torch.equal(mask, sp(["lofi beat", "a"])[1])


def test_weights_in_torch_legacy_format_load(ckpt_dir, model, tmp_path):
    """A pytorch_model.bin written by torch < 1.6 (not a zip) cannot be memory-mapped: it is read whole."""
    folder = shutil.copytree(ckpt_dir, tmp_path / "legacy")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    legacy = musicgen.load(folder)
    assert torch.equal(legacy.generate_codes(["a"], duration=0.2, seed=0), model.generate_codes(["a"], duration=0.2, seed=0))


def test_inputs_of_the_wrong_kind_are_named(model):
    cases = [(dict(prompts=5), "prompts must be a string or a list of strings"),
             (dict(prompts=[b"lofi"]), "prompt 0 must be a string"),
             (dict(prompts=["a"], prompt_audio="song.wav"), "takes samples, not a file name"),
             (dict(prompts=["a"], prompt_audio=[0.0] * 3200), "is a list of numbers")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            model.generate_codes(duration=0.2, **kw)
    a = model.generate_codes(["a"], duration=0.2, seed=0, prompt_audio=torch.zeros(1, 3200),
                             prompt_sample_rate=np.int64(16000))
    b = model.generate_codes(["a"], duration=0.2, seed=0, prompt_audio=torch.zeros(1, 3200), prompt_sample_rate=16000)
    assert torch.equal(a, b)


def test_offline_with_only_the_config_cached_says_so(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE and a cache that holds a repo's config.json but not its weights: the error says the weights
    are not cached, not that the repo has none."""
    import huggingface_hub as hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    from musicgen import checkpoint

    (tmp_path / "config.json").write_text("{}")

    def cached_only_config(repo_id, filename, **kw):
        if filename == "config.json":
            return str(tmp_path / "config.json")
        raise LocalEntryNotFoundError(f"{filename} is not cached")
    monkeypatch.setattr(hub, "hf_hub_download", cached_only_config)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="weights are not in the Hugging Face cache and HF_HUB_OFFLINE"):
        checkpoint.resolve("facebook/musicgen-small")
