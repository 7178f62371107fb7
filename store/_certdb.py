"""Certificates, names and revocations in SQLite (WAL, synchronous=FULL).

Writes are group-committed: the :meth:`CertificateStore.add` and
:meth:`revoke` calls that arrive while the previous commit runs share the
next transaction and fsync, done on a dedicated thread, and each caller
resumes only once its row is durable. Reads use a second connection on the
event loop: in WAL mode they never wait for a commit in progress.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._sqlite import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,           -- lowercase hex, no leading zeros stripped
    der BLOB NOT NULL,
    fingerprint TEXT NOT NULL,         -- SHA-256 of the DER, hex
    spki_sha256 TEXT NOT NULL,         -- SHA-256 of the SubjectPublicKeyInfo, hex
    issuer TEXT NOT NULL,              -- the issuing key's name
    not_before REAL NOT NULL,
    not_after REAL NOT NULL,
    issued_at REAL NOT NULL,
    revoked_at REAL,
    revocation_reason TEXT
);
CREATE INDEX IF NOT EXISTS certificates_fingerprint ON certificates(fingerprint);
CREATE TABLE IF NOT EXISTS names (
    name TEXT NOT NULL,                -- DNS name or IPv6 address (compressed form)
    serial TEXT NOT NULL REFERENCES certificates(serial),
    PRIMARY KEY (name, serial)
);
CREATE TABLE IF NOT EXISTS authorities (
    name TEXT PRIMARY KEY,             -- key name: "root", "intermediate-1", ...
    role TEXT NOT NULL,                -- "root" | "intermediate"
    der BLOB NOT NULL,
    not_before REAL NOT NULL,
    not_after REAL NOT NULL,
    created_at REAL NOT NULL,
    active INTEGER NOT NULL DEFAULT 0
);
"""


class CertStoreError(Exception):
    """The certificate database failed; wraps sqlite3 errors."""


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    serial: str
    der: bytes
    fingerprint: str
    spki_sha256: str
    issuer: str
    not_before: float
    not_after: float
    issued_at: float
    revoked_at: float | None
    revocation_reason: str | None
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorityRecord:
    name: str
    role: str
    der: bytes
    not_before: float
    not_after: float
    created_at: float
    active: bool


def _connect(path: Path) -> sqlite3.Connection:
    return connect(path, SCHEMA)


class CertificateStore:
    """The CA's durable record of what it issued and revoked."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = _connect(self.path)
            self._reader = sqlite3.connect(self.path, check_same_thread=False,
                                           isolation_level=None)
        except sqlite3.Error as exc:
            raise CertStoreError(f"cannot open {self.path}: {exc}") from exc
        self._lock = threading.Lock()  # the writer connection
        self._committing = False
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="certdb")
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any],
                                  asyncio.Future[Any]]] = []
        self._flush_scheduled = False

    # --- writes -----------------------------------------------------------------

    def _insert(self, record: CertificateRecord) -> Callable[[sqlite3.Connection], None]:
        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO certificates VALUES (?,?,?,?,?,?,?,?,?,?)",
                (record.serial, record.der, record.fingerprint, record.spki_sha256,
                 record.issuer, record.not_before, record.not_after, record.issued_at,
                 record.revoked_at, record.revocation_reason))
            db.executemany("INSERT INTO names VALUES (?,?)",
                           [(n, record.serial) for n in record.names])
        return write

    def add_now(self, record: CertificateRecord) -> None:
        """Insert ``record`` and commit (fsync) before returning."""
        self._run_batch([self._insert(record)])

    async def add(self, record: CertificateRecord) -> None:
        """Insert ``record``; returns once it is committed (group commit)."""
        await self._submit(self._insert(record))

    async def revoke(self, serial: str, reason: str, at: float) -> bool:
        """Mark ``serial`` revoked; False if it was already revoked (first time wins)."""
        def write(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE certificates SET revoked_at=?, revocation_reason=? "
                "WHERE serial=? AND revoked_at IS NULL", (at, reason, serial))
            return cursor.rowcount == 1
        return bool(await self._submit(write))

    def _run_batch(self, writes: list[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        """One transaction for all ``writes``; a failing write fails alone."""
        results: list[Any] = []
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for write in writes:
                    db.execute("SAVEPOINT w")
                    try:
                        results.append(write(db))
                        db.execute("RELEASE w")
                    except sqlite3.Error as exc:
                        db.execute("ROLLBACK TO w")
                        db.execute("RELEASE w")
                        results.append(CertStoreError(str(exc)))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return results

    async def _submit(self, write: Callable[[sqlite3.Connection], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((write, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        result = await future
        if isinstance(result, CertStoreError):
            raise result
        return result

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._committing or not self._pending:
            return  # the running commit's completion flushes what has queued up
        batch, self._pending = self._pending, []
        self._committing = True
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._writer, self._run_batch, [w for w, _ in batch])

        def done(job: asyncio.Future[list[Any]]) -> None:
            self._committing = False
            if self._pending:
                self._flush()
            error = job.exception()
            for i, (_, future) in enumerate(batch):
                if future.done():
                    continue
                if error is not None:
                    future.set_exception(CertStoreError(f"commit failed: {error}"))
                else:
                    future.set_result(job.result()[i])
        job.add_done_callback(done)

    # --- reads ------------------------------------------------------------------

    def _row(self, row: tuple[Any, ...] | None) -> CertificateRecord | None:
        if row is None:
            return None
        names = tuple(n for (n,) in self._reader.execute(
            "SELECT name FROM names WHERE serial=? ORDER BY rowid", (row[0],)))
        return CertificateRecord(
            serial=row[0], der=row[1], fingerprint=row[2], spki_sha256=row[3], issuer=row[4],
            not_before=row[5], not_after=row[6], issued_at=row[7], revoked_at=row[8],
            revocation_reason=row[9], names=names)

    def get(self, serial: str) -> CertificateRecord | None:
        return self._row(self._reader.execute(
            "SELECT * FROM certificates WHERE serial=?", (serial,)).fetchone())

    def by_fingerprint(self, fingerprint: str) -> CertificateRecord | None:
        return self._row(self._reader.execute(
            "SELECT * FROM certificates WHERE fingerprint=?", (fingerprint,)).fetchone())

    def holders(self, name: str, now: float) -> list[CertificateRecord]:
        """Unexpired, unrevoked certificates that carry ``name``."""
        rows = self._reader.execute(
            "SELECT c.* FROM names n JOIN certificates c ON c.serial = n.serial "
            "WHERE n.name=? AND c.revoked_at IS NULL AND c.not_after > ?",
            (name, now)).fetchall()
        return [r for r in (self._row(row) for row in rows) if r is not None]

    def count(self) -> int:
        return int(self._reader.execute("SELECT count(*) FROM certificates").fetchone()[0])

    def serials(self) -> list[str]:
        return [s for (s,) in self._reader.execute("SELECT serial FROM certificates")]

    # --- authorities ------------------------------------------------------------------

    def add_authority(self, record: AuthorityRecord, *, make_active: bool) -> None:
        def write(db: sqlite3.Connection) -> None:
            if make_active:
                db.execute("UPDATE authorities SET active=0 WHERE role=?", (record.role,))
            db.execute("INSERT OR REPLACE INTO authorities VALUES (?,?,?,?,?,?,?)",
                       (record.name, record.role, record.der, record.not_before,
                        record.not_after, record.created_at, int(make_active)))
        result = self._run_batch([write])[0]
        if isinstance(result, CertStoreError):
            raise result

    def authorities(self, role: str | None = None) -> list[AuthorityRecord]:
        sql = "SELECT * FROM authorities"
        params: tuple[Any, ...] = ()
        if role is not None:
            sql += " WHERE role=?"
            params = (role,)
        rows = self._reader.execute(sql + " ORDER BY created_at", params).fetchall()
        return [AuthorityRecord(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6])) for r in rows]

    def active_authority(self, role: str) -> AuthorityRecord | None:
        active = [a for a in self.authorities(role) if a.active]
        return active[-1] if active else None

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        with self._lock:
            self._db.close()
        self._reader.close()
