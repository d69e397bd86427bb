"""Crash-safe file writes: write to a temporary file in the same folder, `fsync`, then rename over the target.

A reader (or a resumed run) sees either the old file or the new one, never a half-written one, also when the process
is killed mid-write: `os.replace` is atomic within a file system, and the `fsync` of the data before it and of the
folder after it make the new name point at complete data after a power loss too.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see the module docstring).

    Args:
        path: The file to write; its folder must exist.
        data: The whole new content.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int | None = 1) -> None:
    """Write `value` as strict JSON (no NaN / infinity) to `path` atomically, with a final newline."""
    atomic_write_text(path, json.dumps(value, indent=indent, allow_nan=False) + "\n")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
