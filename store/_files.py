"""Durable file writes: write a temporary file, fsync it, rename, fsync the directory."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_file(path: str | Path, data: bytes, *, sync: bool = True,
               mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (a temporary file, fsync'd unless ``sync`` is
    false, renamed over it); the rename is durable once the directory is fsync'd.
    Threads may write different files at once (each has its own temporary name)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, target)


def write_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file."""
    write_file(path, data, mode=mode)
    fsync_directory(Path(path).parent)


def fsync_directory(path: str | Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
