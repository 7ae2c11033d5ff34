"""Finding, reading and mapping checkpoints in the Hugging Face format of facebook/musicgen-*.

A checkpoint folder holds config.json (text_encoder / audio_encoder / decoder sections), the weights as
model.safetensors, sharded safetensors with model.safetensors.index.json, or pytorch_model.bin (read with
`weights_only=True`: never unpickle arbitrary objects), and the T5 tokenizer files. Hub ids are fetched
through huggingface_hub and its cache, so HF_HUB_OFFLINE and HF_HOME behave as users expect.
"""
from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import re
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from .config import MusicGenConfig

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read, or does not fit its config. The message names the problem."""


# -- locating -------------------------------------------------------------------------------------------
def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local folder, or a hub id downloaded (or found in the cache) -> local folder with the needed files."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{name} is a file; pass the checkpoint folder that holds config.json")
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", name):
        raise CheckpointError(f"unknown model {name!r}: not a local folder and not a hub id like facebook/musicgen-small")
    return _download(name)


def building_on_meta() -> bool:
    """Whether modules are being built on the meta device (as `load` builds models, before the checkpoint
    fills them)."""
    return torch.empty(0).is_meta


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding for weights a checkpoint fills. Built on the meta device (as `load` builds models) it skips
    the random init: on meta, that init runs through a Python reference that imports torch._dynamo, 0.8 s of
    every load that nothing else needs. Built on a real device it keeps the init."""
    if building_on_meta():
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


def _download(repo_id: str) -> Path:
    try:
        import huggingface_hub as hub
        from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                           RepositoryNotFoundError)
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CheckpointError(f"huggingface_hub is needed to download {repo_id}: {e}") from e

    def fetch(filename: str, required: bool = True) -> Path | None:
        try:
            return Path(hub.hf_hub_download(repo_id, filename))
        except (RepositoryNotFoundError, GatedRepoError) as e:
            raise CheckpointError(f"unknown model {repo_id!r} on the Hugging Face hub "
                                  f"(or it needs a login: {type(e).__name__})") from e
        except LocalEntryNotFoundError as e:
            if not required and _offline():
                return None
            raise CheckpointError(f"cannot download {repo_id}/{filename}: the hub is unreachable and the file is "
                                  f"not in the cache ({'HF_HUB_OFFLINE is set' if _offline() else 'no network'})") from e
        except EntryNotFoundError:
            if required:
                raise CheckpointError(f"{repo_id} has no {filename}") from None
            return None
        except OSError as e:
            raise CheckpointError(f"cannot download {repo_id}/{filename}: {e}") from e

    folder = fetch("config.json").parent
    for optional in ("generation_config.json", *TOKENIZER_FILES):
        fetch(optional, required=False)
    for candidate in WEIGHT_FILES:
        got = fetch(candidate, required=False)
        if got is None:
            continue
        if candidate.endswith(".index.json"):
            for shard in sorted(set(json.loads(got.read_text())["weight_map"].values())):
                fetch(shard)
        return folder
    if _offline():
        raise CheckpointError(f"{repo_id}'s weights are not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                              f"download it once with the network on")
    raise CheckpointError(f"{repo_id} has none of the weight files {', '.join(WEIGHT_FILES)}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


# -- reading --------------------------------------------------------------------------------------------
def read_config(folder: Path) -> tuple[MusicGenConfig, dict]:
    f = folder / "config.json"
    if not f.is_file():
        raise CheckpointError(f"missing file {f}: a MusicGen checkpoint folder holds config.json")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{f} is not a MusicGen config (a JSON object)")
    model_type = raw.get("model_type")
    if model_type not in (None, "musicgen", "musicgen_melody"):
        raise CheckpointError(f"{folder} holds a {model_type!r} model, not a MusicGen checkpoint")
    try:
        return MusicGenConfig.from_hf(raw, name=folder.name), raw
    except (ValueError, KeyError, TypeError, IndexError, ZeroDivisionError) as e:   # values of the wrong kind
        raise CheckpointError(f"{f}: {e}") from e


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, by their names in the file(s)."""
    from safetensors.torch import load_file

    for name in WEIGHT_FILES:
        f = folder / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(_read_one(folder / shard, load_file))
            return state
        return _read_one(f, load_file)
    raise CheckpointError(f"missing weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def _read_one(f: Path, load_file) -> dict[str, torch.Tensor]:
    if not f.is_file():
        raise CheckpointError(f"missing weight shard {f}")
    try:
        if f.suffix == ".safetensors":
            state = load_file(str(f))
        else:
            # mapped where the file is torch's zip format; the legacy format (torch < 1.6) is read whole
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
    except Exception as e:  # safetensors / pickle errors have many types; name the file instead
        raise CheckpointError(f"cannot read weights from {f}: {e}") from e
    _register_file_mapping(f, state)
    return state


def release(tensor: torch.Tensor) -> None:
    """Hint the OS to drop `tensor`'s pages from this process once the caller is done with it (Linux madvise).

    safetensors maps the checkpoint file, so the float weights that loading reads once (to fuse q/k/v, to
    quantise, to change precision) stay resident as file pages until the whole mapping goes, which made a
    quantised load peak near the size of the float checkpoint. Dropping them as they are consumed keeps the
    peak near the final model. Pages of a checkpoint file this module mapped (`_register_file_mapping`) are
    unmapped with MADV_DONTNEED: they stay in the page cache, so the next load of the same checkpoint reads
    them from memory, not from disk, and touching them again reads the file. Anything else gets MADV_PAGEOUT,
    which at most swaps anonymous memory out. Nothing changes for the program; where the call is unavailable
    nothing happens.
    """
    libc = _libc()
    if libc is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    page = _PAGE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page   # whole pages only
    if last > first:
        advice = _MADV_DONTNEED if _in_file_mapping(first, last) else _MADV_PAGEOUT
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), advice)


_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21   # Linux 5.4+; older kernels answer EINVAL, which is ignored
_PAGE = mmap.PAGESIZE
# (start, end, weak references to tensors read from the file): address ranges that map a checkpoint file.
# MADV_DONTNEED on anonymous memory would zero it, so a range counts only while one of its tensors is alive:
# then the mapping is alive, and no other memory can lie at those addresses.
_FILE_MAPPINGS: list[tuple[int, int, list]] = []


def _register_file_mapping(f: Path, state: dict[str, torch.Tensor]) -> None:
    """Note which address ranges map `f` (from /proc/self/maps), with the tensors that lie in them."""
    import weakref

    if _libc() is None:
        return
    _FILE_MAPPINGS[:] = [m for m in _FILE_MAPPINGS if any(r() is not None for r in m[2])]
    target = os.path.realpath(f)
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[5] != target:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        inside = [weakref.ref(t) for t in state.values()
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu" and start <= t.data_ptr() < end]
        if inside:
            _FILE_MAPPINGS.append((start, end, inside))


def _in_file_mapping(first: int, last: int) -> bool:
    for start, end, refs in _FILE_MAPPINGS:
        if start <= first and last <= end and any(r() is not None for r in refs):
            return True
    return False


@functools.lru_cache(maxsize=1)
def _libc():
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


# -- mapping Hugging Face names onto our modules ---------------------------------------------------------
_LM_RENAMES = [
    (r"^decoder\.model\.decoder\.embed_tokens\.(\d+)\.", r"lm.embed.\1."),
    (r"^decoder\.model\.decoder\.layer_norm\.", "lm.norm."),
    (r"^decoder\.lm_heads\.(\d+)\.", r"lm.heads.\1."),
    (r"^decoder\.model\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"lm.layers.\1.self_attn.out."),
    (r"^decoder\.model\.decoder\.layers\.(\d+)\.encoder_attn\.q_proj\.", r"lm.layers.\1.cross_attn.q."),
    (r"^decoder\.model\.decoder\.layers\.(\d+)\.encoder_attn\.out_proj\.", r"lm.layers.\1.cross_attn.out."),
    (r"^decoder\.model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"lm.layers.\1.norm1."),
    (r"^decoder\.model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"lm.layers.\1.norm_cross."),
    (r"^decoder\.model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"lm.layers.\1.norm2."),
    (r"^decoder\.model\.decoder\.layers\.(\d+)\.(fc1|fc2)\.", r"lm.layers.\1.\2."),
    (r"^enc_to_dec_proj\.", "text_proj."),
    (r"^audio_enc_to_dec_proj\.", "chroma_proj."),                           # melody checkpoints
    (r"^text_encoder\.", "text_encoder."),
    (r"^audio_encoder\.", "codec."),
]
# q/k/v projections are fused on load: (name pattern, fused target, position in the fusion, parts)
_FUSED = [
    (r"^decoder\.model\.decoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.weight$", r"lm.layers.\1.self_attn.qkv.weight",
     "qkv"),
    (r"^decoder\.model\.decoder\.layers\.(\d+)\.encoder_attn\.(k|v)_proj\.weight$", r"lm.layers.\1.cross_attn.kv.weight",
     "kv"),
]
_DROPPED = (re.compile(r"^text_encoder\.encoder\.embed_tokens\.weight$"),   # tied copy of text_encoder.shared
            re.compile(r"\.embed_positions\.weights$"))                      # sinusoids are recomputed


def map_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers MusicgenForConditionalGeneration names -> ours (weight norm folded, q/k/v fused).

    Consumes `state` (it is emptied): a fused tensor's pieces are released as soon as it is built, so loading
    holds about one copy of the weights instead of the checkpoint plus the fused copies."""
    from .codec import fold_weight_norm

    folded = fold_weight_norm(state)
    state.clear()
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name in list(folded):
        tensor = folded.pop(name)
        if any(p.search(name) for p in _DROPPED):
            continue
        for pattern, target, parts in _FUSED:
            m = re.match(pattern, name)
            if m:
                fused.setdefault(m.expand(target), {})[m.group(2)] = tensor
                break
        else:
            for pattern, repl in _LM_RENAMES:
                new, n = re.subn(pattern, repl, name)
                if n:
                    out[new] = tensor
                    break
            else:
                out[name] = tensor  # unknown: reported by load_into as unexpected
    for target in list(fused):
        pieces = fused.pop(target)
        order = "qkv" if target.endswith("qkv.weight") else "kv"
        missing = [p for p in order if p not in pieces]
        if missing:
            raise CheckpointError(f"checkpoint lacks the {'/'.join(missing)} projection for {target}")
        out[target] = torch.cat([pieces[p] for p in order], dim=0)
        for piece in pieces.values():
            release(piece)
    return out


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that names the first offending weight instead of dumping two long lists."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"{source}: weight {missing[0]!r} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected weight {unexpected[0]!r} not in the config's architecture"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise CheckpointError(f"{source}: weight {k!r} has shape {tuple(state[k].shape)}, "
                                  f"the config implies {tuple(v.shape)}")
    module.load_state_dict(state, strict=True, assign=True)
