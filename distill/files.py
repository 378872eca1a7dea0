"""Atomic file writes: a reader sees the old file or the new one, never half of one, and a failure (a kill, a full
disk) leaves any earlier file intact. Reports, plots, calibrators and generation configs all go through here."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def replace_atomically(path, write: Callable[[Path], None], mode: int = 0o644) -> Path:
    """write(tmp) into a temporary file next to `path`, then os.replace it onto `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        tmp.chmod(mode)  # mkstemp creates 0600; these files are meant to be shared like the model itself
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path, text: str, mode: int = 0o644) -> Path:
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), mode)
