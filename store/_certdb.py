"""Certificates, names and revocations in SQLite (WAL, synchronous=FULL).

Writes are group-committed: the :meth:`CertificateStore.add` and
:meth:`revoke` calls that arrive while the previous commit runs share the
next transaction and fsync, done on a dedicated thread, and each caller
resumes only once its row is durable. Reads use a second connection on the
event loop: in WAL mode they never wait for a commit in progress.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import CertStoreError
from ._sqlite import SqliteDatabase

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


class CertificateStore(SqliteDatabase):
    """The CA's durable record of what it issued and revoked."""

    error = CertStoreError
    schema = SCHEMA
    thread_name = "certdb"

    # --- writes -----------------------------------------------------------------

    @staticmethod
    def _insert(record: CertificateRecord) -> Callable[[sqlite3.Connection], None]:
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
        self.write_now(self._insert(record))

    async def add(self, record: CertificateRecord) -> None:
        """Insert ``record``; returns once it is committed (group commit)."""
        await self.write_soon(self._insert(record))

    async def revoke(self, serial: str, reason: str, at: float) -> bool:
        """Mark ``serial`` revoked; False if it was already revoked (first time wins)."""
        def write(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE certificates SET revoked_at=?, revocation_reason=? "
                "WHERE serial=? AND revoked_at IS NULL", (at, reason, serial))
            return cursor.rowcount == 1
        return bool(await self.write_soon(write))

    # --- reads ------------------------------------------------------------------

    def _row(self, row: tuple[Any, ...] | None) -> CertificateRecord | None:
        if row is None:
            return None
        names = tuple(n for (n,) in self.read_all(
            "SELECT name FROM names WHERE serial=? ORDER BY rowid", (row[0],)))
        return CertificateRecord(
            serial=row[0], der=row[1], fingerprint=row[2], spki_sha256=row[3], issuer=row[4],
            not_before=row[5], not_after=row[6], issued_at=row[7], revoked_at=row[8],
            revocation_reason=row[9], names=names)

    def get(self, serial: str) -> CertificateRecord | None:
        return self._row(self.read_one("SELECT * FROM certificates WHERE serial=?",
                                       (serial,)))

    def by_fingerprint(self, fingerprint: str) -> CertificateRecord | None:
        return self._row(self.read_one("SELECT * FROM certificates WHERE fingerprint=?",
                                       (fingerprint,)))

    def holders(self, name: str, now: float) -> list[CertificateRecord]:
        """Unexpired, unrevoked certificates that carry ``name``."""
        rows = self.read_all(
            "SELECT c.* FROM names n JOIN certificates c ON c.serial = n.serial "
            "WHERE n.name=? AND c.revoked_at IS NULL AND c.not_after > ?", (name, now))
        return [r for r in (self._row(row) for row in rows) if r is not None]

    def count(self) -> int:
        return int(self.read_one("SELECT count(*) FROM certificates")[0])

    def serials(self) -> list[str]:
        return [s for (s,) in self.read_all("SELECT serial FROM certificates")]

    # --- authorities ------------------------------------------------------------------

    def add_authority(self, record: AuthorityRecord, *, make_active: bool) -> None:
        def write(db: sqlite3.Connection) -> None:
            if make_active:
                db.execute("UPDATE authorities SET active=0 WHERE role=?", (record.role,))
            db.execute("INSERT OR REPLACE INTO authorities VALUES (?,?,?,?,?,?,?)",
                       (record.name, record.role, record.der, record.not_before,
                        record.not_after, record.created_at, int(make_active)))
        self.write_now(write)

    def authorities(self, role: str | None = None) -> list[AuthorityRecord]:
        sql = "SELECT * FROM authorities"
        params: tuple[Any, ...] = ()
        if role is not None:
            sql += " WHERE role=?"
            params = (role,)
        rows = self.read_all(sql + " ORDER BY created_at", params)
        return [AuthorityRecord(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6])) for r in rows]

    def active_authority(self, role: str) -> AuthorityRecord | None:
        active = [a for a in self.authorities(role) if a.active]
        return active[-1] if active else None
