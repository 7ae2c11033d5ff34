"""`musicgen convert SRC DST`: a Hugging Face checkpoint folder <-> an audiocraft one, whichever SRC is.

Goes through our model: SRC is loaded (either format), DST is written in the other one. Weights are copied
bit for bit (fused projections split again, weight norm re-expressed as g and v for audiocraft).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from . import audiocraft_format as acf
from . import checkpoint as ckpt
from .audiocraft_xp import codec_xp
from .config import MAX_DURATION
from .files import as_created

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")


def convert(src: str | Path, dst: str | Path, force: bool = False) -> str:
    """Write SRC in the other format at DST; returns the format written ('audiocraft' or 'huggingface')."""
    from .loading import load

    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not force:
        raise FileExistsError(f"{dst} exists and is not empty; pass --force to write into it")
    folder = ckpt.resolve(src)
    text_folder = folder / acf.T5_FOLDER if acf.is_audiocraft(folder) else folder
    model = load(folder)
    dst.mkdir(parents=True, exist_ok=True)
    if acf.is_audiocraft(folder):
        save_hf(model, dst, text_folder)
        return "huggingface"
    save_audiocraft(model, dst, text_folder)
    return "audiocraft"


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def _t5_config(model) -> dict:
    t = model.cfg.text
    return dict(model_type="t5", vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff,
                num_layers=t.num_layers, num_heads=t.num_heads,
                relative_attention_num_buckets=t.relative_attention_num_buckets,
                relative_attention_max_distance=t.relative_attention_max_distance,
                layer_norm_epsilon=t.layer_norm_epsilon, feed_forward_proj=t.feed_forward_proj,
                pad_token_id=t.pad_token_id, eos_token_id=t.eos_token_id)


def save_audiocraft(model, dst: Path, text_folder: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    lm, codec = acf.ours_to_audiocraft(state)
    cfg = model.cfg
    xp = dict(sample_rate=cfg.sample_rate, channels=cfg.audio_channels,
              transformer_lm=dict(dim=cfg.lm.dim, num_heads=cfg.lm.num_heads, num_layers=cfg.lm.num_layers,
                                  n_q=cfg.lm.num_codebooks, card=cfg.lm.vocab_size, activation=cfg.lm.activation))
    xp.update(acf.melody_xp(cfg.melody, cfg.max_duration) if cfg.melody is not None
              else {"dataset": {"segment_duration": cfg.max_duration}})
    if xp["dataset"]["segment_duration"] != cfg.max_duration:
        # audiocraft derives a melody model's chroma length and its window from the one segment duration; where
        # the two disagree, the chroma length wins there and our own key keeps the window for our loader
        xp[acf.WINDOW_KEY] = cfg.max_duration
    import yaml

    torch.save({"best_state": lm, "xp.cfg": yaml.safe_dump(xp), "exported": True}, dst / acf.LM_FILE)
    # the codec's settings as audiocraft's EnCodec builder reads them (padding, causality, ...): shapes alone
    # do not tell them
    torch.save({"best_state": codec, "xp.cfg": yaml.safe_dump(codec_xp(cfg.codec)), "exported": True},
               dst / acf.CODEC_FILE)
    t5 = dst / acf.T5_FOLDER
    t5.mkdir(exist_ok=True)
    text = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    save_file(text, str(t5 / "model.safetensors"), metadata={"format": "pt"})
    as_created(t5 / "model.safetensors")                  # safetensors writes it private (0600)
    (t5 / "config.json").write_text(json.dumps(_t5_config(model), indent=2))
    _copy_tokenizer(text_folder, t5)


_HF_NAMES = [(r"^lm\.embed\.(\d+)\.", r"decoder.model.decoder.embed_tokens.\1."), (r"^lm\.norm\.", "decoder.model.decoder.layer_norm."),
             (r"^lm\.heads\.(\d+)\.", r"decoder.lm_heads.\1."),
             (r"^lm\.layers\.(\d+)\.self_attn\.out\.", r"decoder.model.decoder.layers.\1.self_attn.out_proj."),
             (r"^lm\.layers\.(\d+)\.cross_attn\.q\.", r"decoder.model.decoder.layers.\1.encoder_attn.q_proj."),
             (r"^lm\.layers\.(\d+)\.cross_attn\.out\.", r"decoder.model.decoder.layers.\1.encoder_attn.out_proj."),
             (r"^lm\.layers\.(\d+)\.norm1\.", r"decoder.model.decoder.layers.\1.self_attn_layer_norm."),
             (r"^lm\.layers\.(\d+)\.norm_cross\.", r"decoder.model.decoder.layers.\1.encoder_attn_layer_norm."),
             (r"^lm\.layers\.(\d+)\.norm2\.", r"decoder.model.decoder.layers.\1.final_layer_norm."),
             (r"^lm\.layers\.(\d+)\.(fc1|fc2)\.", r"decoder.model.decoder.layers.\1.\2."),
             (r"^text_proj\.", "enc_to_dec_proj."), (r"^chroma_proj\.", "audio_enc_to_dec_proj."),
             (r"^codec\.", "audio_encoder.")]


def save_hf(model, dst: Path, text_folder: Path) -> None:
    """Our model -> config.json + model.safetensors + tokenizer files, the transformers MusicGen layout."""
    import re

    from safetensors.torch import save_file

    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().float().contiguous()
        m = re.match(r"^lm\.layers\.(\d+)\.(self_attn\.qkv|cross_attn\.kv)\.weight$", name)
        if m:
            kind = "self_attn" if m.group(2).startswith("self") else "encoder_attn"
            parts = "qkv" if kind == "self_attn" else "kv"
            for p, piece in zip(parts, t.chunk(len(parts))):
                out[f"decoder.model.decoder.layers.{m.group(1)}.{kind}.{p}_proj.weight"] = piece.contiguous()
            continue
        for pattern, repl in _HF_NAMES:
            new, n = re.subn(pattern, repl, name)
            if n:
                if new.startswith("audio_encoder.") and new.endswith(".conv.weight"):
                    # EnCodec convolutions are weight-normed in transformers (dim 0): store the folded weight
                    # as direction v = w and magnitude g = |w|, which gives back w exactly
                    stem = new[:-len("weight")] + "parametrizations.weight."
                    out[stem + "original0"] = t.norm(dim=tuple(range(1, t.dim())), keepdim=True)
                    out[stem + "original1"] = t
                else:
                    out[new] = t
                if new.startswith("audio_encoder.quantizer.") and new.endswith(".codebook.embed"):
                    # transformers' codebooks also carry their (training-time) EMA state; inference reads embed
                    stem = new[:-len("embed")]
                    out[stem + "inited"] = torch.ones(1)
                    out[stem + "cluster_size"] = torch.ones(t.shape[0])
                    out[stem + "embed_avg"] = t.clone()
                break
        else:
            out[name] = t   # text_encoder.* keeps its name
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    as_created(dst / "model.safetensors")                 # safetensors writes it private (0600)
    cfg = model.cfg
    c = cfg.codec
    bandwidth = c.num_codebooks * c.frame_rate * math.ceil(math.log2(c.codebook_size)) / 1000
    audio = dict(model_type="encodec", sampling_rate=c.sample_rate, audio_channels=c.channels,
                 num_filters=c.num_filters, hidden_size=c.hidden_size, upsampling_ratios=list(c.ratios),
                 kernel_size=c.kernel_size, last_kernel_size=c.last_kernel_size,
                 residual_kernel_size=c.residual_kernel_size, dilation_growth_rate=c.dilation_growth_rate,
                 num_residual_layers=c.num_residual_layers, compress=c.compress, num_lstm_layers=c.num_lstm_layers,
                 use_causal_conv=c.causal, pad_mode=c.pad_mode, trim_right_ratio=c.trim_right_ratio,
                 use_conv_shortcut=c.use_conv_shortcut, codebook_size=c.codebook_size, codebook_dim=c.codebook_dim,
                 target_bandwidths=[bandwidth], normalize=c.normalize, chunk_length_s=None)
    lm = cfg.lm
    decoder = dict(model_type="musicgen_melody_decoder" if cfg.melody else "musicgen_decoder",
                   vocab_size=lm.vocab_size, hidden_size=lm.dim, num_hidden_layers=lm.num_layers,
                   num_attention_heads=lm.num_heads, ffn_dim=lm.ffn_dim, num_codebooks=lm.num_codebooks,
                   audio_channels=lm.audio_channels, max_position_embeddings=lm.max_position_embeddings,
                   activation_function=lm.activation, scale_embedding=lm.scale_embedding,
                   pad_token_id=lm.vocab_size, bos_token_id=lm.vocab_size)
    config = dict(model_type="musicgen_melody" if cfg.melody else "musicgen", text_encoder=_t5_config(model),
                  audio_encoder=audio, decoder=decoder)
    if cfg.melody:
        config.update(num_chroma=cfg.melody.num_chroma, chroma_length=cfg.melody.chroma_length)
    if cfg.max_duration != MAX_DURATION:   # a window other than the published 30 s (an audiocraft fine-tune's)
        config.update(max_duration=cfg.max_duration)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    _copy_tokenizer(text_folder, dst)
