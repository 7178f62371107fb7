"""The CA's own authorities in SQLite: its root, its issuing intermediates, its administrators.

These are this node's (the certificates of the keys in its keystore, and the
administrator credentials it made); the certificates a cluster issues are
replicated state (:mod:`._state`).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from ._errors import AuthorityError
from ._sqlite import SqliteDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS authorities (
    name TEXT PRIMARY KEY,             -- key name: "root", "intermediate-1", ...
    role TEXT NOT NULL,                -- "root" | "intermediate" | "admin"
    der BLOB NOT NULL,
    not_before REAL NOT NULL,
    not_after REAL NOT NULL,
    created_at REAL NOT NULL,
    active INTEGER NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True, slots=True)
class AuthorityRecord:
    name: str
    role: str
    der: bytes
    not_before: float
    not_after: float
    created_at: float
    active: bool


class AuthorityStore(SqliteDatabase):
    """This CA node's root, intermediates and administrator certificates."""

    error = AuthorityError
    schema = SCHEMA
    thread_name = "authorities"

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
