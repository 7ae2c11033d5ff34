"""File modes of outputs written through a private temporary file.

`tempfile.mkstemp` (and safetensors' `save_file`) create files readable by their owner only (0600). Outputs
that are renamed into place from such a file would keep that mode, where a file created with `open()` gets
0666 less the process umask: `as_created` gives them the latter.
"""
from __future__ import annotations

import os


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
