"""The consensus ledger in SQLite (WAL): stake, epoch beacons, and used proofs of work.

``DATA/consensus/ledger.sqlite3`` holds

- ``stake``: the amount each requester key holds (by key id, the SHA-256 of its
  DER SubjectPublicKeyInfo, in hex), with every change in ``stake_changes``;
- ``beacons``: one signed beacon per epoch, chained by ``previous``;
- ``used_work``: the work hash of every admitted proof set, per epoch, so that
  no proof set is accepted twice, across restarts too.

Stake balances are also kept in memory (the ledger is small and read on every
request); writes go through one worker thread and update memory after their
commit. ``used_work`` inserts are group-committed like the certificate store's:
everything recorded in one event-loop turn shares one transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._sqlite import connect

log = logging.getLogger("trustchain.ledger")

SCHEMA = """
CREATE TABLE IF NOT EXISTS stake (
    key_id TEXT PRIMARY KEY,           -- SHA-256 of the key's DER SPKI, lowercase hex
    amount INTEGER NOT NULL CHECK (amount >= 0),
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS stake_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL,
    before INTEGER NOT NULL,
    after INTEGER NOT NULL,
    reason TEXT NOT NULL,              -- "genesis" | "faucet" | ...
    time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS beacons (
    epoch INTEGER PRIMARY KEY,
    start INTEGER NOT NULL,            -- epoch * epoch_length, seconds since 1970
    value BLOB NOT NULL,               -- 32 bytes
    previous BLOB NOT NULL,            -- the previous beacon's value (32 zero bytes first)
    signature BLOB NOT NULL,           -- by the node's "beacon" key over the statement
    public_key BLOB NOT NULL,          -- DER SPKI of that key
    algorithm TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS used_work (
    hash BLOB PRIMARY KEY,             -- SHA-256(work prefix || nonce)
    epoch INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS used_work_epoch ON used_work(epoch);
"""


class LedgerError(Exception):
    """The ledger database failed; wraps sqlite3 errors."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BeaconRecord:
    """One epoch's beacon as stored."""

    epoch: int
    start: int
    value: bytes
    previous: bytes
    signature: bytes
    public_key: bytes
    algorithm: str
    created_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StakeChange:
    key_id: str
    before: int
    after: int
    reason: str
    time: float


class LedgerStore:
    """Stake, beacons and used work of one node."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = connect(self.path, SCHEMA)
            self._reader = sqlite3.connect(self.path, check_same_thread=False,
                                           isolation_level=None)
            self._balances: dict[str, int] = dict(
                self._reader.execute("SELECT key_id, amount FROM stake").fetchall())
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open {self.path}: {exc}") from exc
        self._lock = threading.Lock()  # the writer connection
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ledger")
        self._beacons: dict[int, BeaconRecord] = {}
        self._work_pending: list[tuple[bytes, int]] = []
        self._work_unflushed: set[bytes] = set()
        self._work_flushing = False
        self._work_failed: BaseException | None = None

    # --- stake --------------------------------------------------------------------

    def balance(self, key_id: str) -> int:
        """The stake ``key_id`` holds (0 for a key the ledger does not know)."""
        return self._balances.get(key_id, 0)

    def known(self, key_id: str) -> bool:
        return key_id in self._balances

    def __len__(self) -> int:
        return len(self._balances)

    def _write_stake(self, key_id: str, amount: int, reason: str, now: float) -> StakeChange:
        if amount < 0:
            raise LedgerError(f"stake cannot be negative ({amount})")
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute("SELECT amount FROM stake WHERE key_id=?", (key_id,)).fetchone()
                before = int(row[0]) if row else 0
                db.execute("INSERT OR REPLACE INTO stake VALUES (?,?,?)", (key_id, amount, now))
                db.execute("INSERT INTO stake_changes (key_id, before, after, reason, time) "
                           "VALUES (?,?,?,?,?)", (key_id, before, amount, reason, now))
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise LedgerError(f"{self.path}: {exc}") from exc
        return StakeChange(key_id=key_id, before=before, after=amount, reason=reason, time=now)

    def set_stake_now(self, key_id: str, amount: int, reason: str, now: float) -> StakeChange:
        """Set ``key_id``'s stake to ``amount``; committed (fsync) when this returns."""
        change = self._write_stake(key_id, amount, reason, now)
        self._balances[key_id] = amount
        return change

    async def set_stake(self, key_id: str, amount: int, reason: str, now: float) -> StakeChange:
        """:meth:`set_stake_now` on the writer thread."""
        loop = asyncio.get_running_loop()
        change = await loop.run_in_executor(self._writer, self._write_stake, key_id, amount,
                                            reason, now)
        self._balances[key_id] = amount
        return change

    def changes(self, key_id: str | None = None) -> list[StakeChange]:
        sql = "SELECT key_id, before, after, reason, time FROM stake_changes"
        params: tuple[Any, ...] = ()
        if key_id is not None:
            sql += " WHERE key_id=?"
            params = (key_id,)
        return [StakeChange(key_id=r[0], before=r[1], after=r[2], reason=r[3], time=r[4])
                for r in self._reader.execute(sql + " ORDER BY seq", params)]

    # --- beacons ------------------------------------------------------------------

    def _row_beacon(self, row: tuple[Any, ...] | None) -> BeaconRecord | None:
        if row is None:
            return None
        return BeaconRecord(epoch=row[0], start=row[1], value=row[2], previous=row[3],
                            signature=row[4], public_key=row[5], algorithm=row[6],
                            created_at=row[7])

    def beacon(self, epoch: int) -> BeaconRecord | None:
        """The stored beacon of ``epoch``, or None."""
        cached = self._beacons.get(epoch)
        if cached is not None:
            return cached
        record = self._row_beacon(self._reader.execute(
            "SELECT * FROM beacons WHERE epoch=?", (epoch,)).fetchone())
        if record is not None:
            self._beacons[epoch] = record
        return record

    def latest_beacon(self, before: int | None = None) -> BeaconRecord | None:
        """The beacon of the highest epoch (below ``before`` if given)."""
        if before is None:
            row = self._reader.execute(
                "SELECT * FROM beacons ORDER BY epoch DESC LIMIT 1").fetchone()
        else:
            row = self._reader.execute(
                "SELECT * FROM beacons WHERE epoch < ? ORDER BY epoch DESC LIMIT 1",
                (before,)).fetchone()
        return self._row_beacon(row)

    def _write_beacon(self, record: BeaconRecord) -> bool:
        with self._lock:
            try:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO beacons VALUES (?,?,?,?,?,?,?,?)",
                    (record.epoch, record.start, record.value, record.previous,
                     record.signature, record.public_key, record.algorithm, record.created_at))
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path}: {exc}") from exc
            return cursor.rowcount == 1

    async def add_beacon(self, record: BeaconRecord) -> BeaconRecord:
        """Store ``record`` unless its epoch has one; returns the epoch's stored beacon."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._write_beacon, record)
        stored = self.beacon(record.epoch)
        assert stored is not None
        return stored

    # --- used work ------------------------------------------------------------------

    def work_used(self, digest: bytes) -> bool:
        """Whether a proof set with this work hash was already admitted."""
        if digest in self._work_unflushed:
            return True
        return self._reader.execute("SELECT 1 FROM used_work WHERE hash=?",
                                    (digest,)).fetchone() is not None

    def use_work(self, digest: bytes, epoch: int) -> None:
        """Record ``digest`` as used; :meth:`work_used` sees it at once, the disk soon.

        Call on the event loop, right after :meth:`work_used` said False and with
        no ``await`` between, so that two concurrent requests cannot both pass.
        """
        if self._work_failed is not None:
            raise LedgerError(f"{self.path}: recording used work failed: {self._work_failed}")
        self._work_unflushed.add(digest)
        self._work_pending.append((digest, epoch))
        if not self._work_flushing:
            self._work_flushing = True
            asyncio.get_running_loop().call_soon(self._flush_work)

    def _insert_work(self, batch: list[tuple[bytes, int]]) -> None:
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT OR IGNORE INTO used_work VALUES (?,?)", batch)
                db.execute("COMMIT")
            except sqlite3.Error:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _flush_work(self) -> None:
        batch, self._work_pending = self._work_pending, []
        if not batch:
            self._work_flushing = False
            return
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._writer, self._insert_work, batch)

        def done(job: asyncio.Future[None]) -> None:
            error = None if job.cancelled() else job.exception()
            if error is not None:
                self._work_failed = error  # keep them in memory: still refused as replays
            else:
                for digest, _ in batch:
                    self._work_unflushed.discard(digest)
            if self._work_pending:
                loop.call_soon(self._flush_work)
            else:
                self._work_flushing = False
        job.add_done_callback(done)

    async def forget_work(self, before_epoch: int) -> int:
        """Delete used work of epochs before ``before_epoch`` (no longer acceptable)."""
        def delete() -> int:
            with self._lock:
                return int(self._db.execute("DELETE FROM used_work WHERE epoch < ?",
                                            (before_epoch,)).rowcount)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, delete)

    def work_count(self) -> int:
        return int(self._reader.execute("SELECT count(*) FROM used_work").fetchone()[0]) + len(
            self._work_unflushed)

    async def drain(self) -> None:
        """Wait until every recorded work hash is on disk."""
        while self._work_flushing:
            await asyncio.sleep(0.005)

    def close(self) -> None:
        if self._work_pending:
            try:
                self._insert_work(self._work_pending)
                self._work_pending = []
            except sqlite3.Error as exc:
                log.error("could not record the last used proofs of work: %s", exc)
        self._writer.shutdown(wait=True)
        with self._lock:
            self._db.close()
        self._reader.close()

