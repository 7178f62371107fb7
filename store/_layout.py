"""The data directory: the one place that names the files a node keeps.

Services never choose paths: the composition root asks :class:`DataDirectory`
for each store, and each store object knows its own file. The layout::

    DATA/
      lock                     held (flock) by the one process using the directory
      keys/                    software keys (development; production keys live in the HSM)
      root.pem                 the CA root certificate, for clients
      admin/admin.key, .pem    the administrator credential (an operator's, not the CA's)
      tls/server.key, .pem     the node's own QUIC/TLS credential
      ca/authorities.sqlite3   this CA node's root, intermediates, administrators
      audit/audit.log          the hash-chained audit log
      audit/audit.uploaded     how far its segments are in the Object Lock bucket (S3)
      state/state.sqlite3      the replicated state: certificates, CT, stake, ...
      ct/<n>/                  each CT shard's tiles
      consensus/beacons.sqlite3 the epoch beacons
      consensus/chain.sqlite3  blocks, commits, evidence, signing state
      dns/keys.json            the DNSSEC key schedule (the keys are in the keystore)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._audit import AuditLog, CheckpointSigner
from ._audit_archive import SegmentBucket, SegmentUploader
from ._authorities import AuthorityStore
from ._beacons import BeaconStore
from ._blocks import ChainStore
from ._errors import DataDirectoryInUse, FileStoreError
from ._files import write_atomic
from ._objects import FilesystemObjects, ObjectStore
from ._state import StateDatabase
from ._tiles import TileLog
from ._tls import TlsCredential, credential_paths


class DurableFile:
    """One small file, always replaced whole: a crash leaves the old or the new one.

    :param mode: permission bits of the file (0o600 for anything secret).
    """

    def __init__(self, path: Path, *, mode: int = 0o644) -> None:
        self.path = path
        self.mode = mode

    def __str__(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> bytes | None:
        """The file's bytes, or None if there is no file.

        :raises FileStoreError: it exists but cannot be read.
        """
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FileStoreError(f"cannot read {self.path}: {exc}") from exc

    def write(self, data: bytes) -> None:
        """Replace the file with ``data``, durably (fsync'd before this returns)."""
        try:
            write_atomic(self.path, data, mode=self.mode)
        except OSError as exc:
            raise FileStoreError(f"cannot write {self.path}: {exc}") from exc


class JsonFile(DurableFile):
    """A :class:`DurableFile` holding one JSON document."""

    def load(self) -> Any:
        """The document, or None if there is no file.

        :raises FileStoreError: the file cannot be read or is not JSON.
        """
        data = self.read()
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise FileStoreError(f"{self.path} is not valid JSON: {exc}") from exc

    def save(self, document: Any) -> None:
        self.write(json.dumps(document, indent=1).encode())


class AdminCredential:
    """The administrator's key and certificate (PEM), made by the CA for an operator.

    The key is a file on purpose: it belongs to a person and can be moved off
    the machine.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key = DurableFile(directory / "admin.key", mode=0o600)
        self.certificate = DurableFile(directory / "admin.pem")

    def exists(self) -> bool:
        return self.certificate.exists()

    def install(self, key_pem: bytes, certificate_pem: bytes) -> None:
        """Write the key (0600) first, then the certificate that makes it usable."""
        self.key.write(key_pem)
        self.certificate.write(certificate_pem)


class TileDirectory:
    """The CT log's tiles: shard *n* under the prefix ``n/`` (static-ct-api layout) of a
    local directory, or of a remote object store (``ct.storage.backend = "s3"``).

    :param objects: where the tiles go.
    :param staging: the local directory under which each shard stages its bundles
        before their checkpoint is committed (``<staging>/<n>/staging``); None for a
        remote store, which takes the tiles before the commit instead.
    """

    def __init__(self, objects: ObjectStore, *, staging: Path | None) -> None:
        self.objects = objects
        self.staging = staging

    @classmethod
    def in_directory(cls, directory: Path) -> TileDirectory:
        """Tiles and staged bundles as files under ``directory``."""
        return cls(FilesystemObjects(directory), staging=directory)

    @property
    def location(self) -> str:
        return self.objects.location

    def shard(self, number: int) -> TileLog:
        """The tiles of shard ``number`` (created empty if missing)."""
        name = str(number)
        staging = None if self.staging is None else self.staging / name / "staging"
        return TileLog(self.objects.sub(name), name=name, staging=staging)


class DataDirectory:
    """Every durable file of one node, under one directory.

    :param ct_directory: where the CT log lives instead of ``DATA/ct``
        (``ct.storage_path``), if set.
    :param ct_objects: the remote object store of the CT tiles (``ct.storage``),
        if they are not on local disk.
    """

    def __init__(self, root: Path, *, ct_directory: Path | None = None,
                 ct_objects: ObjectStore | None = None) -> None:
        self.root = root
        self._ct = ct_directory or root / "ct"
        self._ct_objects = ct_objects

    def create(self) -> None:
        """Make the directory itself if it is missing."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FileStoreError(f"cannot create the data directory {self.root}: {exc}") from exc

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory for this process alone while the block runs.

        Two nodes (or a node and ``trustchain init``) on one directory would each
        append to the same chain, log and audit trail: the second is refused before
        it opens anything. The lock is an ``flock`` on ``DATA/lock``, released by the
        kernel when the process ends however it ends; the file names the holder's pid.

        :raises DataDirectoryInUse: another process holds it.
        :raises FileStoreError: the directory or its lock file cannot be made.
        """
        self.create()
        path = self.root / "lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise FileStoreError(f"cannot open the lock file {path}: {exc}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                raise DataDirectoryInUse(
                    f"data directory {self.root} is in use by another process"
                    + (f" (pid {holder})" if holder.isdigit() else "")
                    + ": a running node? Stop it, or give another --data-dir") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    # --- the certificate authority --------------------------------------------------

    def authorities(self) -> AuthorityStore:
        return AuthorityStore(self.root / "ca" / "authorities.sqlite3")

    def state(self) -> StateDatabase:
        """The replicated state (certificates, CT tree, stake, ...)."""
        return StateDatabase(self.state_path)

    @property
    def state_path(self) -> Path:
        """The state database (``trustchain ct check`` finds the committed trees there)."""
        return self.root / "state" / "state.sqlite3"

    def audit_log(self, signer: CheckpointSigner | None, *,
                  checkpoint_every: int = 1000, check_all: bool = False,
                  archive: SegmentBucket | None = None, retention: float = 0.0) -> AuditLog:
        """The audit log, its chain checked from the last signed checkpoint (``check_all``:
        from the first record) before anything is appended; with ``archive``, every
        signed segment is also uploaded there, locked for ``retention`` seconds."""
        segments = None if archive is None else SegmentUploader(
            archive, log_path=self.audit_path, marker=self.audit_upload_marker,
            retention=retention)
        return AuditLog(self.audit_path, signer=signer, checkpoint_every=checkpoint_every,
                        check_all=check_all, segments=segments)

    @property
    def audit_upload_marker(self) -> Path:
        """Where the audit log's last uploaded segment ends (a cache of the bucket's)."""
        return self.root / "audit" / "audit.uploaded"

    @property
    def audit_path(self) -> Path:
        """The audit log file (``trustchain audit verify`` reads it without a node)."""
        return self.root / "audit" / "audit.log"

    def root_certificate(self) -> DurableFile:
        """``root.pem``: what clients trust (``--cafile``)."""
        return DurableFile(self.root / "root.pem")

    def admin_credential(self) -> AdminCredential:
        return AdminCredential(self.root / "admin")

    def tls_credential(self) -> TlsCredential:
        return credential_paths(self.root)

    # --- certificate transparency ---------------------------------------------------

    def ct_tiles(self) -> TileDirectory:
        if self._ct_objects is not None:
            return TileDirectory(self._ct_objects, staging=None)
        return TileDirectory.in_directory(self._ct)

    # --- consensus ------------------------------------------------------------------

    def beacons(self) -> BeaconStore:
        return BeaconStore(self.root / "consensus" / "beacons.sqlite3")

    def chain(self) -> ChainStore:
        return ChainStore(self.root / "consensus" / "chain.sqlite3")

    # --- DNS ------------------------------------------------------------------------

    def dns_key_schedule(self) -> JsonFile:
        return JsonFile(self.root / "dns" / "keys.json")
