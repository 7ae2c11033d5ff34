"""Architecture configs: one frozen dataclass per component, named presets, and parsing of the
Hugging Face `config.json` that every published facebook/musicgen-* checkpoint carries.

A checkpoint carries its own config: `MusicGenConfig.from_hf(dict)` reads it, so the presets below are for
benchmarks and tests (random weights at the real shapes), never needed to load real weights.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
import math

MAX_DURATION = 30.0   # seconds: the context MusicGen was trained on; longer runs slide a window over it


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# EnCodec's convolutions pad the signal's ends in one of these modes; each looks only at samples near the end it
# pads, which the windowed fast codec and the streaming decoder rely on (circular padding would not)
PAD_MODES = ("constant", "reflect", "replicate")


@dataclass(frozen=True)
class CodecConfig:
    """EnCodec (SEANet encoder/decoder + residual vector quantiser)."""
    sample_rate: int = 32000
    channels: int = 1                    # audio channels the codec itself sees (stereo MusicGen runs it per channel)
    num_filters: int = 64                # width of the first conv; doubles at every downsampling
    hidden_size: int = 128               # latent dimension between SEANet and the quantiser
    ratios: tuple = (8, 5, 4, 4)         # decoder upsampling ratios; the encoder uses them reversed
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    num_residual_layers: int = 1
    compress: int = 2                    # residual blocks narrow the width by this factor
    num_lstm_layers: int = 2
    causal: bool = False                 # the 32 kHz music codec is non-causal
    pad_mode: str = "reflect"            # one of PAD_MODES: transformers' configs say reflect, audiocraft's constant
    trim_right_ratio: float = 1.0
    use_conv_shortcut: bool = False
    codebook_size: int = 2048
    codebook_dim: int | None = None      # None: same as hidden_size
    num_codebooks: int = 4               # codebooks used to encode (the checkpoint's first bandwidth)
    num_quantizers: int | None = None    # codebooks stored in the checkpoint; None: num_codebooks
    normalize: bool = False              # the 32 kHz codec does not rescale its input

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sample_rate / self.hop_length)

    @property
    def quantizer_layers(self) -> int:
        return max(self.num_codebooks, self.num_quantizers or 0)

    @classmethod
    def from_hf(cls, d: dict) -> "CodecConfig":
        """From the `audio_encoder` part of a transformers MusicGen config.json (an EncodecConfig)."""
        sr = d.get("sampling_rate", 24000)
        ratios = tuple(d.get("upsampling_ratios", (8, 5, 4, 2)))
        codebook_size = d.get("codebook_size", 1024)
        bandwidths = d.get("target_bandwidths", (1.5, 3.0, 6.0, 12.0, 24.0))
        # checked here already: the frame rate and the codebook counts below are computed from them
        for name, value in (("sampling_rate", sr), ("codebook_size", codebook_size)):
            if not _positive_int(value):
                raise ValueError(f"audio_encoder {name} must be a positive integer, got {value!r}")
        if not bandwidths or not all(isinstance(b, (int, float)) and b > 0 for b in bandwidths):
            raise ValueError(f"audio_encoder target_bandwidths must be positive numbers, got {bandwidths!r}")
        if not ratios or not all(map(_positive_int, ratios)):
            raise ValueError(f"audio_encoder upsampling_ratios must be positive integers, got {ratios!r}")
        frame_rate = math.ceil(sr / math.prod(ratios))
        nbits = math.ceil(math.log2(codebook_size))
        # transformers' EnCodec encodes at target_bandwidths[0]; MusicGen's codec has exactly one bandwidth
        num_codebooks = int(max(1, math.floor(bandwidths[0] * 1000 / (frame_rate * nbits))))
        num_quantizers = int(1000 * bandwidths[-1] // (frame_rate * nbits))   # transformers' EncodecConfig
        if d.get("chunk_length_s") is not None:
            raise ValueError("chunked EnCodec (chunk_length_s set) is not a MusicGen codec")
        return cls(
            sample_rate=sr,
            channels=d.get("audio_channels", 1),
            num_filters=d.get("num_filters", 32),
            hidden_size=d.get("hidden_size", 128),
            ratios=ratios,
            kernel_size=d.get("kernel_size", 7),
            last_kernel_size=d.get("last_kernel_size", 7),
            residual_kernel_size=d.get("residual_kernel_size", 3),
            dilation_growth_rate=d.get("dilation_growth_rate", 2),
            num_residual_layers=d.get("num_residual_layers", 1),
            compress=d.get("compress", 2),
            num_lstm_layers=d.get("num_lstm_layers", 2),
            causal=d.get("use_causal_conv", True),
            pad_mode=d.get("pad_mode", "reflect"),
            trim_right_ratio=d.get("trim_right_ratio", 1.0),
            use_conv_shortcut=d.get("use_conv_shortcut", True),
            codebook_size=codebook_size,
            codebook_dim=d.get("codebook_dim"),
            num_codebooks=num_codebooks,
            num_quantizers=num_quantizers,
            normalize=d.get("normalize", False),
        )


@dataclass(frozen=True)
class T5Config:
    """T5 encoder (MusicGen uses t5-base, frozen)."""
    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"      # "relu" (t5-base) or "gated-gelu" (t5 v1.1 / flan)
    pad_token_id: int = 0
    eos_token_id: int = 1

    @classmethod
    def from_hf(cls, d: dict) -> "T5Config":
        return cls(
            vocab_size=d.get("vocab_size", 32128),
            d_model=d.get("d_model", 512),
            d_kv=d.get("d_kv", 64),
            d_ff=d.get("d_ff", 2048),
            num_layers=d.get("num_layers", 6),
            num_heads=d.get("num_heads", 8),
            relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-6),
            feed_forward_proj=d.get("feed_forward_proj", "relu"),
            pad_token_id=d.get("pad_token_id", 0),
            eos_token_id=d.get("eos_token_id", 1),
        )


@dataclass(frozen=True)
class LMConfig:
    """The MusicGen transformer decoder over codec tokens."""
    vocab_size: int = 2048               # codes per codebook; token id vocab_size is the special (BOS / pad) token
    dim: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_dim: int = 4096
    num_codebooks: int = 4               # 8 for stereo: left and right interleaved (L0 R0 L1 R1 ...)
    audio_channels: int = 1
    max_position_embeddings: int = 2048
    activation: str = "gelu"
    scale_embedding: bool = False
    cross_attention_dim: int | None = None   # None: the text states are projected to `dim` first
    layer_norm_eps: float = 1e-5
    prefix_conditioning: bool = False    # melody checkpoints: conditions are prepended tokens, no cross-attention

    @property
    def special_token(self) -> int:
        return self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_hf(cls, d: dict) -> "LMConfig":
        return cls(
            vocab_size=d.get("vocab_size", 2048),
            dim=d.get("hidden_size", 1024),
            num_layers=d.get("num_hidden_layers", 24),
            num_heads=d.get("num_attention_heads", 16),
            ffn_dim=d.get("ffn_dim", 4096),
            num_codebooks=d.get("num_codebooks", 4),
            audio_channels=d.get("audio_channels", 1),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            activation=d.get("activation_function", "gelu"),
            scale_embedding=d.get("scale_embedding", False),
            cross_attention_dim=d.get("cross_attention_hidden_size"),
        )


@dataclass(frozen=True)
class MelodyConfig:
    """Chroma conditioning of the melody checkpoints (audiocraft's ChromaStemConditioner)."""
    num_chroma: int = 12                 # pitch classes
    chroma_length: int = 235             # chroma frames the LM sees: 30 s at hop 4096 and 32 kHz, center padded
    n_fft: int = 16384                   # STFT window (audiocraft radix2_exp=14)
    hop_length: int = 4096               # n_fft // 4


@dataclass(frozen=True)
class MusicGenConfig:
    codec: CodecConfig = field(default_factory=CodecConfig)
    text: T5Config = field(default_factory=T5Config)
    lm: LMConfig = field(default_factory=LMConfig)
    name: str = "custom"
    melody: MelodyConfig | None = None   # set for musicgen-melody checkpoints (prefix conditioning on chroma)
    max_duration: float = MAX_DURATION   # seconds of the generation window (audiocraft: dataset.segment_duration)

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    @property
    def frame_rate(self) -> int:
        return self.codec.frame_rate

    @property
    def audio_channels(self) -> int:
        return self.lm.audio_channels

    @classmethod
    def from_hf(cls, d: dict, name: str = "custom") -> "MusicGenConfig":
        for part in ("text_encoder", "audio_encoder", "decoder"):
            if part not in d:
                raise ValueError(f"config.json has no '{part}' section: not a MusicGen checkpoint")
            if not isinstance(d[part], dict):
                raise ValueError(f"config.json's '{part}' is not a mapping")
        lm = LMConfig.from_hf(d["decoder"])
        melody = None
        if d.get("model_type") == "musicgen_melody":
            melody = MelodyConfig(num_chroma=d.get("num_chroma", 12), chroma_length=d.get("chroma_length", 235))
            lm = replace(lm, prefix_conditioning=True)
        cfg = cls(codec=CodecConfig.from_hf(d["audio_encoder"]), text=T5Config.from_hf(d["text_encoder"]),
                  lm=lm, name=name, melody=melody, max_duration=d.get("max_duration", MAX_DURATION))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for where, part, names in (
                ("decoder", self.lm, ("vocab_size", "dim", "num_layers", "num_heads", "ffn_dim", "num_codebooks",
                                      "audio_channels", "max_position_embeddings")),
                ("text_encoder", self.text, ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")),
                ("audio_encoder", self.codec, ("sample_rate", "num_filters", "hidden_size", "codebook_size",
                                               "num_codebooks"))):
            for name in names:
                if not _positive_int(getattr(part, name)):
                    raise ValueError(f"{where} {name} must be a positive integer, got {getattr(part, name)!r}")
        if not self.codec.ratios or not all(map(_positive_int, self.codec.ratios)):
            raise ValueError(f"audio_encoder upsampling ratios must be positive integers, got {self.codec.ratios!r}")
        d = self.max_duration
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d < math.inf \
                or int(d * self.frame_rate) < 1:
            raise ValueError(f"max_duration (the generation window) must be a positive number of seconds, got {d!r}")
        if self.lm.dim % self.lm.num_heads:
            raise ValueError(f"decoder hidden size {self.lm.dim} does not split into {self.lm.num_heads} heads")
        per_channel = self.lm.num_codebooks // self.lm.audio_channels
        if per_channel != self.codec.num_codebooks:
            raise ValueError(f"decoder has {self.lm.num_codebooks} codebooks for {self.lm.audio_channels} channel(s) "
                             f"but the codec has {self.codec.num_codebooks}")
        if self.lm.vocab_size != self.codec.codebook_size:
            raise ValueError(f"decoder vocab_size {self.lm.vocab_size} != codec codebook_size {self.codec.codebook_size}")
        if self.lm.cross_attention_dim is not None and self.lm.cross_attention_dim != self.text.d_model:
            raise ValueError(f"cross_attention_hidden_size {self.lm.cross_attention_dim} != text d_model {self.text.d_model}")

    def to_dict(self) -> dict:
        return asdict(self)


# Published shapes (the facebook/musicgen-* config.json values). Used for benchmarks at real shapes.
_LM_SIZES = {
    "small": dict(dim=1024, num_layers=24, num_heads=16, ffn_dim=4096),
    "medium": dict(dim=1536, num_layers=48, num_heads=24, ffn_dim=6144),
    "large": dict(dim=2048, num_layers=48, num_heads=32, ffn_dim=8192),
}


def preset(name: str) -> MusicGenConfig:
    """Named architecture presets: small, medium, large, melody, stereo-{size}, stereo-melody, and `debug` /
    `debug-melody` (tiny, for tests)."""
    if name == "debug-melody":
        return replace(preset("debug"), lm=replace(preset("debug").lm, prefix_conditioning=True),
                       melody=MelodyConfig(), name=name)
    if name in ("melody", "stereo-melody", "melody-large", "stereo-melody-large"):
        base = preset(name.replace("melody-large", "large").replace("melody", "medium"))
        return replace(base, lm=replace(base.lm, prefix_conditioning=True), melody=MelodyConfig(), name=name)
    if name == "debug":
        return MusicGenConfig(
            codec=CodecConfig(num_filters=4, hidden_size=16, codebook_size=64, ratios=(8, 5, 4, 4)),
            text=T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
            lm=LMConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, ffn_dim=64),
            name="debug")
    stereo = name.startswith("stereo-")
    size = name.removeprefix("stereo-")
    if size not in _LM_SIZES:
        raise ValueError(f"unknown preset {name!r}: choose debug, debug-melody, small, medium, large, melody, "
                         f"melody-large or stereo-<any of those>")
    lm = LMConfig(**_LM_SIZES[size], num_codebooks=8 if stereo else 4, audio_channels=2 if stereo else 1)
    return MusicGenConfig(lm=lm, name=name)


def with_lm(cfg: MusicGenConfig, **changes) -> MusicGenConfig:
    return replace(cfg, lm=replace(cfg.lm, **changes))
