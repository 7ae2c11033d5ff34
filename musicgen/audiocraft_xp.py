"""audiocraft's experiment config, the 'xp.cfg' inside its checkpoint files, read without omegaconf.

audiocraft's solver saves its Hydra config as the omegaconf DictConfig itself (pickled: a training checkpoint);
its export writes `OmegaConf.to_yaml(cfg)` instead (YAML text). Either way the interpolations (`${sample_rate}`,
`${encodec.causal}`) are left unresolved, so `xp_config` resolves them here.

A pickled config is read by `torch.load(weights_only=True)` with a fixed allow-list: the omegaconf classes of a
config composed from YAML, each replaced by an inert record of its pickled state (no omegaconf code runs), and
the other globals such a pickle names, all in the metadata of each node: `typing.Any` (a record too), the types
`dict`, `list` and `int` (a node's object and key types; `float`, `str` and `bool` for typed value nodes) and
`collections.defaultdict` (its resolver cache). Anything else is refused.

The codec settings (sections compression_model, encodec, seanet, rvq, as audiocraft's EnCodec builder reads
them) map onto CodecConfig both ways: `codec_settings` and `codec_xp`.
"""
from __future__ import annotations

import collections
import pickle
import re
import zipfile
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import PAD_MODES, CodecConfig


# -- reading a checkpoint file safely -------------------------------------------------------------------
class _Record:
    """Stand-in for a pickled omegaconf object: keeps the state it is given, runs nothing."""
    state = None

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


# the classes a config composed from YAML pickles as (omegaconf 2.1 to 2.4); the typed value nodes hold a
# `_val` like AnyNode and appear when a config was built from typed values
OMEGACONF_CLASSES = ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.Metadata",
                     "omegaconf.base.ContainerMetadata", "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode",
                     "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode",
                     "typing.Any")
SAFE_GLOBALS = ([(type(name.rsplit(".", 1)[1], (_Record,), {}), name) for name in OMEGACONF_CLASSES]
                + [(t, f"builtins.{t.__name__}") for t in (dict, list, int, float, str, bool)]
                + [(collections.defaultdict, "collections.defaultdict")])


def read_package(f: Path) -> dict:
    """A torch-saved dict, loaded with weights_only=True and SAFE_GLOBALS; omegaconf objects become records."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            pkg = torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))  # legacy: whole
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+) (was not an allowed global|whose module)", str(e))
        why = m.group(1) if m else re.sub(r"(?s).*WeightsUnpickler error: ", "", str(e)).splitlines()[0]
        if not m and not zipfile.is_zipfile(f):   # not a pickle at all
            raise CheckpointError(f"{f} is not a torch checkpoint ({describe(f)}): {why}") from None
        raise CheckpointError(f"{f} holds objects other than tensors, plain containers and an omegaconf config; "
                              f"refusing to unpickle it ({why})") from None
    except Exception as e:
        raise CheckpointError(f"{f} is not a torch checkpoint ({describe(f)}): {e}") from None
    if not isinstance(pkg, dict) or not ("best_state" in pkg or "pretrained" in pkg):
        what = sorted(pkg)[:5] if isinstance(pkg, dict) else type(pkg).__name__
        raise CheckpointError(f"{f} is not an audiocraft checkpoint: expected a dict with 'best_state', got {what}")
    return pkg


def best_state(pkg: dict, f: Path) -> dict:
    """The model tensors: an export holds them as 'best_state'; the solver's own checkpoint one level down, as
    best_state['model'] (or fsdp_best_state['model'] when trained with FSDP)."""
    state = pkg.get("fsdp_best_state") or pkg.get("best_state")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state:
        named = f"only names a pretrained model ({pkg['pretrained']}); it " if "pretrained" in pkg else ""
        raise CheckpointError(f"{f} {named}holds no weights")
    return state


def describe(f: Path) -> str:
    """A plain word on what a file is, for errors."""
    head = Path(f).read_bytes()[:8] if Path(f).is_file() else b""
    if head[:2] == b"PK":
        return "a zip archive (torch.save format) with unexpected content"
    if head[:1] == b"{" or (len(head) == 8 and int.from_bytes(head, "little") < 10**8):
        return "apparently a safetensors file"
    if head[:1] == b"\x80":
        return "a legacy (non-zip) pickle"
    return "not a checkpoint file"


# -- the config as plain values ---------------------------------------------------------------------------
def xp_config(pkg: dict, f: Path) -> dict:
    """pkg['xp.cfg'] (YAML text, a pickled DictConfig, a dict, or absent) -> plain dict, interpolations resolved."""
    cfg = pkg.get("xp.cfg")
    if isinstance(cfg, str):
        import yaml

        try:
            cfg = yaml.safe_load(cfg)
        except yaml.YAMLError as e:
            raise CheckpointError(f"{f}: its xp.cfg is not valid YAML ({str(e).splitlines()[0]})") from None
    cfg = _plain(cfg) if cfg is not None else {}
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f}: its xp.cfg is a {type(cfg).__name__}, not a mapping")
    return _resolve(cfg, cfg, 0)


def _plain(obj):
    """omegaconf records and containers -> plain Python values (a node's value is its `_val`, a container's
    its `_content`)."""
    if isinstance(obj, _Record):
        state = obj.state if isinstance(obj.state, dict) else {}
        return _plain(state["_content"] if "_content" in state else state.get("_val"))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


_INTERPOLATION = re.compile(r"\$\{([\w.\-]+)\}")   # absolute ones only, as audiocraft's configs use


def _resolve(value, root: dict, depth: int):
    """Replace `${a.b}` by the value at a.b of root; a string that is only an interpolation takes the value's
    type. Resolver calls (`${oc.env:USER}`) and paths that lead nowhere stay as written."""
    if isinstance(value, dict):
        return {k: _resolve(v, root, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, depth) for v in value]
    if not isinstance(value, str) or "${" not in value or depth > 16:   # depth: a chain of references, or a loop
        return value
    whole = _INTERPOLATION.fullmatch(value)
    if whole:
        found = _lookup(root, whole.group(1))
        return value if found is _MISSING else _resolve(found, root, depth + 1)

    def text(m):
        found = _lookup(root, m.group(1))
        return m.group(0) if found is _MISSING else str(_resolve(found, root, depth + 1))

    return _INTERPOLATION.sub(text, value)


_MISSING = object()


def _lookup(root, path: str):
    node = root
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


# -- the codec's settings <-> CodecConfig -----------------------------------------------------------------
# SEANet arguments (audiocraft/modules/seanet.py) and the CodecConfig field each one sets
_SEANET = {"dimension": "hidden_size", "channels": "channels", "causal": "causal", "n_filters": "num_filters",
           "n_residual_layers": "num_residual_layers", "ratios": "ratios", "kernel_size": "kernel_size",
           "last_kernel_size": "last_kernel_size", "residual_kernel_size": "residual_kernel_size",
           "dilation_base": "dilation_growth_rate", "pad_mode": "pad_mode", "compress": "compress",
           "lstm": "num_lstm_layers", "true_skip": "use_conv_shortcut", "trim_right_ratio": "trim_right_ratio"}
# SEANet arguments that take one value here (what our codec computes), and those that do not change inference
_SEANET_FIXED = {"activation": "ELU", "activation_params": {"alpha": 1.0}, "final_activation": None,
                 "final_activation_params": None}
_SEANET_FREE = ("norm_params",           # read by time_group_norm only, which is refused below
                "disable_norm_outer_blocks")   # which convolutions have weight norm: the tensor names say
_RVQ = {"bins": "codebook_size", "n_q": "num_quantizers"}
_RVQ_TRAINING = ("q_dropout", "decay", "kmeans_init", "kmeans_iters", "threshold_ema_dead_code",
                 "orthogonal_reg_weight", "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes")
# our field -> the setting's name in xp.cfg, for errors
XP_NAMES = {"sample_rate": "encodec.sample_rate", **{f: f"seanet.{k}" for k, f in _SEANET.items()},
            **{f: f"rvq.{k}" for k, f in _RVQ.items()}}


def codec_settings(xp: dict, where: str) -> dict:
    """The CodecConfig fields that a compression model's xp.cfg sets; {} when it has no `seanet` section
    (older files written by `musicgen convert`). A setting our codec does not compute the same way is a
    CheckpointError naming it."""
    if "seanet" not in xp:
        return {}

    def refuse(name, value, why):
        raise CheckpointError(f"{where}: xp.cfg sets {name} = {value!r}; {why}")

    model = xp.get("compression_model", "encodec")
    if model != "encodec":
        refuse("compression_model", model, "only EnCodec is a MusicGen codec here")
    encodec = _section(xp, "encodec", where)
    for key, want in (("autoencoder", "seanet"), ("quantizer", "rvq")):
        if encodec.get(key, want) != want:
            refuse(f"encodec.{key}", encodec[key], f"only {want!r} is supported")
    for key in ("renormalize", "renorm"):
        if encodec.get(key):
            refuse(f"encodec.{key}", encodec[key], "input renormalisation is not part of MusicGen's codec")
    out = {}
    sample_rate = encodec.get("sample_rate", xp.get("sample_rate"))
    if sample_rate is not None:
        out["sample_rate"] = _typed("encodec.sample_rate", sample_rate, int, where)

    seanet = _section(xp, "seanet", where)
    encoder, decoder = _section(seanet, "encoder", where, "seanet."), _section(seanet, "decoder", where, "seanet.")
    common = {k: v for k, v in seanet.items() if k not in ("encoder", "decoder")}
    enc, dec = {**common, **encoder}, {**common, **decoder}
    for key in sorted(set(enc) | set(dec)):
        name = f"seanet.{'decoder.' if key in decoder else 'encoder.' if key in encoder else ''}{key}"
        if key in enc and key in dec and enc[key] != dec[key]:
            refuse(name, dec[key], f"the encoder's is {enc[key]!r}, and our codec takes one value for both")
        value = dec[key] if key in dec else enc[key]
        if key in _SEANET:
            out[_SEANET[key]] = _seanet_value(name, key, value, where)
        elif key in _SEANET_FIXED:
            if value != _SEANET_FIXED[key] and not (key == "final_activation_params" and not value):
                refuse(name, value, f"our codec computes {_SEANET_FIXED[key]!r}")
        elif key == "norm":
            if value not in ("weight_norm", "none"):
                refuse(name, value, "only weight_norm (folded at load) and none are supported")
        elif key not in _SEANET_FREE:
            refuse(name, value, "not a SEANet setting this loader knows")

    rvq = _section(xp, "rvq", where)
    for key, value in rvq.items():
        if key in _RVQ:
            out[_RVQ[key]] = _typed(f"rvq.{key}", value, int, where)
        elif key == "dimension":
            pass   # audiocraft's builder replaces it with seanet.dimension
        elif key not in _RVQ_TRAINING:
            refuse(f"rvq.{key}", value, "not a quantiser setting this loader knows")
    return out


def _section(d: dict, key: str, where: str, prefix: str = "") -> dict:
    value = d.get(key) or {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: xp.cfg's {prefix}{key} is {value!r}, not a mapping")
    return value


def _typed(name: str, value, kind, where: str):
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise CheckpointError(f"{where}: xp.cfg sets {name} = {value!r}, expected {kind.__name__}")
    return value


def _seanet_value(name: str, key: str, value, where: str):
    if key == "ratios":
        if not isinstance(value, list) or not value:
            raise CheckpointError(f"{where}: xp.cfg sets {name} = {value!r}, expected a list of integers")
        return tuple(_typed(name, v, int, where) for v in value)
    if key in ("causal", "true_skip"):
        flag = _typed(name, value, bool, where)
        return not flag if key == "true_skip" else flag   # true_skip: identity shortcut, else a 1x1 conv
    if key == "pad_mode":
        if value not in PAD_MODES:
            raise CheckpointError(f"{where}: xp.cfg sets {name} = {value!r}; supported: {', '.join(PAD_MODES)}")
        return value
    if key == "lstm" and value == 0:
        raise CheckpointError(f"{where}: xp.cfg sets {name} = 0; MusicGen's codec has an LSTM, ours always builds one")
    if key == "trim_right_ratio":
        ratio = _typed(name, value, float, where)
        if not 0.0 <= ratio <= 1.0:
            raise CheckpointError(f"{where}: xp.cfg sets {name} = {value!r}, expected a ratio in [0, 1]")
        return ratio
    return _typed(name, value, int, where)


def codec_xp(c: CodecConfig) -> dict:
    """CodecConfig -> the sections of an xp.cfg that audiocraft's EnCodec builder reads (our convert writes them
    into compression_state_dict.bin)."""
    if c.codebook_dim not in (None, c.hidden_size) or c.normalize:
        raise ValueError("a codec with a separate codebook dimension or input normalisation has no audiocraft form")
    seanet = {key: getattr(c, field) for key, field in _SEANET.items() if key != "trim_right_ratio"}
    seanet.update(ratios=list(c.ratios), true_skip=not c.use_conv_shortcut, activation="ELU",
                  activation_params={"alpha": 1.0}, norm="weight_norm", norm_params={}, disable_norm_outer_blocks=0,
                  encoder={}, decoder={"trim_right_ratio": c.trim_right_ratio, "final_activation": None,
                                       "final_activation_params": None})
    return {"compression_model": "encodec", "sample_rate": c.sample_rate, "channels": c.channels,
            "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": c.sample_rate,
                        "channels": c.channels, "causal": c.causal, "renormalize": False},
            "seanet": seanet,
            "rvq": {"n_q": c.quantizer_layers, "bins": c.codebook_size, "q_dropout": False}}

