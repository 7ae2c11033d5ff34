"""audiocraft-format checkpoints (state_dict.bin + compression_state_dict.bin), built here key by key from random
transformers models, with the xp.cfg that audiocraft's solver keeps (a real omegaconf DictConfig, pickled) or its
export writes (that config as YAML); loaded back with equal logits, and a codec that follows the settings in its
xp.cfg exactly as transformers' EncodecModel configured the same way; `musicgen convert` both ways; bad files."""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

import musicgen
from musicgen import audiocraft_xp
from musicgen.checkpoint import CheckpointError
from musicgen.cli import main

PROMPTS = ["80s pop track with bassy drums and synth", "lofi"]

# The parts of audiocraft's solver configs that its builders read, with the layout, interpolations and some of
# the training-only keys around them (config/solver/compression/encodec_musicgen_32khz.yaml and
# config/model/encodec/default.yaml; config/solver/musicgen/*.yaml and config/model/lm/*.yaml), at our tiny shapes.
CODEC_YAML = """
device: cpu
sample_rate: 32000
channels: 1
compression_model: encodec
encodec:
  autoencoder: seanet
  quantizer: rvq
  sample_rate: ${sample_rate}
  channels: ${channels}
  causal: false
  renormalize: false
seanet:
  dimension: 16
  channels: ${channels}
  causal: ${encodec.causal}
  n_filters: 4
  n_residual_layers: 1
  ratios: [8, 5, 4, 4]
  activation: ELU
  activation_params: {"alpha": 1.}
  norm: weight_norm
  norm_params: {}
  kernel_size: 7
  residual_kernel_size: 3
  last_kernel_size: 7
  dilation_base: 2
  pad_mode: constant
  true_skip: true
  compress: 2
  lstm: 2
  disable_norm_outer_blocks: 0
  decoder:
    trim_right_ratio: 1.0
    final_activation: null
    final_activation_params: null
  encoder: {}
rvq:
  n_q: 4
  q_dropout: false
  bins: 64
  decay: 0.99
  kmeans_init: true
  kmeans_iters: 50
  threshold_ema_dead_code: 2
  orthogonal_reg_weight: 0.0
  orthogonal_reg_active_codes_only: false
dset: ???
optim:
  epochs: 200
  lr: 3e-4
  adam: {betas: [0.5, 0.9], weight_decay: 0.}
  ema:
    use: true
    decay: 0.99
    device: ${device}
dora:
  dir: /tmp/audiocraft_${oc.env:USER}/outputs
"""
LM_YAML = """
device: cpu
dtype: float32
sample_rate: 32000
channels: 1
compression_model_framerate: 50
lm_model: transformer_lm
codebooks_pattern:
  modeling: delay
  delay: {delays: [0, 1, 2, 3], flatten_first: 0, empty_initial: 0}
transformer_lm:
  dim: 48
  num_heads: 4
  num_layers: 2
  hidden_scale: 2
  n_q: 4
  card: 64
  dropout: 0.
  activation: gelu
  norm_first: true
  layer_scale: null
  positional_embedding: sin
  cross_attention: true
conditioners:
  description: {model: t5, t5: {name: t5-base, finetune: false, word_dropout: 0.3, normalize_text: false}}
classifier_free_guidance: {training_dropout: 0.3, inference_coef: 3.0}
dataset: {segment_duration: 30, batch_size: 192, sample_on_weight: false}
generate:
  lm:
    use_sampling: true
    top_k: 250
    max_gen_len: ${dataset.segment_duration}
"""


def solver_cfg(text: str, **changes) -> DictConfig:
    """A config as audiocraft's solver holds it: composed from YAML, interpolations unresolved, struct flag set
    (as Hydra's compose leaves it). `changes`: dotted key (with '__' for '.') -> value."""
    cfg = OmegaConf.create(text)
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    OmegaConf.set_struct(cfg, True)
    return cfg


def codec_cfg(enc, **changes) -> DictConfig:
    """audiocraft's compression config for the codec of transformers' EncodecConfig `enc`."""
    settings = dict(encodec__causal=enc.use_causal_conv, seanet__dimension=enc.hidden_size,
                    seanet__n_filters=enc.num_filters, seanet__n_residual_layers=enc.num_residual_layers,
                    seanet__ratios=list(enc.upsampling_ratios), seanet__kernel_size=enc.kernel_size,
                    seanet__residual_kernel_size=enc.residual_kernel_size,
                    seanet__last_kernel_size=enc.last_kernel_size, seanet__dilation_base=enc.dilation_growth_rate,
                    seanet__pad_mode=enc.pad_mode, seanet__true_skip=not enc.use_conv_shortcut,
                    seanet__compress=enc.compress, seanet__lstm=enc.num_lstm_layers,
                    seanet__decoder__trim_right_ratio=enc.trim_right_ratio, rvq__bins=enc.codebook_size)
    return solver_cfg(CODEC_YAML, **{**settings, **changes})


def lm_states(hf_model) -> dict:
    """transformers MusicGen decoder weights -> the LM's best_state under audiocraft's names."""
    lm, fused = {}, {}
    for name, t in hf_model.state_dict().items():
        if name.startswith(("audio_encoder.", "text_encoder.")):
            continue   # audiocraft keeps the codec in its own file and T5 out of its files
        t = t.clone()
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
    return lm


def codec_states(encodec) -> dict:
    """transformers EncodecModel weights -> the codec's best_state under audiocraft's names (weight_g / weight_v)."""
    from transformers.models.encodec.modeling_encodec import EncodecConvTranspose1d

    transposed = {n for n, m in encodec.named_modules() if isinstance(m, EncodecConvTranspose1d)}
    codec = {}
    for n, t in encodec.state_dict().items():
        m = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.(.*)$", n)
        if m:
            layer = f"{m.group(1)}.layers.{m.group(2)}"
            conv = "convtr.convtr" if layer in transposed else "conv.conv"
            rest = re.sub(r"(^|\.)conv\.", rf"\1{conv}.", m.group(3), count=1)
            rest = rest.replace("parametrizations.weight.original0", "weight_g")
            rest = rest.replace("parametrizations.weight.original1", "weight_v")
            n = f"{m.group(1)}.model.{m.group(2)}.{rest}"
        n = re.sub(r"^quantizer\.layers\.(\d+)\.codebook\.", r"quantizer.vq.layers.\1._codebook.", n)
        codec[n] = t.clone()
    return codec


def write_audiocraft(folder, hf_model, hf_folder, lm_xp, codec_xp, encodec=None, layout="export"):
    """The two files (and t5/). xp: a DictConfig is pickled as the solver keeps it, a string is stored as text.
    layout 'export': what audiocraft's export writes; 'solver': the solver's own checkpoint (best_state['model'],
    next to the training state)."""
    folder.mkdir(parents=True, exist_ok=True)
    for file, state, xp in (("state_dict.bin", lm_states(hf_model), lm_xp),
                            ("compression_state_dict.bin", codec_states(encodec or hf_model.audio_encoder), codec_xp)):
        if layout == "export":
            pkg = {"best_state": state, "xp.cfg": xp, "version": "1.3.0", "exported": True}
        else:
            pkg = {"best_state": {"model": state}, "fsdp_best_state": {}, "model": state, "xp.cfg": xp,
                   "xp.sig": "9a3c1f2e", "history": [{"train": {"loss": 3.1, "ce": 3.1}, "valid": {"ce": 3.4}}],
                   "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0, 1]}]}}
        torch.save(pkg, folder / file)
    hf_model.text_encoder.save_pretrained(folder / "t5")
    for name in ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_folder / name).is_file():
            shutil.copy(hf_folder / name, folder / "t5" / name)
    return folder


def as_stored(cfg: DictConfig, form: str):
    return OmegaConf.to_yaml(cfg) if form == "yaml" else cfg   # the export's text, or the solver's object


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


@pytest.mark.parametrize("form, layout", [("yaml", "export"), ("pickle", "export"), ("pickle", "solver")])
def test_audiocraft_files_load_with_equal_logits(tmp_path, hf_model, ckpt_dir, hf_tokenizer, form, layout):
    """The conftest model pads with reflect, so its xp.cfg says so."""
    codec_xp = codec_cfg(hf_model.config.audio_encoder)
    assert codec_xp.seanet.pad_mode == "reflect"
    folder = write_audiocraft(tmp_path / "ac", hf_model, ckpt_dir, as_stored(solver_cfg(LM_YAML), form),
                              as_stored(codec_xp, form), layout=layout)
    ours = musicgen.load(folder)
    assert ours.cfg.lm.num_heads == 4 and ours.cfg.codec.pad_mode == "reflect"
    assert_logits_equal(ours, hf_model, hf_tokenizer)


def test_a_pickled_config_is_read_as_inert_records(tmp_path, monkeypatch):
    """No omegaconf class is built from the pickle: its nodes come back as records of their state, then plain
    values with the interpolations resolved (a resolver call and a missing value stay as written)."""
    from omegaconf import BooleanNode, FloatNode, IntegerNode, StringNode

    cfg = solver_cfg(CODEC_YAML)
    typed = OmegaConf.create({"i": IntegerNode(3), "f": FloatNode(0.5), "s": StringNode("x"), "b": BooleanNode(True)})
    torch.save({"best_state": {}, "xp.cfg": cfg, "typed": typed}, tmp_path / "f.bin")
    pkg = audiocraft_xp.read_package(tmp_path / "f.bin")
    assert not isinstance(pkg["xp.cfg"], DictConfig)
    assert type(pkg["xp.cfg"]).__module__ == "musicgen.audiocraft_xp"
    xp = audiocraft_xp.xp_config(pkg, tmp_path / "f.bin")
    assert xp["encodec"]["sample_rate"] == 32000 and xp["seanet"]["causal"] is False
    assert xp["dset"] == "???" and xp["dora"]["dir"] == "/tmp/audiocraft_${oc.env:USER}/outputs"
    monkeypatch.setenv("USER", "someone")
    expected = OmegaConf.to_container(cfg, resolve=True)
    assert expected.pop("dora") != xp.pop("dora")
    assert xp == expected
    assert audiocraft_xp.xp_config({"xp.cfg": pkg["typed"]}, "f") == {"i": 3, "f": 0.5, "s": "x", "b": True}


def test_interpolations_resolve_like_omegaconf():
    cfg = {"a": 1, "b": "${a}", "c": {"d": "${b}", "e": "x${a}y${c.g.0}", "f": [10, "${c.g.0}"], "g": ["${a}"]}}
    odd = {"loop": "${loop}", "nowhere": "${x.y}", "env": "${oc.env:HOME}"}
    resolved = audiocraft_xp.xp_config({"xp.cfg": {**copy.deepcopy(cfg), **odd}}, "f")
    expected = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    assert {k: v for k, v in resolved.items() if k in cfg} == expected
    assert resolved["c"]["e"] == "x1y1" and {k: resolved[k] for k in odd} == odd


@pytest.fixture(scope="module")
def constant_codec(hf_model):
    """hf_model's codec weights in a transformers EncodecModel that pads with zeros, as audiocraft's EnCodec does."""
    from transformers import EncodecModel

    config = copy.deepcopy(hf_model.config.audio_encoder)
    config.pad_mode = "constant"
    encodec = EncodecModel(config).eval()
    encodec.load_state_dict(hf_model.audio_encoder.state_dict())
    return encodec


def codec_outputs(ours, audio, codes):
    """(codes, audio) of our codec: the fast CPU path, the layer-by-layer modules, and the streaming decoder."""
    from musicgen.streaming import StreamingDecoder

    codec = ours.codec
    with torch.inference_mode():
        fast = codec.encode(audio), codec.decode(codes)
        modules = (codec.quantizer.encode(codec.encoder.reference(audio)),
                   codec.decoder.reference(codec.quantizer.decode(codes)))
        stream = StreamingDecoder(codec)
        streamed = torch.cat([stream.push(codes[..., :9]), stream.push(codes[..., 9:], final=True)], dim=-1)
    return {"fast": fast, "modules": modules, "streamed": (fast[0], streamed)}


def reference_outputs(encodec, audio):
    with torch.no_grad():
        codes = encodec.encode(audio).audio_codes[0]
        return codes, encodec.decode(codes[None], [None]).audio_values


AUDIO = 0.3 * torch.randn(2, 1, 31 * 640 - 77, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("form", ["yaml", "pickle"])
def test_constant_padding_from_xp_cfg_matches_transformers(tmp_path, hf_model, ckpt_dir, constant_codec, form):
    """xp.cfg says seanet.pad_mode: constant: codes equal to transformers' EncodecModel(pad_mode="constant") with
    the same weights, audio to float rounding, on every codec path. The same files read as reflect padding (what
    the loader did before it read the setting) give other audio, so the comparison can tell."""
    folder = write_audiocraft(tmp_path / "ac", hf_model, ckpt_dir, as_stored(solver_cfg(LM_YAML), form),
                              as_stored(codec_cfg(constant_codec.config), form))
    ours = musicgen.load(folder)
    assert ours.cfg.codec.pad_mode == "constant"
    codes, audio = reference_outputs(constant_codec, AUDIO)
    for path, (our_codes, our_audio) in codec_outputs(ours, AUDIO, codes).items():
        assert torch.equal(our_codes, codes), path
        torch.testing.assert_close(our_audio, audio, atol=2e-5 * audio.abs().max().item(), rtol=0, msg=path)

    reflect = write_audiocraft(tmp_path / "reflect", hf_model, ckpt_dir, solver_cfg(LM_YAML),
                               codec_cfg(constant_codec.config, seanet__pad_mode="reflect"))
    for path, (_, our_audio) in codec_outputs(musicgen.load(reflect), AUDIO, codes).items():
        assert (our_audio - audio).abs().max() > 1e-3 * audio.abs().max(), path


@pytest.mark.parametrize("variant", [
    dict(use_causal_conv=True, trim_right_ratio=0.5, pad_mode="constant"),
    dict(num_residual_layers=2, dilation_growth_rate=3, residual_kernel_size=5, compress=4, use_conv_shortcut=True,
         kernel_size=5, last_kernel_size=3, num_lstm_layers=1, pad_mode="replicate"),
], ids=["causal-trim", "dilated-shortcut-replicate"])
def test_other_codec_settings_from_xp_cfg_match_transformers(tmp_path, hf_model, ckpt_dir, variant):
    """Every SEANet setting the loader reads changes the result the way transformers' EnCodec with the same
    setting does (random weights; the causal flag comes through the ${encodec.causal} interpolation)."""
    from transformers import EncodecModel

    config = copy.deepcopy(hf_model.config.audio_encoder)
    for key, value in variant.items():
        setattr(config, key, value)
    torch.manual_seed(1)
    encodec = EncodecModel(config).eval()
    with torch.no_grad():
        for layer in encodec.quantizer.layers:
            layer.codebook.embed.normal_()
    xp = codec_cfg(config)
    assert OmegaConf.to_container(xp.seanet)["causal"] == "${encodec.causal}"
    folder = write_audiocraft(tmp_path / "ac", hf_model, ckpt_dir, solver_cfg(LM_YAML), xp, encodec=encodec)
    ours = musicgen.load(folder)
    codes, audio = reference_outputs(encodec, AUDIO)
    for path, (our_codes, our_audio) in codec_outputs(ours, AUDIO, codes).items():
        assert torch.equal(our_codes, codes), path
        torch.testing.assert_close(our_audio, audio, atol=2e-5 * audio.abs().max().item(), rtol=0, msg=path)


@pytest.mark.parametrize("change, message", [
    (dict(seanet__norm="time_group_norm"), "seanet.norm = 'time_group_norm'; only weight_norm"),
    (dict(seanet__norm="spectral_norm"), "seanet.norm = 'spectral_norm'"),
    (dict(seanet__pad_mode="circular"), "seanet.pad_mode = 'circular'; supported: constant, reflect, replicate"),
    (dict(seanet__activation="LeakyReLU"), "seanet.activation = 'LeakyReLU'"),
    (dict(seanet__activation_params={"alpha": 0.5}), "seanet.activation_params"),
    (dict(seanet__decoder__final_activation="Tanh"), "seanet.decoder.final_activation = 'Tanh'"),
    (dict(seanet__decoder__pad_mode="reflect"), "seanet.decoder.pad_mode = 'reflect'; the encoder's is 'constant'"),
    (dict(seanet__lstm=0), "seanet.lstm = 0"),
    (dict(seanet__kernel_size="seven"), "seanet.kernel_size = 'seven', expected int"),
    (dict(seanet__causal="${nowhere}"), "seanet.causal = '${nowhere}', expected bool"),
    (dict(seanet__new_option=1), "seanet.new_option = 1; not a SEANet setting"),
    (dict(encodec__renormalize=True), "encodec.renormalize = True"),
    (dict(encodec__quantizer="no_quant"), "encodec.quantizer = 'no_quant'"),
    (dict(compression_model="dac"), "compression_model = 'dac'"),
    (dict(rvq__input_dimension=32), "rvq.input_dimension = 32; not a quantiser setting"),
])
def test_unsupported_codec_settings_are_named(change, message):
    xp = audiocraft_xp.xp_config({"xp.cfg": OmegaConf.to_yaml(solver_cfg(CODEC_YAML, **change))}, "f")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        audiocraft_xp.codec_settings(xp, "f")


@pytest.mark.parametrize("change, message", [
    (dict(seanet__n_filters=32), "xp.cfg's seanet.n_filters means num_filters = 32, but the weights have 4"),
    (dict(seanet__ratios=[8, 5, 4, 2]), "seanet.ratios means ratios = (8, 5, 4, 2), but the weights have (8, 5, 4, 4)"),
    (dict(seanet__true_skip=False), "seanet.true_skip means use_conv_shortcut = True, but the weights have False"),
    (dict(rvq__bins=2048), "rvq.bins means codebook_size = 2048"),
])
def test_settings_that_contradict_the_weights_are_named(tmp_path, hf_model, ckpt_dir, change, message):
    folder = write_audiocraft(tmp_path / "ac", hf_model, ckpt_dir, solver_cfg(LM_YAML),
                              codec_cfg(hf_model.config.audio_encoder, **change))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        musicgen.load(folder)


def test_convert_both_ways(tmp_path, hf_model, ckpt_dir, hf_tokenizer, model):
    mask = os.umask(0o027)
    try:
        assert main(["convert", str(ckpt_dir), str(tmp_path / "ac")]) == 0
    finally:
        os.umask(mask)
    # the weights with the mode open() gives under the umask, although safetensors writes its files 0600
    weights = [p for p in (tmp_path / "ac").rglob("*") if p.suffix in (".safetensors", ".bin")]
    assert len(weights) == 3 and all(p.stat().st_mode & 0o777 == 0o640 for p in weights)
    ac = musicgen.load(tmp_path / "ac")
    assert_logits_equal(ac, hf_model, hf_tokenizer)
    assert main(["convert", str(tmp_path / "ac"), str(tmp_path / "hf")]) == 0
    back = musicgen.load(tmp_path / "hf")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
    same_dim = dict(codebook_dim=None)   # None means hidden_size, which transformers writes out
    assert dataclasses.replace(back.cfg.codec, **same_dim) == dataclasses.replace(model.cfg.codec, **same_dim)
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


def test_convert_carries_the_codec_settings(tmp_path, hf_model, ckpt_dir, constant_codec, monkeypatch):
    """audiocraft (xp.cfg seanet.pad_mode constant) -> Hugging Face (config.json pad_mode, which transformers
    follows) -> audiocraft again (xp.cfg written in full, as audiocraft's EnCodec builder reads it)."""
    import json

    from transformers import MusicgenForConditionalGeneration

    src = write_audiocraft(tmp_path / "ac", hf_model, ckpt_dir, solver_cfg(LM_YAML), codec_cfg(constant_codec.config))
    assert main(["convert", str(src), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["audio_encoder"]["pad_mode"] == "constant"
    hf = MusicgenForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    codes, audio = reference_outputs(constant_codec, AUDIO)
    assert torch.equal(reference_outputs(hf.audio_encoder, AUDIO)[0], codes)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ac2")]) == 0
    pkg = audiocraft_xp.read_package(tmp_path / "ac2" / "compression_state_dict.bin")
    assert set(pkg["best_state"]) == set(codec_states(constant_codec))   # all that audiocraft's strict load wants
    xp = audiocraft_xp.xp_config(pkg, "f")
    monkeypatch.setenv("USER", "someone")
    expected = OmegaConf.to_container(codec_cfg(constant_codec.config), resolve=True)
    for section in ("encodec", "seanet", "rvq"):
        assert {k: v for k, v in xp[section].items() if k in expected[section]} == \
            {k: v for k, v in expected[section].items() if k in xp[section]}, section
    assert xp["compression_model"] == "encodec" and xp["seanet"]["pad_mode"] == "constant"
    again = musicgen.load(tmp_path / "ac2")
    assert again.cfg.codec == musicgen.load(src).cfg.codec
    assert torch.equal(codec_outputs(again, AUDIO, codes)["fast"][0], codes)


def test_missing_t5_is_explained(tmp_path, hf_model, ckpt_dir):
    folder = write_audiocraft(tmp_path / "ac", hf_model, ckpt_dir, LM_YAML, OmegaConf.to_yaml(codec_cfg(
        hf_model.config.audio_encoder)))
    shutil.rmtree(folder / "t5")
    with pytest.raises(CheckpointError, match="does not include the T5 text encoder"):
        musicgen.load(folder)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all", "not a torch checkpoint"),
    ("os.system beside a DictConfig", r"refusing to unpickle it \((posix|nt)\.system\)"),
    ("os.system as the config", r"refusing to unpickle it \((posix|nt)\.system\)"),
    ("omegaconf's own code", r"refusing to unpickle it \(omegaconf\.omegaconf\.OmegaConf\)"),
    ({"weights": torch.zeros(1)}, "not an audiocraft checkpoint"),
    ({"best_state": {"x": torch.zeros(1)}, "xp.cfg": "a: [1"}, "xp.cfg is not valid YAML"),
    ({"pretrained": "facebook/encodec_32khz", "exported": True}, r"only names a pretrained model \(facebook/"),
])
def test_bad_audiocraft_files(tmp_path, hf_model, ckpt_dir, content, message):
    """Only tensors, plain containers and an omegaconf config's own classes are unpickled: a callable that a
    pickle names (os.system through __reduce__) is refused before it can run, even next to a real DictConfig."""
    folder = write_audiocraft(tmp_path / "ac", hf_model, ckpt_dir, solver_cfg(LM_YAML),
                              codec_cfg(hf_model.config.audio_encoder))
    f = folder / "compression_state_dict.bin"
    marker = tmp_path / "pwned"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content == "os.system beside a DictConfig":
        torch.save({"best_state": {}, "xp.cfg": solver_cfg(CODEC_YAML), "hook": Evil(marker)}, f)
    elif content == "os.system as the config":
        torch.save({"best_state": {}, "xp.cfg": Evil(marker)}, f)
    elif content == "omegaconf's own code":
        torch.save({"best_state": {}, "xp.cfg": OmegaConf}, f)
    else:
        torch.save(content, f)
    with pytest.raises(CheckpointError, match=message):
        musicgen.load(folder)
    assert not marker.exists()


def test_a_converted_melody_model_keeps_its_chroma_length(melody_ckpt_dir, melody_model, tmp_path):
    """The chroma window travels in xp.cfg as audiocraft keeps it (dataset.segment_duration, read as its
    ChromaStemConditioner reads it): a custom melody model converted both ways keeps its codes."""
    from musicgen.audiocraft_format import melody_config

    assert main(["convert", str(melody_ckpt_dir), str(tmp_path / "ac")]) == 0
    ac = musicgen.load(tmp_path / "ac")
    assert ac.cfg.melody == melody_model.cfg.melody and melody_model.cfg.melody.chroma_length != 235
    assert ac.cfg.max_duration == melody_model.cfg.max_duration == 30   # the window too, though the chroma
    assert main(["convert", str(tmp_path / "ac"), str(tmp_path / "hf")]) == 0   # length is not 30 s's
    assert musicgen.load(tmp_path / "hf").cfg.max_duration == 30
    tune = torch.sin(torch.arange(16000) / 16000 * 2 * torch.pi * 330.0)[None]
    kw = dict(duration=0.3, top_k=1, melody=tune, melody_sample_rate=16000, demucs=False)
    assert torch.equal(ac.generate_codes(["folk"], **kw), melody_model.generate_codes(["folk"], **kw))
    assert melody_config({"dataset": {"segment_duration": 30}}).chroma_length == 235   # musicgen-melody's
    assert melody_config({}).chroma_length == 235


def test_the_window_is_the_checkpoint_s_segment_duration(tmp_path, hf_model, ckpt_dir, monkeypatch):
    """audiocraft generates in windows of dataset.segment_duration (BaseGenModel.max_duration): a fine-tune on
    0.4 s segments decodes 0.6 s as two 20-frame windows strided by extend_stride, and keeps that window through
    conversions both ways."""
    codec_xp = codec_cfg(hf_model.config.audio_encoder)
    folder = write_audiocraft(tmp_path / "ac", hf_model, ckpt_dir,
                              as_stored(solver_cfg(LM_YAML, dataset__segment_duration=0.4), "yaml"),
                              as_stored(codec_xp, "yaml"))
    ours = musicgen.load(folder)
    assert ours.cfg.max_duration == 0.4 and ours.window_frames == 20
    windows, request = [], ours._request
    monkeypatch.setattr(ours, "_request", lambda job, known, frames, melodies:
                        windows.append((known.shape[-1], frames)) or request(job, known, frames, melodies))
    codes = ours.generate_codes(["lofi"], duration=0.6, extend_stride=0.2, top_k=1)
    assert codes.shape[-1] == 30 and windows == [(0, 20), (10, 20)]   # the second starts from the last 10 frames
    with pytest.raises(ValueError, match=r"extend_stride must be in \(0, 0.4\)"):
        ours.generate_codes(["lofi"], duration=0.6, extend_stride=0.5)
    with pytest.raises(ValueError, match="one 0.4 s window"):
        ours.new_request(["lofi"], duration=0.6)
    assert main(["convert", str(folder), str(tmp_path / "hf")]) == 0
    assert musicgen.load(tmp_path / "hf").cfg.max_duration == 0.4
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ac2")]) == 0
    assert musicgen.load(tmp_path / "ac2").cfg.max_duration == 0.4
    assert musicgen.load(ckpt_dir).cfg.max_duration == 30.0              # the published window, by default
