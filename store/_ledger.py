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
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import LedgerError
from ._sqlite import SqliteDatabase

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


class LedgerStore(SqliteDatabase):
    """Stake, beacons and used work of one node."""

    error = LedgerError
    schema = SCHEMA
    thread_name = "ledger"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._balances: dict[str, int] = dict(
            self.read_all("SELECT key_id, amount FROM stake"))
        self._beacons: dict[int, BeaconRecord] = {}
        self._work_unflushed: set[bytes] = set()
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

        def write(db: sqlite3.Connection) -> StakeChange:
            row = db.execute("SELECT amount FROM stake WHERE key_id=?", (key_id,)).fetchone()
            before = int(row[0]) if row else 0
            db.execute("INSERT OR REPLACE INTO stake VALUES (?,?,?)", (key_id, amount, now))
            db.execute("INSERT INTO stake_changes (key_id, before, after, reason, time) "
                       "VALUES (?,?,?,?,?)", (key_id, before, amount, reason, now))
            return StakeChange(key_id=key_id, before=before, after=amount, reason=reason,
                               time=now)
        return self.write_now(write)

    def set_stake_now(self, key_id: str, amount: int, reason: str, now: float) -> StakeChange:
        """Set ``key_id``'s stake to ``amount``; committed (fsync) when this returns."""
        change = self._write_stake(key_id, amount, reason, now)
        self._balances[key_id] = amount
        return change

    async def set_stake(self, key_id: str, amount: int, reason: str, now: float) -> StakeChange:
        """:meth:`set_stake_now` on the writer thread."""
        change = await asyncio.get_running_loop().run_in_executor(
            self._writer, self._write_stake, key_id, amount, reason, now)
        self._balances[key_id] = amount
        return change

    def changes(self, key_id: str | None = None) -> list[StakeChange]:
        sql = "SELECT key_id, before, after, reason, time FROM stake_changes"
        params: tuple[Any, ...] = ()
        if key_id is not None:
            sql += " WHERE key_id=?"
            params = (key_id,)
        return [StakeChange(key_id=r[0], before=r[1], after=r[2], reason=r[3], time=r[4])
                for r in self.read_all(sql + " ORDER BY seq", params)]

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
        record = self._row_beacon(self.read_one("SELECT * FROM beacons WHERE epoch=?",
                                                (epoch,)))
        if record is not None:
            self._beacons[epoch] = record
        return record

    def latest_beacon(self, before: int | None = None) -> BeaconRecord | None:
        """The beacon of the highest epoch (below ``before`` if given)."""
        if before is None:
            row = self.read_one("SELECT * FROM beacons ORDER BY epoch DESC LIMIT 1")
        else:
            row = self.read_one(
                "SELECT * FROM beacons WHERE epoch < ? ORDER BY epoch DESC LIMIT 1", (before,))
        return self._row_beacon(row)

    async def add_beacon(self, record: BeaconRecord) -> BeaconRecord:
        """Store ``record`` unless its epoch has one; returns the epoch's stored beacon."""
        await self.write(lambda db: db.execute(
            "INSERT OR IGNORE INTO beacons VALUES (?,?,?,?,?,?,?,?)",
            (record.epoch, record.start, record.value, record.previous, record.signature,
             record.public_key, record.algorithm, record.created_at)))
        stored = self.beacon(record.epoch)
        assert stored is not None
        return stored

    # --- used work ------------------------------------------------------------------

    def work_used(self, digest: bytes) -> bool:
        """Whether a proof set with this work hash was already admitted."""
        if digest in self._work_unflushed:
            return True
        return self.read_one("SELECT 1 FROM used_work WHERE hash=?", (digest,)) is not None

    def use_work(self, digest: bytes, epoch: int) -> None:
        """Record ``digest`` as used; :meth:`work_used` sees it at once, the disk soon.

        Call on the event loop, right after :meth:`work_used` said False and with
        no ``await`` between, so that two concurrent requests cannot both pass.
        Every hash recorded in one event-loop turn shares one transaction.
        """
        if self._work_failed is not None:
            raise LedgerError(f"{self.path}: recording used work failed: {self._work_failed}")
        self._work_unflushed.add(digest)
        job = self.submit(lambda db: db.execute("INSERT OR IGNORE INTO used_work VALUES (?,?)",
                                                (digest, epoch)))

        def done(job: asyncio.Future[Any]) -> None:
            error = None if job.cancelled() else job.exception()
            if error is not None:
                self._work_failed = error  # keep it in memory: still refused as a replay
            else:
                self._work_unflushed.discard(digest)
        job.add_done_callback(done)

    async def forget_work(self, before_epoch: int) -> int:
        """Delete used work of epochs before ``before_epoch`` (no longer acceptable)."""
        return await self.write(lambda db: int(db.execute(
            "DELETE FROM used_work WHERE epoch < ?", (before_epoch,)).rowcount))

    def work_count(self) -> int:
        return int(self.read_one("SELECT count(*) FROM used_work")[0]) + len(
            self._work_unflushed)
