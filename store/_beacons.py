"""Epoch beacons in SQLite (WAL): the value every epoch credential starts from.

``DATA/consensus/beacons.sqlite3`` holds one signed beacon per epoch, chained by
``previous``. A node alone draws and signs its own; in a cluster the beacon of
an epoch is derived from the first block committed in it, and kept here as
every validator derives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._errors import BeaconError
from ._sqlite import SqliteDatabase

SCHEMA = """
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


class BeaconStore(SqliteDatabase):
    """The epoch beacons of one node."""

    error = BeaconError
    schema = SCHEMA
    thread_name = "beacons"

    def __init__(self, path: Any) -> None:
        super().__init__(path)
        self._beacons: dict[int, BeaconRecord] = {}

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
