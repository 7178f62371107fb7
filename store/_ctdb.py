"""The CT log's database: checkpoints committed by compare-and-swap, and indexes.

SQLite in WAL mode with ``synchronous=FULL``, in ``DATA/ct/ct.sqlite3``. The
tiles hold the log itself; this database holds what must change atomically
with each sequenced batch:

- ``checkpoints``: the latest signed tree head of each shard. A batch commits
  with ``UPDATE ... WHERE size = <old size> AND root = <old root>``, so of two
  writers that start from the same tree only one can advance it: the log
  cannot fork, whoever writes.
- ``leaves``: leaf hash -> index (``get-proof-by-hash``).
- ``submissions``: the hash of what an SCT covers (entry type and signed
  entry) -> index, timestamp and SCT signature, so a duplicate submission
  gets the SCT it got the first time.
- ``fingerprints`` and ``fingerprint_names``: SHA-256 and SPKI SHA-256 of
  every certificate logged or issued, with its names and log position.

Writes happen on one thread (the log's writer); reads use a second
connection, so proofs are never blocked by a commit's fsync.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import CheckpointConflict, CtStoreError
from ._sqlite import SqliteDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (
    shard INTEGER PRIMARY KEY,
    key_name TEXT NOT NULL,            -- keystore name of the shard's signing key
    log_id BLOB NOT NULL,              -- SHA-256 of the key's SubjectPublicKeyInfo
    origin TEXT NOT NULL,              -- checkpoint origin line
    created_at REAL NOT NULL,
    frozen INTEGER NOT NULL DEFAULT 0  -- 1: full, no more entries
);
CREATE TABLE IF NOT EXISTS checkpoints (
    shard INTEGER PRIMARY KEY REFERENCES shards(shard),
    size INTEGER NOT NULL,
    root BLOB NOT NULL,
    timestamp INTEGER NOT NULL,        -- milliseconds
    signature BLOB NOT NULL,           -- TLS digitally-signed TreeHeadSignature
    note TEXT NOT NULL                 -- the signed checkpoint
);
CREATE TABLE IF NOT EXISTS leaves (
    leaf_hash BLOB PRIMARY KEY,
    shard INTEGER NOT NULL,
    leaf_index INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS submissions (
    entry_hash BLOB NOT NULL,          -- SHA-256(entry_type || signed_entry)
    shard INTEGER NOT NULL,
    leaf_index INTEGER NOT NULL,
    timestamp INTEGER NOT NULL,
    sct_signature BLOB NOT NULL,
    PRIMARY KEY (entry_hash, shard)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fingerprints (
    sha256 BLOB PRIMARY KEY,           -- of the certificate's DER
    spki_sha256 BLOB NOT NULL,
    kind TEXT NOT NULL,                -- "x509" / "precert" (logged), "issued" (by the CA)
    shard INTEGER,
    leaf_index INTEGER,
    serial TEXT,
    first_seen REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS fingerprints_spki ON fingerprints(spki_sha256);
CREATE TABLE IF NOT EXISTS fingerprint_names (
    name TEXT NOT NULL,
    sha256 BLOB NOT NULL,
    PRIMARY KEY (name, sha256)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class ShardRecord:
    shard: int
    key_name: str
    log_id: bytes
    origin: str
    created_at: float
    frozen: bool


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    shard: int
    size: int
    root: bytes
    timestamp: int
    signature: bytes
    note: str


@dataclass(frozen=True, slots=True)
class FingerprintRecord:
    sha256: bytes
    spki_sha256: bytes
    kind: str
    shard: int | None
    leaf_index: int | None
    serial: str | None
    first_seen: float
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Submission:
    entry_hash: bytes
    shard: int
    leaf_index: int
    timestamp: int
    sct_signature: bytes


class CtDatabase(SqliteDatabase):
    """``DATA/ct/ct.sqlite3``."""

    error = CtStoreError
    schema = SCHEMA
    thread_name = "ctdb"

    def set_cache_size(self, mebibytes: int) -> None:
        """Page cache of the writing connection (the bulk loader raises it)."""
        with self._write_lock:
            self._db.execute(f"PRAGMA cache_size={-1024 * int(mebibytes)}")

    # --- writes (the log's own threads) -------------------------------------------------

    def add_shard(self, record: ShardRecord, checkpoint: CheckpointRecord) -> None:
        """Create a shard with its first (empty-tree) checkpoint; CheckpointConflict if
        it exists."""
        def write(db: sqlite3.Connection) -> None:
            try:
                db.execute("INSERT INTO shards VALUES (?,?,?,?,?,?)",
                           (record.shard, record.key_name, record.log_id, record.origin,
                            record.created_at, int(record.frozen)))
                db.execute("INSERT INTO checkpoints VALUES (?,?,?,?,?,?)",
                           (checkpoint.shard, checkpoint.size, checkpoint.root,
                            checkpoint.timestamp, checkpoint.signature, checkpoint.note))
            except sqlite3.IntegrityError as exc:
                raise CheckpointConflict(f"shard {record.shard} already exists") from exc
        self.write_now(write)

    def freeze_shard(self, shard: int) -> None:
        self.write_now(lambda db: db.execute("UPDATE shards SET frozen=1 WHERE shard=?",
                                             (shard,)))

    def commit_batch(self, old: CheckpointRecord, new: CheckpointRecord,
                     leaves: Sequence[tuple[bytes, int, int]],
                     submissions: Sequence[tuple[bytes, int, int, int, bytes]],
                     fingerprints: Sequence[tuple[Any, ...]],
                     names: Sequence[tuple[str, bytes]]) -> None:
        """Advance ``old`` to ``new`` and add the batch's index rows, in one transaction
        (one fsync). Rows are tuples in column order: ``leaves`` (leaf hash, shard,
        index), ``submissions`` (as :class:`Submission`), ``fingerprints`` (as
        :class:`FingerprintRecord` without names) and ``names`` (name, sha256).

        :raises CheckpointConflict: the stored checkpoint is no longer ``old``.
        """
        shard = old.shard

        def write(db: sqlite3.Connection) -> None:
            cursor = db.execute(
                "UPDATE checkpoints SET size=?, root=?, timestamp=?, signature=?, note=?"
                " WHERE shard=? AND size=? AND root=?",
                (new.size, new.root, new.timestamp, new.signature, new.note, shard,
                 old.size, old.root))
            if cursor.rowcount != 1:
                raise CheckpointConflict(
                    f"shard {shard}: the checkpoint is no longer size {old.size}; "
                    "another writer advanced the log")
            db.executemany("INSERT OR IGNORE INTO leaves VALUES (?,?,?)", leaves)
            db.executemany("INSERT OR IGNORE INTO submissions VALUES (?,?,?,?,?)",
                           submissions)
            db.executemany("INSERT OR IGNORE INTO fingerprints VALUES (?,?,?,?,?,?,?)",
                           fingerprints)
            db.executemany("INSERT OR IGNORE INTO fingerprint_names VALUES (?,?)", names)
        self.write_now(write)

    @staticmethod
    def _insert_fingerprints(fingerprints: Sequence[FingerprintRecord]
                             ) -> Callable[[sqlite3.Connection], None]:
        def write(db: sqlite3.Connection) -> None:
            db.executemany("INSERT OR IGNORE INTO fingerprints VALUES (?,?,?,?,?,?,?)",
                           [(f.sha256, f.spki_sha256, f.kind, f.shard, f.leaf_index,
                             f.serial, f.first_seen) for f in fingerprints])
            db.executemany("INSERT OR IGNORE INTO fingerprint_names VALUES (?,?)",
                           [(n, f.sha256) for f in fingerprints for n in f.names])
        return write

    def add_fingerprints(self, fingerprints: Sequence[FingerprintRecord]) -> None:
        """Insert fingerprint rows (existing ones are kept) and commit."""
        self.write_now(self._insert_fingerprints(fingerprints))

    def add_fingerprints_soon(self, fingerprints: Sequence[FingerprintRecord]
                              ) -> asyncio.Future[None]:
        """:meth:`add_fingerprints` in the next group commit, on the writer thread."""
        return self.submit(self._insert_fingerprints(list(fingerprints)))

    def bulk_load(self, shard: int, leaves: Iterable[tuple[bytes, int]],
                  submissions: Iterable[Submission]) -> None:
        """Insert index rows without a checkpoint change (the bulk loader commits the
        checkpoint last, with an empty :meth:`commit_batch`)."""
        def write(db: sqlite3.Connection) -> None:
            db.executemany("INSERT OR IGNORE INTO leaves VALUES (?,?,?)",
                           ((h, shard, i) for h, i in leaves))
            db.executemany("INSERT OR IGNORE INTO submissions VALUES (?,?,?,?,?)",
                           ((s.entry_hash, s.shard, s.leaf_index, s.timestamp,
                             s.sct_signature) for s in submissions))
        self.write_now(write)

    # --- reads (any thread) -------------------------------------------------------------

    def shards(self) -> list[ShardRecord]:
        return [ShardRecord(r[0], r[1], r[2], r[3], r[4], bool(r[5]))
                for r in self.read_all("SELECT * FROM shards ORDER BY shard")]

    def checkpoint(self, shard: int) -> CheckpointRecord | None:
        row = self.read_one("SELECT * FROM checkpoints WHERE shard=?", (shard,))
        return CheckpointRecord(*row) if row else None

    def leaf_index(self, leaf_hash: bytes) -> tuple[int, int] | None:
        """(shard, index) of a leaf hash."""
        row = self.read_one("SELECT shard, leaf_index FROM leaves WHERE leaf_hash=?", (leaf_hash,))
        return (int(row[0]), int(row[1])) if row else None

    def submission(self, entry_hash: bytes) -> Submission | None:
        """The first logging of a submission, in any shard."""
        row = self.read_one("SELECT * FROM submissions WHERE entry_hash=? ORDER BY shard LIMIT 1",
                        (entry_hash,))
        return Submission(*row) if row else None

    def submissions(self, entry_hashes: Sequence[bytes]) -> dict[bytes, Submission]:
        """The first logging of each of ``entry_hashes`` that the log holds."""
        found: dict[bytes, Submission] = {}
        for i in range(0, len(entry_hashes), 500):
            chunk = entry_hashes[i:i + 500]
            rows = self.read_all("SELECT * FROM submissions WHERE entry_hash IN ("
                             + ",".join("?" * len(chunk)) + ") ORDER BY shard DESC",
                             tuple(chunk))
            for row in rows:
                found[row[0]] = Submission(*row)  # the lowest shard wins
        return found

    def _fingerprint(self, row: Any) -> FingerprintRecord:
        names = tuple(n for (n,) in self.read_all(
            "SELECT name FROM fingerprint_names WHERE sha256=? ORDER BY name", (row[0],)))
        return FingerprintRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], names)

    def fingerprint(self, sha256: bytes) -> FingerprintRecord | None:
        row = self.read_one("SELECT * FROM fingerprints WHERE sha256=?", (sha256,))
        return self._fingerprint(row) if row else None

    def fingerprints_by_spki(self, spki_sha256: bytes,
                             limit: int = 100) -> list[FingerprintRecord]:
        rows = self.read_all("SELECT * FROM fingerprints WHERE spki_sha256=? "
                         "ORDER BY first_seen DESC LIMIT ?", (spki_sha256, limit))
        return [self._fingerprint(r) for r in rows]

    def fingerprints_by_name(self, name: str, limit: int = 100) -> list[FingerprintRecord]:
        rows = self.read_all("SELECT f.* FROM fingerprint_names n JOIN fingerprints f "
                         "ON f.sha256 = n.sha256 WHERE n.name=? "
                         "ORDER BY f.first_seen DESC LIMIT ?", (name, limit))
        return [self._fingerprint(r) for r in rows]
