"""SQLite connections as every store here uses them: WAL, and commits that are durable."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def connect(path: str | Path, schema: str = "") -> sqlite3.Connection:
    """A connection whose commits are fsync'd before they return (``synchronous=FULL``).

    WAL lets readers on other connections go on while one thread writes;
    ``isolation_level=None`` leaves transactions to explicit ``BEGIN``/``COMMIT``;
    the connection may be handed to a writer thread (``check_same_thread=False``).
    ``schema`` (``CREATE ... IF NOT EXISTS`` statements) is applied at once.
    """
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA foreign_keys=ON")
    if schema:
        conn.executescript(schema)
    return conn
