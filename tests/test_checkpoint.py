"""Checkpoint formats and the errors a user sees when one is wrong."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import musicgen
from musicgen.checkpoint import CheckpointError


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_safetensors_and_bin_load_equal(ckpt_dir, tmp_path, model):
    state = load_file(str(ckpt_dir / "model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    sharded = copy_ckpt(ckpt_dir, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(sharded / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))

    binary = copy_ckpt(ckpt_dir, tmp_path / "bin")
    (binary / "model.safetensors").unlink()
    torch.save(state, binary / "pytorch_model.bin")

    ref = model.state_dict()
    for folder in (sharded, binary):
        got = musicgen.load(folder).state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_bin_with_pickled_code_is_refused(ckpt_dir, tmp_path):
    bad = copy_ckpt(ckpt_dir, tmp_path / "evil")
    (bad / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        musicgen.load(bad)


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        musicgen.load(tmp_path / "empty")


def test_missing_weights(ckpt_dir, tmp_path):
    folder = copy_ckpt(ckpt_dir, tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing weights"):
        musicgen.load(folder)


def test_missing_tokenizer(ckpt_dir, tmp_path):
    folder = copy_ckpt(ckpt_dir, tmp_path / "notok")
    for name in ("tokenizer.json", "spiece.model"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="tokenizer"):
        musicgen.load(folder)


def test_weight_with_wrong_shape_is_named(ckpt_dir, tmp_path):
    folder = copy_ckpt(ckpt_dir, tmp_path / "shape")
    state = load_file(str(folder / "model.safetensors"))
    state["decoder.lm_heads.2.weight"] = torch.zeros(3, 3)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lm\.heads\.2\.weight.*shape"):
        musicgen.load(folder)


def test_missing_and_unexpected_weights_are_named(ckpt_dir, tmp_path):
    folder = copy_ckpt(ckpt_dir, tmp_path / "names")
    state = load_file(str(folder / "model.safetensors"))
    del state["decoder.model.decoder.layer_norm.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lm\.norm\.weight.*missing"):
        musicgen.load(folder)
    state = load_file(str(ckpt_dir / "model.safetensors"))
    state["decoder.model.decoder.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected weight 'decoder.model.decoder.extra.weight'"):
        musicgen.load(folder)


def test_config_that_is_not_musicgen(ckpt_dir, tmp_path):
    folder = copy_ckpt(ckpt_dir, tmp_path / "bert")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not a MusicGen"):
        musicgen.load(folder)


def test_unknown_model_names(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="unknown model"):
        musicgen.load("not a model name")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="not in the cache"):
        musicgen.load("facebook/musicgen-small")


def test_hub_id_served_from_cache(ckpt_dir, tmp_path, monkeypatch):
    """A hub id whose files are in the huggingface_hub cache loads offline, through the real cache layout."""
    import huggingface_hub.constants as c

    cache = tmp_path / "cache"
    repo = cache / "models--facebook--musicgen-tiny"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    shutil.copytree(ckpt_dir, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    m = musicgen.load("facebook/musicgen-tiny")
    assert m.sample_rate == 32000


def test_bad_dtype(ckpt_dir):
    with pytest.raises(ValueError, match="dtype"):
        musicgen.load(ckpt_dir, dtype="int3")


def test_released_pages_keep_their_values(tmp_path):
    """checkpoint.release only hints the OS to page memory out: file-backed (safetensors) and anonymous tensors
    read back the same afterwards (an advice that discards pages, like MADV_DONTNEED, would zero them)."""
    from musicgen.checkpoint import release

    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(512, 1024, generator=g), "b": torch.randn(3, 5, generator=g)}
    save_file(weights, tmp_path / "w.safetensors")
    mapped = load_file(tmp_path / "w.safetensors")
    anonymous = torch.randn(1024, 1024, generator=g)
    before = anonymous.clone()
    for t in (mapped["a"], mapped["b"], anonymous, anonymous[1:, 3:]):
        release(t)
    assert torch.equal(mapped["a"], weights["a"]) and torch.equal(mapped["b"], weights["b"])
    assert torch.equal(anonymous, before)


def _resident_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (4096 // 1024)


def _in_page_cache(tensor) -> float:
    """Fraction of the tensor's whole pages that mincore reports in memory (for a file mapping: the page
    cache, whether or not this process maps them now)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    vec = ctypes.create_string_buffer((end - start) // page)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vec) == 0
    return sum(b & 1 for b in vec.raw) / len(vec.raw)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")
def test_released_checkpoint_pages_leave_the_process_but_stay_cached(tmp_path):
    """Tensors read from a checkpoint file are unmapped (resident memory falls by their size) but stay in the
    page cache, so the next load reads memory, not the disk; their values read back unchanged. Anonymous
    memory is only paged out (MADV_DONTNEED would zero it)."""
    from musicgen.checkpoint import read_weights, release

    g = torch.Generator().manual_seed(0)
    weights = {"model.a": torch.randn(4096, 1024, generator=g), "model.b": torch.randn(3, 5, generator=g)}
    save_file(weights, tmp_path / "model.safetensors")
    with open(tmp_path / "model.safetensors", "rb+") as f:
        os.fsync(f.fileno())                   # clean pages, as a downloaded checkpoint's are: evictable
    state = read_weights(tmp_path)
    assert float(state["model.a"].sum()) == float(weights["model.a"].sum())      # touch every page
    before = _resident_kb()
    release(state["model.a"])
    dropped = before - _resident_kb()
    assert dropped > 0.8 * 16 * 1024                                               # 16 MB of float32
    assert _in_page_cache(state["model.a"]) > 0.9
    assert torch.equal(state["model.a"], weights["model.a"]) and torch.equal(state["model.b"], weights["model.b"])
    anonymous = torch.randn(1024, 1024, generator=g)
    kept = anonymous.clone()
    release(anonymous)
    assert torch.equal(anonymous, kept)


def test_a_file_range_whose_tensors_are_gone_is_forgotten(tmp_path):
    """Once every tensor read from a file is gone its mapping is too, and anonymous memory may take the same
    addresses: release must then not treat them as file pages (which would zero them)."""
    import gc

    from musicgen import checkpoint

    save_file({"x": torch.randn(1024, 1024)}, tmp_path / "model.safetensors")
    state = checkpoint.read_weights(tmp_path)
    start = state["x"].data_ptr()
    assert checkpoint._in_file_mapping(start // 4096 * 4096 + 4096, start // 4096 * 4096 + 8192)
    del state
    gc.collect()
    assert not checkpoint._in_file_mapping(start // 4096 * 4096 + 4096, start // 4096 * 4096 + 8192)


@pytest.mark.parametrize("kw", [{}, {"quantize": "int4"}, {"dtype": "bfloat16"}])
def test_load_and_generate_import_no_compiler(ckpt_dir, melody_ckpt_dir, kw):
    """A model built on the meta device skips work that imports torch._dynamo (random init, the position
    table): that import alone was 0.8 s of every load, and generating needs none of it."""
    code = (f"import sys, musicgen\n"
            f"for folder in ({str(ckpt_dir)!r}, {str(melody_ckpt_dir)!r}):\n"
            f"    m = musicgen.load(folder, **{kw!r})\n"
            f"    m.generate('lofi', duration=0.2, seed=0)\n"
            f"assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_modules_built_off_the_meta_device_keep_their_init():
    from musicgen.config import preset
    from musicgen.lm import MusicLM, sinusoids

    torch.manual_seed(0)
    lm = MusicLM(preset("debug").lm)
    assert torch.equal(lm.positions, sinusoids(*lm.positions.shape))
    assert 0.5 < lm.embed[0].weight.std().item() < 1.5   # nn.Embedding's N(0, 1) init, not empty memory
