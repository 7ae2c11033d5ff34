"""audiocraft-format checkpoints (state_dict.bin + compression_state_dict.bin), built here key by key from a
random transformers model, loaded back with equal logits; `musicgen convert` both ways; bad files."""
from __future__ import annotations

import re
import shutil
import sys
import types

import pytest
import torch

import musicgen
from musicgen.checkpoint import CheckpointError
from musicgen.cli import main

PROMPTS = ["80s pop track with bassy drums and synth", "lofi"]


def audiocraft_states(hf_model) -> tuple[dict, dict]:
    """transformers MusicGen weights -> (LM best_state, EnCodec best_state) under audiocraft's names."""
    from transformers.models.encodec.modeling_encodec import EncodecConvTranspose1d

    transposed = {n for n, m in hf_model.audio_encoder.named_modules() if isinstance(m, EncodecConvTranspose1d)}
    lm, codec, fused = {}, {}, {}
    for name, t in hf_model.state_dict().items():
        t = t.clone()
        if name.startswith("audio_encoder."):
            n = name.removeprefix("audio_encoder.")
            m = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.(.*)$", n)
            if m:
                layer = f"{m.group(1)}.layers.{m.group(2)}"
                conv = "convtr.convtr" if layer in transposed else "conv.conv"
                rest = re.sub(r"(^|\.)conv\.", rf"\1{conv}.", m.group(3), count=1)
                rest = rest.replace("parametrizations.weight.original0", "weight_g")
                rest = rest.replace("parametrizations.weight.original1", "weight_v")
                n = f"{m.group(1)}.model.{m.group(2)}.{rest}"
            n = re.sub(r"^quantizer\.layers\.(\d+)\.codebook\.", r"quantizer.vq.layers.\1._codebook.", n)
            codec[n] = t
            continue
        if name.startswith("text_encoder."):
            continue   # audiocraft keeps T5 out of its files
        m = re.match(r"^decoder\.model\.decoder\.layers\.(\d+)\.(self_attn|encoder_attn)\.(q|k|v)_proj\.weight$", name)
        if m:
            fused.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = t
            continue
        for pattern, repl in [(r"^decoder\.model\.decoder\.embed_tokens\.", "emb."), (r"^decoder\.lm_heads\.", "linears."),
                              (r"^decoder\.model\.decoder\.layer_norm\.", "out_norm."),
                              (r"^enc_to_dec_proj\.", "condition_provider.conditioners.description.output_proj."),
                              (r"^decoder\.model\.decoder\.layers\.", "transformer.layers."),
                              (r"\.self_attn_layer_norm\.", ".norm1."), (r"\.encoder_attn_layer_norm\.", ".norm_cross."),
                              (r"\.final_layer_norm\.", ".norm2."), (r"\.encoder_attn\.out_proj\.", ".cross_attention.out_proj."),
                              (r"\.fc1\.", ".linear1."), (r"\.fc2\.", ".linear2.")]:
            name = re.sub(pattern, repl, name)
        if "embed_positions" not in name:
            lm[name] = t
    for (i, kind), p in fused.items():
        target = "self_attn" if kind == "self_attn" else "cross_attention"
        lm[f"transformer.layers.{i}.{target}.in_proj_weight"] = torch.cat([p["q"], p["k"], p["v"]])
    return lm, codec


XP = {"sample_rate": 32000, "channels": 1, "transformer_lm": {"num_heads": 4, "activation": "gelu"}}


def fake_omegaconf_pickle(cfg: dict):
    """An object that pickles like omegaconf's DictConfig (classes from omegaconf.* modules, state in _content)."""
    mod = types.ModuleType("omegaconf.dictconfig")
    nodes = types.ModuleType("omegaconf.nodes")

    class DictConfig:
        def __init__(self, content):
            self._content = content

        def __getstate__(self):
            return {"_content": self._content, "_metadata": None}

    class AnyNode:
        def __init__(self, val):
            self._val = val

        def __getstate__(self):
            return {"_val": self._val}

    DictConfig.__module__, AnyNode.__module__ = "omegaconf.dictconfig", "omegaconf.nodes"
    DictConfig.__qualname__, AnyNode.__qualname__ = "DictConfig", "AnyNode"
    mod.DictConfig, nodes.AnyNode = DictConfig, AnyNode

    def wrap(x):
        return DictConfig({k: wrap(v) for k, v in x.items()}) if isinstance(x, dict) else AnyNode(x)

    return wrap(cfg), {"omegaconf": types.ModuleType("omegaconf"), "omegaconf.dictconfig": mod, "omegaconf.nodes": nodes}


def write_audiocraft(hf_model, hf_folder, folder, xp_cfg):
    from transformers import T5EncoderModel  # noqa: F401  (the T5 folder is transformers' own save)

    folder.mkdir(parents=True, exist_ok=True)
    lm, codec = audiocraft_states(hf_model)
    modules = {}
    if xp_cfg == "omegaconf":
        xp_cfg, modules = fake_omegaconf_pickle(XP)
    saved = {k: sys.modules.get(k) for k in modules}
    sys.modules.update(modules)
    try:
        torch.save({"best_state": lm, "xp.cfg": xp_cfg, "version": "1.0.0", "exported": True}, folder / "state_dict.bin")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k)
            else:
                sys.modules[k] = v
    torch.save({"best_state": codec, "xp.cfg": "sample_rate: 32000\n"}, folder / "compression_state_dict.bin")
    hf_model.text_encoder.save_pretrained(folder / "t5")
    for name in ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_folder / name).is_file():
            shutil.copy(hf_folder / name, folder / "t5" / name)
    return folder


def assert_logits_equal(ours, hf_model, hf_tokenizer):
    inputs = hf_tokenizer(PROMPTS, padding=True, return_tensors="pt")
    codes = torch.randint(0, 65, (2, 4, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf_model(**inputs, decoder_input_ids=codes.reshape(8, 7)).logits.reshape(2, 4, 7, -1)
    states, mask = ours.encode_text(PROMPTS)
    with torch.inference_mode():
        logits = ours.lm(codes, ours.lm.cross_kv(states), ours.lm.cross_bias(mask, states.dtype))
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    audio = 0.3 * torch.randn(1, 1, 6400, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours.encode(audio), hf_model.audio_encoder.encode(audio).audio_codes[0])


@pytest.mark.parametrize("xp_cfg", [XP, "sample_rate: 32000\nchannels: 1\ntransformer_lm:\n  num_heads: 4\n",
                                    "omegaconf"], ids=["dict", "yaml", "pickled-omegaconf"])
def test_audiocraft_files_load_with_equal_logits(tmp_path, hf_model, ckpt_dir, hf_tokenizer, xp_cfg):
    folder = write_audiocraft(hf_model, ckpt_dir, tmp_path / "ac", xp_cfg)
    assert "omegaconf.dictconfig" not in sys.modules
    ours = musicgen.load(folder)
    assert ours.cfg.lm.num_heads == 4
    assert_logits_equal(ours, hf_model, hf_tokenizer)


def test_convert_both_ways(tmp_path, hf_model, ckpt_dir, hf_tokenizer, model):
    assert main(["convert", str(ckpt_dir), str(tmp_path / "ac")]) == 0
    ac = musicgen.load(tmp_path / "ac")
    assert_logits_equal(ac, hf_model, hf_tokenizer)
    assert main(["convert", str(tmp_path / "ac"), str(tmp_path / "hf")]) == 0
    back = musicgen.load(tmp_path / "hf")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
    assert main(["convert", str(ckpt_dir), str(tmp_path / "ac")]) == 2        # not empty, no --force
    # the converted Hugging Face folder is one transformers itself loads, with the original weights
    from transformers import MusicgenForConditionalGeneration

    reloaded, info = MusicgenForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref = hf_model.state_dict()
    for k, v in reloaded.state_dict().items():
        if k.endswith(("cluster_size", "embed_avg")):   # codebook EMA state of EnCodec training, not inference
            continue
        torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=1e-5, msg=k)


def test_missing_t5_is_explained(tmp_path, hf_model, ckpt_dir):
    folder = write_audiocraft(hf_model, ckpt_dir, tmp_path / "ac", XP)
    shutil.rmtree(folder / "t5")
    with pytest.raises(CheckpointError, match="does not include the T5 text encoder"):
        musicgen.load(folder)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all", "not a torch checkpoint"),
    ("pickle", "refusing to unpickle"),
    ({"weights": torch.zeros(1)}, "not an audiocraft checkpoint"),
])
def test_bad_audiocraft_files(tmp_path, hf_model, ckpt_dir, content, message):
    folder = write_audiocraft(hf_model, ckpt_dir, tmp_path / "ac", XP)
    f = folder / "state_dict.bin"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content == "pickle":
        torch.save({"best_state": {}, "xp.cfg": Evil()}, f)
    else:
        torch.save(content, f)
    with pytest.raises(CheckpointError, match=message):
        musicgen.load(folder)
