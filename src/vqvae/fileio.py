"""The one atomic, durable file write, used by checkpoints, logs, codes, shards, plots and PNGs.

A temporary file in the target's folder is written, fsynced and renamed over the target, then the
folder is fsynced: a process killed at any moment, or a power cut, leaves the old file or the new
one, never half of either.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO, Any, Callable

from .errors import CheckpointError, DataError


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def named(error: OSError, path: str | Path, *names: str | Path) -> OSError:
    """``error`` naming ``path`` when it names no file, or one of ``names`` (a temporary file
    the user never sees): a full disk during ``write`` or ``fsync`` has no filename, and the
    message should say which file could not be written."""
    if error.filename is None or str(error.filename) in map(str, names):
        return type(error)(error.errno, error.strerror or str(error), str(path))
    return error


def write_with(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Atomically and durably write ``path`` with ``write(file)`` (e.g. a PIL image's or a
    figure's ``save``); its folder is created if needed. An :class:`OSError` (a full disk)
    names ``path``, and no temporary file is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
    except OSError as e:
        raise named(e, path, tmp) from None
    return path


def check_writable(path: str | Path, what: str = "file to write") -> Path:
    """Refuse, before any work, an output ``path`` that cannot be written as a file: one that is
    a folder, or whose nearest existing parent is a file or not writable: a :class:`DataError`
    naming it (one line, exit 2)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder: name the {what}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(f"{parent} is a file: {path} cannot be written below it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"{parent} is not writable: {path} cannot be written")
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably."""
    return write_with(path, lambda f: f.write(data))


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically and durably."""
    return write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def sha256(data: bytes) -> str:
    """The hex sha256 of ``data``: the checksum every artifact records for its reader."""
    return hashlib.sha256(data).hexdigest()


def check_sha256(path: Path, data: bytes, recorded: Any, record: Path) -> None:
    """``path``'s bytes ``data`` against the sha256 ``record`` holds for it from when it was
    written; a mismatch is a :class:`CheckpointError` naming both in one line. No recorded
    checksum (a file from before they were written) is accepted."""
    if isinstance(recorded, str) and sha256(data) != recorded:
        raise CheckpointError(f"{path} is corrupt: its sha256 differs from the one recorded in "
                              f"{record} when it was written")


def read_json(path: str | Path) -> Any:
    """A JSON file's content; a missing or malformed file is a :class:`CheckpointError` that
    names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
