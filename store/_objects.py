"""Object stores: named blobs under keys, on the local file system or in S3.

The CT tiles, checkpoints and issuers go through :class:`ObjectStore` so that a log can
keep them in a bucket (static-ct-api readers fetch them from there) or in a directory.
Every call blocks: callers run them on worker threads. :class:`ObjectStoreUnavailable`
means "cannot reach it now" (refused, timed out, 5xx, throttled): pause and retry.
Any other :class:`ObjectStoreError` is final.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from ._errors import ObjectStoreError
from ._files import fsync_directory, write_file


class ObjectStore(Protocol):
    """Blobs under ``/``-separated keys. Blocking: call from worker threads."""

    @property
    def location(self) -> str:
        """``s3://bucket/prefix`` or the directory, for messages and health."""
        ...

    def sub(self, prefix: str) -> ObjectStore:
        """The same store under ``prefix + "/"``."""
        ...

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is none."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Write the object; it is durable when this returns."""
        ...

    def put_many(self, objects: Mapping[str, bytes]) -> None:
        """Write the objects (concurrently where the backend can); all are durable when
        this returns, and if it raises some may be written and some not."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """The keys (relative to this store) that start with ``prefix``, sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; an absent one is fine."""
        ...

    def check(self) -> None:
        """Write, read back and remove a probe object: at start, so that a store the
        node cannot use stops it with one line."""
        ...


_TEMPORARY = re.compile(r"^\..*\.tmp\d+\.\d+$")
"""The temporary files write_file leaves only while writing (or after a crash)."""


def check_key(key: str, location: str) -> str:
    """``key`` if it is a relative ``/``-separated path without empty, ``.`` or ``..``
    parts (so that it names the same object on every backend)."""
    parts = key.split("/")
    if not key or any(part in ("", ".", "..") for part in parts) or "\x00" in key:
        raise ObjectStoreError(f"{location}: bad object key {key!r} (want a relative "
                               f"path without empty, '.' or '..' parts)")
    return key


def join_prefix(prefix: str, sub: str, location: str) -> str:
    """``prefix/sub`` with ``sub`` checked like a key (no leading or trailing ``/``)."""
    check_key(sub, location)
    return f"{prefix}/{sub}" if prefix else sub


class FilesystemObjects:
    """An :class:`ObjectStore` in a directory: a key is a file path below it, written
    durably (temporary file, fsync, rename, fsync of the directory).

    :param durable: False skips every fsync (a bulk loader that syncs the file
        system once at the end).
    """

    def __init__(self, directory: str | Path, *, durable: bool = True) -> None:
        self.dir = Path(directory)
        self.durable = durable

    @property
    def location(self) -> str:
        return str(self.dir)

    def sub(self, prefix: str) -> FilesystemObjects:
        return FilesystemObjects(self.dir / check_key(prefix, self.location),
                                 durable=self.durable)

    def get(self, key: str) -> bytes | None:
        path = self.dir / check_key(key, self.location)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise ObjectStoreError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def put(self, key: str, data: bytes) -> None:
        self.put_many({key: data})

    def put_many(self, objects: Mapping[str, bytes]) -> None:
        """Each file written and fsync'd, then each directory fsync'd once."""
        directories: set[Path] = set()
        path = self.dir
        try:
            for key, data in objects.items():
                path = self.dir / check_key(key, self.location)
                write_file(path, data, sync=self.durable)
                directories.add(path.parent)
            for directory in directories if self.durable else ():
                path = directory
                fsync_directory(directory)
        except OSError as exc:
            raise ObjectStoreError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def list(self, prefix: str = "") -> list[str]:
        head, _, _ = prefix.rpartition("/")
        start = self.dir / check_key(head, self.location) if head else self.dir
        keys: list[str] = []
        try:
            for root, directories, files in os.walk(start, onerror=_raise):
                relative = Path(root).relative_to(self.dir).as_posix()
                base = "" if relative == "." else relative + "/"
                directories[:] = [d for d in directories
                                  if (base + d).startswith(prefix[:len(base + d)])]
                keys.extend(base + name for name in files
                            if not _TEMPORARY.match(name) and (base + name).startswith(prefix))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ObjectStoreError(f"cannot list {start}: {exc.strerror or exc}") from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self.dir / check_key(key, self.location)
        try:
            path.unlink(missing_ok=True)
            if path.parent != self.dir and not any(path.parent.iterdir()):
                path.parent.rmdir()  # (a tile's partials: their directory goes with them)
        except (NotADirectoryError, FileNotFoundError):
            return
        except OSError as exc:
            raise ObjectStoreError(f"cannot delete {path}: {exc.strerror or exc}") from exc

    def check(self) -> None:
        """Verify at start that the directory can be written (one clear line if not)."""
        probe = ".trustchain-check"
        self.put(probe, b"ok")
        self.delete(probe)


def _raise(error: OSError) -> None:
    """os.walk's error hook: a missing start directory is an empty list, others fail."""
    raise error
