"""SQLite as every store here uses it: WAL, durable commits, a writer thread, group commit.

A :class:`SqliteDatabase` owns one file. Writes go through one writer
connection, each in one transaction committed with fsync
(``synchronous=FULL``), on the database's own writer thread so the event
loop never waits for a disk; reads use a second connection, which in WAL mode
never waits for a commit in progress. Writes issued in the same event-loop
turn can share one transaction and one fsync (:meth:`SqliteDatabase.write_soon`):
each caller resumes once its own part is durable, and a part that fails
fails alone (a savepoint each).

A store subclasses it with its ``schema`` and its :class:`StoreError`
subclass; every ``sqlite3.Error`` leaves the store as that class, ``from``
the original.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ._errors import StoreError

T = TypeVar("T")
Write = Callable[[sqlite3.Connection], T]


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


class SqliteDatabase:
    """One SQLite file: a writer connection on its own thread and a reader connection.

    :param path: the database file; its directory is created if missing.
    :raises StoreError: (the subclass's ``error``) the file cannot be opened.
    """

    error: ClassVar[type[StoreError]] = StoreError
    """What a failure of this database raises."""
    schema: ClassVar[str] = ""
    """``CREATE ... IF NOT EXISTS`` statements applied when the file is opened."""
    thread_name: ClassVar[str] = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = connect(self.path, self.schema)
            self._reader = connect(self.path)
        except sqlite3.Error as exc:
            raise self.error(f"cannot open {self.path}: {exc}") from exc
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._writer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=self.thread_name)
        self._pending: list[tuple[Write[Any], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._committing = False

    # --- writes ---------------------------------------------------------------------

    def write_now(self, write: Write[T]) -> T:
        """Run ``write`` in one transaction and commit it (fsync) before returning.

        Any thread may call it; writes are serialised. A ``StoreError`` that
        ``write`` raises passes through (after the rollback).
        """
        with self._write_lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    result = write(db)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise self.error(f"{self.path}: {exc}") from exc
            return result

    async def write(self, write: Write[T]) -> T:
        """:meth:`write_now` on the writer thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._writer, self.write_now, write)

    async def write_soon(self, write: Write[T]) -> T:
        """Run ``write`` in the next group transaction; returns once it is durable.

        Writes submitted while a commit runs share the next one, so a burst of
        writes costs one fsync. A write that fails is rolled back alone (its
        savepoint) and raises here; the others commit.
        """
        return await self.submit(write)

    def submit(self, write: Write[T]) -> asyncio.Future[T]:
        """:meth:`write_soon` without waiting: the future completes once it is durable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((write, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _group(self, writes: list[Write[Any]]) -> list[Any]:
        """Every write in one transaction, each in its own savepoint; a failed write's
        result is its :class:`StoreError`."""
        def run(db: sqlite3.Connection) -> list[Any]:
            results: list[Any] = []
            for write in writes:
                db.execute("SAVEPOINT w")
                try:
                    results.append(write(db))
                    db.execute("RELEASE w")
                except (sqlite3.Error, StoreError) as exc:
                    db.execute("ROLLBACK TO w")
                    db.execute("RELEASE w")
                    results.append(exc if isinstance(exc, StoreError)
                                   else self.error(f"{self.path}: {exc}"))
            return results
        return self.write_now(run)

    @staticmethod
    def _resolve(batch: list[tuple[Write[Any], asyncio.Future[Any]]],
                 results: list[Any] | BaseException) -> None:
        for i, (_, future) in enumerate(batch):
            if future.done():
                continue
            result = results if isinstance(results, BaseException) else results[i]
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._committing or not self._pending:
            return  # the running commit's completion flushes what has queued up
        batch, self._pending = self._pending, []
        self._committing = True
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._writer, self._group, [w for w, _ in batch])

        def done(job: asyncio.Future[list[Any]]) -> None:
            self._committing = False
            if self._pending:
                self._flush()
            error = None if job.cancelled() else job.exception()
            if job.cancelled() or error is not None:
                self._resolve(batch, self.error(f"{self.path}: commit failed: {error}"))
            else:
                self._resolve(batch, job.result())
        job.add_done_callback(done)

    async def drain(self) -> None:
        """Wait until every write submitted so far is committed (or failed)."""
        while self._pending or self._committing or self._flush_scheduled:
            await asyncio.sleep(0.002)

    # --- reads ----------------------------------------------------------------------

    def read_one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """The first row of ``sql`` (None if none), on the reader connection."""
        with self._read_lock:
            try:
                return self._reader.execute(sql, params).fetchone()
            except sqlite3.Error as exc:
                raise self.error(f"{self.path}: {exc}") from exc

    def read_all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Every row of ``sql``, on the reader connection."""
        with self._read_lock:
            try:
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self.error(f"{self.path}: {exc}") from exc

    # --- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        """Commit the writes still queued, then close both connections."""
        batch, self._pending = self._pending, []
        self._writer.shutdown(wait=True)
        if batch:
            try:
                results: list[Any] | BaseException = self._group([w for w, _ in batch])
            except StoreError as exc:
                results = exc
            self._resolve(batch, results)
        with self._write_lock, self._read_lock:
            self._db.close()
            self._reader.close()
