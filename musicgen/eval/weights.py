"""The embedders' weight files: found under their official names in `--weights DIR`, or downloaded once into
a cache folder, and identified in reports by their SHA-256."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

SOURCES = {
    "vggish-10086976.pth": "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
    "passt-s-f128-20sec-p16-s10-ap.474-swa.pt":
        "https://github.com/kkoutini/PaSST/releases/download/v0.0.5/passt-s-f128-20sec-p16-s10-ap.474-swa.pt",
    "music_audioset_epoch_15_esc_90.14.pt":
        "https://huggingface.co/lukewys/laion_clap/resolve/main/music_audioset_epoch_15_esc_90.14.pt",
    "roberta-base/config.json": "https://huggingface.co/FacebookAI/roberta-base/resolve/main/config.json",
    "roberta-base/vocab.json": "https://huggingface.co/FacebookAI/roberta-base/resolve/main/vocab.json",
    "roberta-base/merges.txt": "https://huggingface.co/FacebookAI/roberta-base/resolve/main/merges.txt",
}


def cache_dir() -> Path:
    """$MUSICGEN_CACHE or $XDG_CACHE_HOME/musicgen (default ~/.cache/musicgen), subfolder eval."""
    root = os.environ.get("MUSICGEN_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "musicgen"
    return Path(root) / "eval"


def resolve(name: str, weights_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The local path of weight file `name` (a key of SOURCES). With `weights_dir` the file must be there;
    without, it is downloaded into the cache on first use. A file that cannot be had is one ValueError line."""
    url = SOURCES[name]
    if weights_dir is not None:
        path = Path(weights_dir) / name
        if not path.is_file():
            raise ValueError(f"{name} is not in {weights_dir} (it comes from {url})")
        return path
    path = cache_dir() / "weights" / name
    if path.is_file():
        return path
    try:
        _download(url, path, progress)
    except OSError as e:
        raise ValueError(f"{name} is not in the cache {path.parent} and cannot be downloaded from {url} "
                         f"({getattr(e, 'reason', e)}); download it and pass --weights DIR") from None
    return path


def _download(url: str, path: Path, progress: bool) -> None:
    import urllib.request

    from tqdm import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, disable=not progress) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _numpy_globals() -> list:
    """What a pickled NumPy scalar or array needs: training scripts (laion_clap's among them) store epochs,
    metrics and learning rates as NumPy numbers beside the weights. Rebuilding them runs no code of the
    file's choosing; an array of Python objects still needs globals beyond these, which stay refused."""
    import numpy as np

    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):   # pickles made by NumPy 1 and 2
        allowed += [(core.scalar, f"{module}.scalar"), (core._reconstruct, f"{module}._reconstruct")]
    allowed += sorted({type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGSUVOMm"}, key=lambda t: t.__name__)
    return allowed


def read_state(path: str | os.PathLike) -> dict:
    """torch.load on CPU with weights_only=True: tensors, plain containers and NumPy numbers, nothing that can
    run code. A file that is not a PyTorch checkpoint, or that holds anything else, is one ValueError line."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the first global it refused ("Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y")
        words = str(e).split()
        found = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "GLOBAL"]
        if found:
            raise ValueError(f"refusing to load {path}: it pickles objects other than weights, such as "
                             f"{found[0]}") from None
        raise ValueError(f"cannot read {path}: not a PyTorch checkpoint (UnpicklingError)") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:   # not a zip or pickle at all: torch fails in many ways (RuntimeError, KeyError, ...)
        raise ValueError(f"cannot read {path}: not a PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    return state


def sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, remembered beside the cache by (path, size, mtime) so big files are read once."""
    path = Path(path).resolve()
    st = path.stat()
    memo_file = cache_dir() / "sha256.json"
    ident = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if ident in memo:
        return memo[ident]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    memo[ident] = h.hexdigest()
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sha256.", dir=memo_file.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, memo_file)
    except OSError:
        pass   # a read-only cache only costs the hashing again next time
    return memo[ident]
