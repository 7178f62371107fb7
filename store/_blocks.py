"""The validator's chain in SQLite (WAL, ``synchronous=FULL``): what it must never forget.

``DATA/consensus/chain.sqlite3`` holds

- ``blocks``: every decided block with its commit certificate (both as the
  deterministic CBOR consensus hashes and signs), by height;
- ``decisions``: the digest of every committed decision, so that none is
  executed twice;
- ``evidence``: misbehaviour proven to this node, and the height that committed it;
- ``signing``: the last height/round/step this validator signed. It is written
  and fsync'd before a signed message leaves the node, so that a restarted
  validator cannot sign a conflicting vote.

The store holds bytes; ``handlers.consensus`` encodes and decodes them. Writes
run on one thread and are committed (fsync) when their coroutine returns;
reads use a second connection on the caller's thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._errors import ChainStoreError
from ._sqlite import SqliteDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    height INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    time_ms INTEGER NOT NULL,
    round INTEGER NOT NULL,
    block BLOB NOT NULL,
    commit_ BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS blocks_by_time ON blocks (time_ms);
CREATE TABLE IF NOT EXISTS decisions (
    digest BLOB PRIMARY KEY,
    height INTEGER NOT NULL,
    idx INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS evidence (
    id BLOB PRIMARY KEY,
    offender TEXT NOT NULL,
    height INTEGER NOT NULL,
    evidence BLOB NOT NULL,
    found_ms INTEGER NOT NULL,
    committed_height INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS validator_sets (
    from_height INTEGER PRIMARY KEY,
    validators BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS signing (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    state BLOB NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class StoredBlock:
    height: int
    id: bytes
    time_ms: int
    round: int
    block: bytes
    commit: bytes


@dataclass(frozen=True, slots=True)
class StoredEvidence:
    id: bytes
    offender: str
    height: int
    evidence: bytes
    found_ms: int
    committed_height: int | None


class ChainStore(SqliteDatabase):
    """Blocks, commits, evidence and signing state of one validator."""

    error = ChainStoreError
    schema = SCHEMA
    thread_name = "chain"

    def _transaction(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
        def write(db: sqlite3.Connection) -> None:
            for sql, params in statements:
                db.execute(sql, params)
        self.write_now(write)

    # --- signing state ------------------------------------------------------------------

    def signing_state(self) -> bytes | None:
        row = self.read_one("SELECT state FROM signing WHERE one = 1")
        return None if row is None else bytes(row[0])

    def save_signing_state_now(self, state: bytes) -> None:
        self._transaction([("INSERT OR REPLACE INTO signing (one, state) VALUES (1, ?)",
                            (state,))])

    async def save_signing_state(self, state: bytes) -> None:
        """Durable (fsync) when this returns."""
        await self.write(lambda db: db.execute(
            "INSERT OR REPLACE INTO signing (one, state) VALUES (1, ?)", (state,)))

    # --- blocks ---------------------------------------------------------------------------

    def add_block_now(self, block: StoredBlock, decision_digests: Iterable[bytes],
                      evidence_ids: Iterable[bytes], signing_state: bytes | None,
                      validators: bytes | None = None) -> None:
        statements: list[tuple[str, tuple[Any, ...]]] = [(
            "INSERT INTO blocks (height, id, time_ms, round, block, commit_) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (block.height, block.id, block.time_ms, block.round, block.block, block.commit))]
        statements += [("INSERT OR IGNORE INTO decisions (digest, height, idx) VALUES (?, ?, ?)",
                        (digest, block.height, i)) for i, digest in enumerate(decision_digests)]
        statements += [("UPDATE evidence SET committed_height = ? WHERE id = ?",
                        (block.height, ev)) for ev in evidence_ids]
        if signing_state is not None:
            statements.append(("INSERT OR REPLACE INTO signing (one, state) VALUES (1, ?)",
                               (signing_state,)))
        if validators is not None:
            statements.append(("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                               ("validators", validators)))
        self._transaction(statements)

    async def add_block(self, block: StoredBlock, decision_digests: Iterable[bytes],
                        evidence_ids: Iterable[bytes] = (),
                        signing_state: bytes | None = None,
                        validators: bytes | None = None) -> None:
        """Store a decided block, the evidence it commits, and optionally the signing
        state and the next validator set, in one durable commit."""
        digests, ids = list(decision_digests), list(evidence_ids)
        await asyncio.get_running_loop().run_in_executor(
            self._writer, self.add_block_now, block, digests, ids, signing_state, validators)

    # --- validator sets by height ----------------------------------------------------

    def record_validator_set_now(self, from_height: int, validators: bytes) -> None:
        """``validators`` (the deterministic CBOR ``[[public_key, power], ...]``) decide
        every height from ``from_height`` on, until a later record."""
        self._transaction([("INSERT OR REPLACE INTO validator_sets (from_height, validators) "
                            "VALUES (?, ?)", (from_height, validators))])

    async def record_validator_set(self, from_height: int, validators: bytes) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._writer, self.record_validator_set_now, from_height, validators)

    def validator_set_at(self, height: int) -> bytes | None:
        """The recorded set that decides ``height``; None if none was recorded by then."""
        row = self.read_one("SELECT validators FROM validator_sets WHERE from_height <= ? "
                            "ORDER BY from_height DESC LIMIT 1", (height,))
        return None if row is None else bytes(row[0])

    def first_recorded_validator_set(self) -> int | None:
        """The height from which validator sets are known (None: none recorded yet)."""
        row = self.read_one("SELECT MIN(from_height) FROM validator_sets")
        return None if row is None or row[0] is None else int(row[0])

    def meta(self, key: str) -> bytes | None:
        row = self.read_one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else bytes(row[0])

    def _row(self, row: tuple[Any, ...] | None) -> StoredBlock | None:
        if row is None:
            return None
        return StoredBlock(height=row[0], id=bytes(row[1]), time_ms=row[2], round=row[3],
                           block=bytes(row[4]), commit=bytes(row[5]))

    _COLUMNS = "height, id, time_ms, round, block, commit_"

    def block(self, height: int) -> StoredBlock | None:
        return self._row(self.read_one(
            f"SELECT {self._COLUMNS} FROM blocks WHERE height = ?", (height,)))

    def latest(self) -> StoredBlock | None:
        return self._row(self.read_one(
            f"SELECT {self._COLUMNS} FROM blocks ORDER BY height DESC LIMIT 1"))

    def blocks(self, start: int, limit: int) -> list[StoredBlock]:
        rows = self.read_all(
            f"SELECT {self._COLUMNS} FROM blocks WHERE height >= ? ORDER BY height LIMIT ?",
            (start, limit))
        return [b for b in map(self._row, rows) if b is not None]

    def first_at_or_after(self, time_ms: int) -> StoredBlock | None:
        """The first block whose time is ``time_ms`` or later."""
        return self._row(self.read_one(
            f"SELECT {self._COLUMNS} FROM blocks WHERE time_ms >= ? ORDER BY height LIMIT 1",
            (time_ms,)))

    def blocks_between(self, start_ms: int, end_ms: int) -> list[StoredBlock]:
        """Blocks stamped in ``[start_ms, end_ms)``."""
        rows = self.read_all(
            f"SELECT {self._COLUMNS} FROM blocks WHERE time_ms >= ? AND time_ms < ? "
            "ORDER BY height", (start_ms, end_ms))
        return [b for b in map(self._row, rows) if b is not None]

    def decision(self, digest: bytes) -> tuple[int, int] | None:
        """``(height, index)`` of a committed decision."""
        row = self.read_one("SELECT height, idx FROM decisions WHERE digest = ?", (digest,))
        return None if row is None else (row[0], row[1])

    # --- evidence -----------------------------------------------------------------------------

    async def add_evidence(self, evidence: StoredEvidence) -> bool:
        """Record evidence once; False if it was already known."""
        def insert(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "INSERT OR IGNORE INTO evidence (id, offender, height, evidence, found_ms, "
                "committed_height) VALUES (?, ?, ?, ?, ?, ?)",
                (evidence.id, evidence.offender, evidence.height, evidence.evidence,
                 evidence.found_ms, evidence.committed_height))
            return cursor.rowcount == 1
        return await self.write(insert)

    def evidence(self) -> list[StoredEvidence]:
        rows = self.read_all(
            "SELECT id, offender, height, evidence, found_ms, committed_height FROM evidence "
            "ORDER BY found_ms")
        return [StoredEvidence(id=bytes(r[0]), offender=r[1], height=r[2],
                               evidence=bytes(r[3]), found_ms=r[4], committed_height=r[5])
                for r in rows]
