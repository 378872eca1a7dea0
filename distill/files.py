"""Atomic file writes: a reader sees the old file or the new one, never half of one, and a failure (a kill, a full
disk) leaves any earlier file intact. Reports, plots, calibrators and generation configs all go through here.

Directories: a command replaces only a directory it created itself, recognised by the marker file it wrote there
(`CREATED_MARKER`, shared by `mtp export` and `mtp demo`), and never one that is, contains or lies inside its input.
Output paths are checked (`check_output_file`, `check_output_dir`) before any slow work starts."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from distill.errors import UserError


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


# ---------------------------------------------------------------------------------------------------------------------
# Directories the tools created: only those may be replaced


CREATED_MARKER = ".mtp-created"  # written into every directory `mtp export` / `mtp demo` created
LEGACY_MARKERS = {".mtp-demo": "mtp demo"}  # what `mtp demo` wrote before the marker was shared


def mark_created(directory, command: str) -> Path:
    """Record that `command` created `directory`, so a later run of it may replace the directory (and nothing else)."""
    path = Path(directory) / CREATED_MARKER
    path.write_text(f"created by `{command}`; a re-run may replace this directory's contents\n", encoding="utf-8")
    path.chmod(0o644)
    return path


def created_by(directory) -> str | None:
    """The command whose marker `directory` holds (e.g. "mtp export"), or None for a directory no command created."""
    directory = Path(directory)
    marker = directory / CREATED_MARKER
    if marker.is_file():
        text = marker.read_text(encoding="utf-8", errors="replace")
        if text.startswith("created by `") and "`" in text[12:]:
            return text[12 : text.index("`", 12)]
        return None
    return next((command for name, command in LEGACY_MARKERS.items() if (directory / name).is_file()), None)


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_replaceable_dir(output, *, command: str, flag: str, overwrite: bool, sources=()) -> Path:
    """UserError unless `output` may be written (created, or replaced with `overwrite`); returns it resolved.

    Refused always: an existing non-directory; a directory that is, contains or lies inside any of `sources` (the
    inputs of the command). Refused without `overwrite`: a non-empty directory. Refused even with `overwrite`: a
    non-empty directory that `command` did not create (no marker): it may hold anything."""
    output = Path(output).expanduser().resolve()
    for source in sources:
        if source is None:
            continue
        source = Path(source).expanduser()
        if source.exists() and _overlaps(output, source.resolve()):
            raise UserError(f"{flag} {output} overlaps the input {source} (the same directory, inside it or around "
                            "it); choose a directory outside the input")
    if output.exists() and not output.is_dir():
        raise UserError(f"{flag} {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()):
        if created_by(output) != command:
            raise UserError(f"{flag} {output} exists, is not empty and was not created by `{command}`; choose a new "
                            "or empty directory")
        if not overwrite:
            raise UserError(f"{flag} {output} exists and is not empty; pass --overwrite to replace it")
    check_writable(output, flag)
    return output


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path, flag: str) -> None:
    """UserError unless a file or directory could be created at `path` (its nearest existing ancestor is a writable
    directory). Probes with a temporary directory that is removed at once, so nothing is left behind."""
    path = Path(path).expanduser()
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UserError(f"{flag} {path}: {base} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mtp-write-test-", dir=base))
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write in {base} ({exc.strerror or type(exc).__name__})") from None


def check_output_file(path, flag: str) -> Path:
    """UserError unless `path` can be written as a file (not a directory, its directory exists or can be made). An
    existing file is replaced, not written into: its directory is what must be writable."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory")
    check_writable(path.parent if path.exists() else path, flag)
    return path


def check_output_dir(path, flag: str) -> Path:
    """UserError unless `path` is, or can be made, a writable directory."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} exists and is not a directory")
    check_writable(path, flag)
    return path


def share_files(directory) -> None:
    """Give every file under `directory` the user's umask (savers such as safetensors and mkstemp create 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(directory):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
    os.chmod(directory, 0o777 & ~mask)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, else its type name (for one-line errors)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
