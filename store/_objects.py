"""TEMPORARY (lead's branch): the ObjectStore contract, replaced by the helper's module at merge."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from ._errors import StoreError
from ._files import fsync_directory


class ObjectStoreError(StoreError):
    """An object could not be read or written."""


class ObjectStoreUnavailable(ObjectStoreError):
    """The store cannot be reached now."""


class ObjectStore(Protocol):
    @property
    def location(self) -> str: ...
    def sub(self, prefix: str) -> ObjectStore: ...
    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, data: bytes) -> None: ...
    def put_many(self, objects: Mapping[str, bytes]) -> None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...


class FilesystemObjects:
    def __init__(self, directory: Path, *, durable: bool = True) -> None:
        self.directory = Path(directory)
        self.durable = durable

    @property
    def location(self) -> str:
        return str(self.directory)

    def sub(self, prefix: str) -> FilesystemObjects:
        return FilesystemObjects(self.directory / prefix, durable=self.durable)

    def get(self, key: str) -> bytes | None:
        try:
            return (self.directory / key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ObjectStoreError(f"cannot read {self.directory / key}: {exc}") from exc

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def put(self, key: str, data: bytes) -> None:
        self.put_many({key: data})

    def put_many(self, objects: Mapping[str, bytes]) -> None:
        try:
            dirs = set()
            for key, data in objects.items():
                path = self.directory / key
                self._write(path, data)
                dirs.add(path.parent)
            for d in dirs if self.durable else ():
                fsync_directory(d)
        except OSError as exc:
            raise ObjectStoreError(f"cannot write under {self.directory}: {exc}") from exc

    def list(self, prefix: str = "") -> list[str]:
        base = self.directory / prefix
        root = base if prefix.endswith("/") or not prefix else base.parent
        if not root.is_dir():
            return []
        keys = []
        for path in root.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                key = path.relative_to(self.directory).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            path = self.directory / key
            path.unlink(missing_ok=True)
            if path.parent != self.directory and not any(path.parent.iterdir()):
                path.parent.rmdir()
        except OSError as exc:
            raise ObjectStoreError(f"cannot delete {self.directory / key}: {exc}") from exc
