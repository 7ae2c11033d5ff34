"""Outputs written whole or not at all, with the mode `open()` would give them.

`write_atomically` writes through a temporary file beside the output and renames it into place, so a reader
(or a run killed half-way) sees the old file or the whole new one. `tempfile.mkstemp` (and safetensors'
`save_file`) create files readable by their owner only (0600), where a file created with `open()` gets 0666
less the process umask: `as_created` gives them the latter.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def umask() -> int:
    """The process umask. Reading it by setting it is not safe while other threads create files, so Linux's
    /proc is asked first."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_created(path: str | os.PathLike) -> None:
    """Give `path` the mode `open()` would have created it with (0666 less the umask)."""
    os.chmod(path, 0o666 & ~umask())


def write_atomically(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> None:
    """`write(tmp)` fills a temporary file in `path`'s folder (named with `suffix`), which then replaces `path`
    with the mode open() gives; on any failure the temporary file goes and `path` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        write(tmp)
        as_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
