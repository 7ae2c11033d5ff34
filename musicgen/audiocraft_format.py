"""The checkpoint format audiocraft publishes: state_dict.bin (LM) + compression_state_dict.bin (EnCodec).

    state_dict.bin               {'best_state': LM tensors, 'xp.cfg': YAML text (or a pickled omegaconf config)}
    compression_state_dict.bin   {'best_state': EnCodec tensors (weight norm as weight_g / weight_v), 'xp.cfg'}
    t5/                          not part of audiocraft's files: the T5 encoder in the Hugging Face format

Both files are read with `torch.load(weights_only=True)`; nothing is unpickled beyond tensors, plain containers
and inert records of an omegaconf config (audiocraft_xp.py). The architecture comes from the tensor shapes and
the xp.cfg of each file: the LM's gives the head count, channels and activation (else head dim 64, mono, GELU);
the codec's gives every SEANet and quantiser setting (padding, causality, dilation, ...), checked against the
shapes where they tell the same thing. audiocraft loads T5 by name (t5-base) from the hub rather than storing
it, so a `t5` folder holding a Hugging Face T5 encoder must sit beside the two files (`musicgen convert`
writes one).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from . import audiocraft_xp as xpcfg
from .checkpoint import CheckpointError
from .chroma import CHROMA_SAMPLE_RATE
from .config import MAX_DURATION, CodecConfig, LMConfig, MelodyConfig, MusicGenConfig, T5Config

LM_FILE, CODEC_FILE, T5_FOLDER = "state_dict.bin", "compression_state_dict.bin", "t5"


def is_audiocraft(folder: Path) -> bool:
    return (Path(folder) / LM_FILE).is_file()


# -- audiocraft names <-> ours ----------------------------------------------------------------------------
_LM = [(r"^emb\.(\d+)\.", r"lm.embed.\1."), (r"^linears\.(\d+)\.", r"lm.heads.\1."), (r"^out_norm\.", "lm.norm."),
       (r"^transformer\.layers\.(\d+)\.self_attn\.in_proj_weight$", r"lm.layers.\1.self_attn.qkv.weight"),
       (r"^transformer\.layers\.(\d+)\.self_attn\.out_proj\.", r"lm.layers.\1.self_attn.out."),
       (r"^transformer\.layers\.(\d+)\.cross_attention\.out_proj\.", r"lm.layers.\1.cross_attn.out."),
       (r"^transformer\.layers\.(\d+)\.(norm1|norm2|norm_cross)\.", r"lm.layers.\1.\2."),
       (r"^transformer\.layers\.(\d+)\.linear(1|2)\.", r"lm.layers.\1.fc\2."),
       (r"^condition_provider\.conditioners\.description\.output_proj\.", "text_proj."),
       (r"^condition_provider\.conditioners\.self_wav\.output_proj\.", "chroma_proj.")]
_CROSS_IN = re.compile(r"^transformer\.layers\.(\d+)\.cross_attention\.in_proj_weight$")
_CODEC = [(r"^(encoder|decoder)\.model\.", r"codec.\1.layers."), (r"\.conv\.conv\.", ".conv."),
          (r"\.convtr\.convtr\.", ".conv."), (r"^quantizer\.vq\.layers\.(\d+)\._codebook\.", r"codec.quantizer.layers.\1.codebook.")]


def _rename(name: str, rules) -> str | None:
    for pattern, repl in rules:
        name, n = re.subn(pattern, repl, name)
    return name


def lm_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        m = _CROSS_IN.match(name)
        if m:   # q from the decoder stream, k and v from the text: split the fused projection
            d = t.shape[0] // 3
            out[f"lm.layers.{m.group(1)}.cross_attn.q.weight"] = t[:d]
            out[f"lm.layers.{m.group(1)}.cross_attn.kv.weight"] = t[d:]
            continue
        for pattern, repl in _LM:
            new, n = re.subn(pattern, repl, name)
            if n:
                out[new] = t
                break
        else:
            out[name] = t  # reported by load_into as unexpected
    return out


def codec_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from .codec import fold_weight_norm

    renamed = {}
    for name, t in state.items():
        new = name
        for pattern, repl in _CODEC:
            new = re.sub(pattern, repl, new)
        renamed[new] = t
    return {k: v for k, v in fold_weight_norm(renamed).items()}


def ours_to_audiocraft(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Our state dict -> (LM best_state, EnCodec best_state) in audiocraft's names (weight norm unfolded)."""
    lm, codec = {}, {}
    cross_q = {}
    transposed = {n.rsplit(".", 2)[0] for n in _transposed_names(tuple(state))}   # codec.decoder.layers.<i>
    inverse = [(r"^lm\.embed\.(\d+)\.", r"emb.\1."), (r"^lm\.heads\.(\d+)\.", r"linears.\1."), (r"^lm\.norm\.", "out_norm."),
               (r"^lm\.layers\.(\d+)\.self_attn\.qkv\.weight$", r"transformer.layers.\1.self_attn.in_proj_weight"),
               (r"^lm\.layers\.(\d+)\.self_attn\.out\.", r"transformer.layers.\1.self_attn.out_proj."),
               (r"^lm\.layers\.(\d+)\.cross_attn\.out\.", r"transformer.layers.\1.cross_attention.out_proj."),
               (r"^lm\.layers\.(\d+)\.(norm1|norm2|norm_cross)\.", r"transformer.layers.\1.\2."),
               (r"^lm\.layers\.(\d+)\.fc(1|2)\.", r"transformer.layers.\1.linear\2."),
               (r"^text_proj\.", "condition_provider.conditioners.description.output_proj."),
               (r"^chroma_proj\.", "condition_provider.conditioners.self_wav.output_proj.")]
    for name, t in state.items():
        m = re.match(r"^lm\.layers\.(\d+)\.cross_attn\.(q|kv)\.weight$", name)
        if m:
            cross_q.setdefault(m.group(1), {})[m.group(2)] = t
        elif name.startswith("codec."):
            new = name.removeprefix("codec.")
            new = re.sub(r"^quantizer\.layers\.(\d+)\.codebook\.", r"quantizer.vq.layers.\1._codebook.", new)
            m2 = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.(.*)$", new)
            if m2:
                conv = "convtr.convtr" if name.rsplit(".", 2)[0] in transposed else "conv.conv"
                rest = re.sub(r"^(block\.\d+\.|shortcut\.)?conv\.", lambda mm: f"{mm.group(1) or ''}{conv}.", m2.group(3))
                new = f"{m2.group(1)}.model.{m2.group(2)}.{rest}"
            if new.endswith(("conv.weight", "convtr.weight")):   # audiocraft keeps weight norm: g and v
                codec[new[:-len("weight")] + "weight_g"] = t.norm(dim=tuple(range(1, t.dim())), keepdim=True)
                codec[new[:-len("weight")] + "weight_v"] = t
            else:
                codec[new] = t
            if new.endswith("._codebook.embed"):   # audiocraft's strict load also wants the codebook's EMA state
                stem = new[:-len("embed")]
                codec.update({stem + "inited": torch.ones(1), stem + "cluster_size": torch.ones(t.shape[0]),
                              stem + "embed_avg": t.clone()})
        elif not name.startswith("text_encoder."):
            for pattern, repl in inverse:
                new, n = re.subn(pattern, repl, name)
                if n:
                    lm[new] = t
                    break
    for i, parts in cross_q.items():
        lm[f"transformer.layers.{i}.cross_attention.in_proj_weight"] = torch.cat([parts["q"], parts["kv"]])
    return lm, codec


def _transposed_names(names: tuple) -> set:
    # a decoder conv followed by a residual block at the next index is an upsampling (transposed) conv
    out = set()
    for n in names:
        m = re.match(r"^codec\.decoder\.layers\.(\d+)\.conv\.weight$", n)
        if m and f"codec.decoder.layers.{int(m.group(1)) + 1}.block.1.conv.weight" in names:
            out.add(n)
    return out


# -- architecture from shapes and xp.cfg -------------------------------------------------------------------
def config_from(lm: dict, codec: dict, xp: dict, codec_xp: dict, text: T5Config, name: str,
                where: str = CODEC_FILE) -> MusicGenConfig:
    """Our (renamed) LM and codec tensors + the xp.cfg of each file (possibly empty) -> MusicGenConfig."""
    tl = xp.get("transformer_lm", {}) if isinstance(xp.get("transformer_lm"), dict) else {}
    K = len([k for k in lm if re.match(r"^lm\.embed\.\d+\.weight$", k)])
    dim = lm["lm.embed.0.weight"].shape[1]
    layers = len({k.split(".")[2] for k in lm if k.startswith("lm.layers.")})
    melody = "chroma_proj.weight" in lm
    channels = int(xp.get("channels", 2 if K == 8 else 1))
    lm_cfg = LMConfig(vocab_size=lm["lm.embed.0.weight"].shape[0] - 1, dim=dim, num_layers=layers,
                      num_heads=int(tl.get("num_heads", dim // 64)), ffn_dim=lm["lm.layers.0.fc1.weight"].shape[0],
                      num_codebooks=K, audio_channels=channels, activation=str(tl.get("activation", "gelu")),
                      prefix_conditioning=melody)
    shapes = {"sample_rate": int(xp.get("sample_rate", 32000)), **_codec_shapes(codec, where)}
    settings = xpcfg.codec_settings(codec_xp, where)
    for field, value in settings.items():
        if field in shapes and field != "sample_rate" and shapes[field] != value:
            raise CheckpointError(f"{where}: xp.cfg's {xpcfg.XP_NAMES[field]} means {field} = {value!r}, but the "
                                  f"weights have {shapes[field]!r}")
    codec_cfg = CodecConfig(**{**shapes, **settings}, num_codebooks=K // channels)
    # audiocraft generates in windows of the segment length it trained on (BaseGenModel.max_duration)
    segment = xp.get(WINDOW_KEY, (xp.get("dataset") or {}).get("segment_duration"))
    cfg = MusicGenConfig(codec=codec_cfg, text=text, lm=lm_cfg, name=name,
                         melody=melody_config(xp) if melody else None,
                         max_duration=MAX_DURATION if segment is None else float(segment))
    cfg.validate()
    return cfg


WINDOW_KEY = "musicgen_max_duration"   # our xp.cfg key for a window other than the segment duration (convert.py)


def melody_config(xp: dict) -> MelodyConfig:
    """The chroma conditioner of a melody xp.cfg. audiocraft's ChromaStemConditioner sees `duration` =
    dataset.segment_duration seconds: its chroma is 1 + int(duration * rate) // hop frames (a centred STFT), hop
    a quarter of the 2**radix2_exp window. Missing values are the published model's (30 s: 235 frames)."""
    base = MelodyConfig()
    stem = ((xp.get("conditioners") or {}).get("self_wav") or {}).get("chroma_stem") or {}
    duration = (xp.get("dataset") or {}).get("segment_duration")
    n_fft = 2 ** int(stem.get("radix2_exp", 14))
    if n_fft != base.n_fft:
        raise ValueError(f"chroma window 2**{stem.get('radix2_exp')}: only 2**14 (musicgen-melody's) is supported")
    length = base.chroma_length if duration is None else 1 + int(float(duration) * CHROMA_SAMPLE_RATE) // (n_fft // 4)
    return MelodyConfig(num_chroma=int(stem.get("n_chroma", base.num_chroma)), chroma_length=length)


def melody_xp(melody: MelodyConfig, max_duration: float = MAX_DURATION) -> dict:
    """What `melody_config` reads back as `melody`: the segment duration is the window's where that gives the
    chroma length (the published models), else half a hop past the last frame's start, so that float rounding
    cannot move the frame count."""
    duration = max_duration
    if 1 + int(duration * CHROMA_SAMPLE_RATE) // melody.hop_length != melody.chroma_length:
        duration = ((melody.chroma_length - 1) * melody.hop_length + melody.hop_length // 2) / CHROMA_SAMPLE_RATE
    return {"dataset": {"segment_duration": duration},
            "conditioners": {"self_wav": {"model": "chroma_stem", "chroma_stem": {
                "sample_rate": CHROMA_SAMPLE_RATE, "n_chroma": melody.num_chroma,
                "radix2_exp": int(math.log2(melody.n_fft)), "argmax": True}}}}


def _codec_shapes(codec: dict, where: str) -> dict:
    """The CodecConfig fields that the codec's tensors show (our names, weight norm folded)."""
    def layers(pattern):
        return sorted((int(m.group(1)), v) for k, v in codec.items() if (m := re.match(pattern, k)))

    convs = layers(r"^codec\.encoder\.layers\.(\d+)\.conv\.weight$")   # first, one per scale, last
    blocks = layers(r"^codec\.encoder\.layers\.(\d+)\.block\.1\.conv\.weight$")
    books = [v for k, v in codec.items() if k.endswith(".codebook.embed")]
    if len(convs) < 3 or not blocks or not books:
        raise CheckpointError(f"{where}: no EnCodec encoder, residual blocks and codebooks among its weights")
    ups = sorted((int(k.split(".")[3]), v) for k, v in codec.items() if k in _transposed_names(tuple(codec)))
    lstm = {k.split("_l")[-1] for k in codec if ".lstm.weight_ih_l" in k and k.startswith("codec.encoder")}
    first_block = blocks[0][1]                                          # (dim // compress, dim, kernel)
    return dict(channels=convs[0][1].shape[1], num_filters=convs[0][1].shape[0], hidden_size=books[0].shape[1],
                ratios=tuple(v.shape[2] // 2 for _, v in ups), kernel_size=convs[0][1].shape[2],
                last_kernel_size=convs[-1][1].shape[2], residual_kernel_size=first_block.shape[2],
                compress=first_block.shape[1] // first_block.shape[0],
                num_residual_layers=sum(i < convs[1][0] for i, _ in blocks),
                use_conv_shortcut=any(".shortcut." in k for k in codec if k.startswith("codec.encoder")),
                num_lstm_layers=len(lstm), codebook_size=books[0].shape[0], num_quantizers=len(books))


def read(folder: Path):
    """An audiocraft folder -> (config, our state dict, folder of the tokenizer files)."""
    from . import checkpoint as ckpt

    folder = Path(folder)
    for f in (folder / LM_FILE, folder / CODEC_FILE):
        if not f.is_file():
            raise CheckpointError(f"missing {f}: an audiocraft checkpoint has {LM_FILE} and {CODEC_FILE}")
    lm_pkg, codec_pkg = xpcfg.read_package(folder / LM_FILE), xpcfg.read_package(folder / CODEC_FILE)
    lm_state, codec_state = xpcfg.best_state(lm_pkg, folder / LM_FILE), xpcfg.best_state(codec_pkg, folder / CODEC_FILE)
    t5 = folder / T5_FOLDER
    if not (t5 / "config.json").is_file():
        raise CheckpointError(f"{folder} is an audiocraft checkpoint, which does not include the T5 text encoder "
                              f"(audiocraft downloads t5-base by name): put a Hugging Face T5 encoder folder with "
                              f"its tokenizer at {t5}")
    import json

    text_cfg = T5Config.from_hf(json.loads((t5 / "config.json").read_text()))
    lm, codec = lm_to_ours(lm_state), codec_to_ours(codec_state)
    text = {("text_encoder." + k): v for k, v in ckpt.read_weights(t5).items()}
    text = ckpt.map_hf_state(text)
    xp, codec_xp = xpcfg.xp_config(lm_pkg, folder / LM_FILE), xpcfg.xp_config(codec_pkg, folder / CODEC_FILE)
    try:
        cfg = config_from(lm, codec, xp, codec_xp, text_cfg, folder.name, str(folder / CODEC_FILE))
    except CheckpointError:
        raise
    except (ValueError, TypeError, ZeroDivisionError) as e:   # xp.cfg values of the wrong kind
        raise CheckpointError(f"{folder / LM_FILE}: {e}") from None
    return cfg, {**lm, **codec, **text}, t5
