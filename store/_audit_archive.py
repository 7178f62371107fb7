"""The audit log's signed segments, copied to a bucket under S3 Object Lock.

Every signed checkpoint closes a *segment*: the records after the previous checkpoint
up to and including that checkpoint, byte for byte as in the local file. The
:class:`SegmentUploader` copies each one, in order, to
``segments/<first seq, 20 digits>-<last seq, 20 digits>.jsonl`` (keys sort in
``seq`` order and say their range) with a retention, so that in COMPLIANCE mode no
credential can delete or change it before the retention ends.

The local file stays the source: the node appends and fsyncs there first, and the
uploader (one background thread) reads segments back from it, one at a time, so an
unreachable bucket costs no memory and loses nothing; it retries with back-off and,
after a restart, continues after the last segment the bucket has (``audit.uploaded``
next to the log remembers where that is in the file, so a restart does not list the
bucket from the start). :func:`verify_archive` checks the whole chain from the
bucket alone.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Protocol, TypeVar

from ._audit import (
    CHECKPOINT_KIND,
    AuditReport,
    _is_checkpoint,
    _Malformed,
    _parse_line,
    _spki,
    _verify_lines,
)
from ._errors import AuditError, ObjectStoreError
from ._files import write_atomic
from ._s3 import ObjectVersion

log = logging.getLogger("trustchain.audit")

SEGMENTS = "segments/"
"""The key prefix of the segments (below the bucket's configured prefix)."""

_SEGMENT_KEY = re.compile(r"segments/(\d{20})-(\d{20})\.jsonl")

BACKOFF_FIRST = 0.5
"""Seconds before the first retry after a failed upload; doubles up to the maximum."""


def segment_key(first: int, last: int) -> str:
    """The key of the segment of records ``first``..``last`` (its checkpoint)."""
    return f"{SEGMENTS}{first:020d}-{last:020d}.jsonl"


def segment_range(key: str) -> tuple[int, int] | None:
    """``(first, last)`` seq of a segment key; None if ``key`` is not one."""
    match = _SEGMENT_KEY.fullmatch(key)
    return (int(match.group(1)), int(match.group(2))) if match else None


class SegmentBucket(Protocol):
    """What the uploader needs of an Object Lock bucket (:class:`store.LockedBucket`)."""

    @property
    def location(self) -> str: ...

    def put_locked(self, key: str, data: bytes, retain_until: datetime) -> str: ...

    def get(self, key: str) -> bytes | None: ...

    def list(self, prefix: str = "") -> list[str]: ...


_T = TypeVar("_T")


class _Segment(NamedTuple):
    first: int
    last: int
    data: bytes


class _Position(NamedTuple):
    """The last uploaded seq and the file offset just past its line."""

    seq: int
    offset: int


class _Stopped(Exception):
    """The uploader was stopped while it waited."""


class SegmentUploader:
    """Copies the audit log's signed segments to the bucket, in order, off the critical
    path: :class:`~store.AuditLog` calls :meth:`start` once it has opened the file and
    :meth:`closed` after every write that ends with a checkpoint; neither blocks.
    """

    def __init__(self, bucket: SegmentBucket, *, log_path: Path, marker: Path,
                 retention: float, backoff_max: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        """``marker``: the small file that remembers the last uploaded segment;
        ``retention``: seconds each segment is locked from its upload."""
        if retention <= 0:
            raise AuditError("the audit segments' retention must be positive")
        self.bucket = bucket
        self._path = Path(log_path)
        self._marker = Path(marker)
        self._retention = retention
        self._backoff_max = backoff_max
        self._clock = clock
        self._cond = threading.Condition()
        self._limit = 0       # bytes [0, limit) of the file are complete records
        self._scanned = 0     # [position, scanned) holds no checkpoint
        self._stopping = False
        self._deadline = 0.0  # when stopping: give up uploading after this (monotonic)
        self._waiting = 0     # segments closed but not yet uploaded
        self._problem: str | None = None
        self._fatal: str | None = None
        self._uploaded = _Position(0, 0)
        self._thread: threading.Thread | None = None

    # -- what the audit log calls --------------------------------------------------

    def start(self, end: int) -> None:
        """Begin uploading: ``[0, end)`` of the log is complete records (the file
        just opened). Segments not yet in the bucket are found by the thread."""
        with self._cond:
            if self._thread is not None:
                raise AuditError("the audit segment uploader is already running")
            self._limit = end
            self._thread = threading.Thread(target=self._run, name="trustchain-audit-s3",
                                            daemon=True)
            self._thread.start()

    def closed(self, end: int) -> None:
        """A checkpoint's line now ends at ``end``: one more segment to upload."""
        with self._cond:
            self._limit = end
            self._waiting += 1
            self._cond.notify()

    def stop(self, grace: float = 5.0) -> None:
        """Upload what is closed for at most ``grace`` seconds, then stop; the rest is
        uploaded after the next start (the local file keeps it)."""
        with self._cond:
            thread, self._stopping = self._thread, True
            self._deadline = time.monotonic() + grace
            self._cond.notify()
        if thread is not None:
            thread.join(grace + 1.0)
            if thread.is_alive():
                log.warning("audit segments: an upload to %s is still running at stop; "
                            "the next start uploads what is missing", self.bucket.location)

    @property
    def waiting(self) -> int:
        """Segments signed locally and not yet in the bucket."""
        return self._waiting

    @property
    def uploaded_seq(self) -> int:
        """The last seq in the bucket as far as this uploader knows."""
        return self._uploaded.seq

    def problem(self) -> str | None:
        """None while uploads succeed, else why they do not (``node.health``)."""
        reason = self._fatal or self._problem
        if reason is None:
            return None
        count = self._waiting
        return (f"audit segments cannot be uploaded to {self.bucket.location} ({reason}); "
                f"{count} segment{'s' if count != 1 else ''} waiting (kept in the local log)")

    # -- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._uploaded = self._read_marker()
            self._count_closed(self._uploaded.offset)
            self._uploaded = self._retrying(self._resume)
            self._scanned = self._uploaded.offset
            while True:
                with self._cond:
                    while self._limit <= self._scanned and not self._stopping:
                        self._cond.wait()
                    if self._limit <= self._scanned or time.monotonic() > self._deadline > 0:
                        return
                    limit = self._limit
                segment = self._read_segment(self._uploaded, limit)
                if segment is None:
                    self._scanned = limit
                    continue
                self._retrying(lambda s=segment: self._upload(s))  # type: ignore[misc]
        except _Stopped:
            return
        except Exception as exc:  # a bug or a log that does not match the bucket
            self._fatal = str(exc) if isinstance(exc, AuditError) else \
                f"{type(exc).__name__}: {exc}"
            log.error("audit segments: uploads stopped: %s", self._fatal)

    def _retrying(self, action: Callable[[], _T]) -> _T:
        """``action()``, retried with back-off while the bucket fails (the problem is
        reported meanwhile); raises _Stopped if stopped while failing."""
        delay = BACKOFF_FIRST
        while True:
            try:
                result = action()
            except ObjectStoreError as exc:
                if self._problem is None:
                    log.warning("audit segments: %s; retrying (the local log keeps them)", exc)
                self._problem = str(exc)
                with self._cond:
                    if self._stopping:
                        raise _Stopped from None
                    self._cond.wait(delay)
                    if self._stopping:
                        raise _Stopped from None
                delay = min(delay * 2, self._backoff_max)
                continue
            if self._problem is not None:
                log.info("audit segments: %s reachable again", self.bucket.location)
                self._problem = None
            return result

    def _upload(self, segment: _Segment) -> None:
        retain_until = datetime.fromtimestamp(self._clock(), UTC) + timedelta(
            seconds=self._retention)
        self.bucket.put_locked(segment_key(segment.first, segment.last), segment.data,
                               retain_until)
        self._advance(segment)

    def _advance(self, segment: _Segment) -> None:
        """Record that ``segment`` is in the bucket (in memory and in the marker)."""
        self._uploaded = _Position(segment.last, self._uploaded.offset + len(segment.data))
        self._scanned = max(self._scanned, self._uploaded.offset)
        with self._cond:
            self._waiting = max(0, self._waiting - 1)
        marker = {"bucket": self.bucket.location, "seq": self._uploaded.seq,
                  "offset": self._uploaded.offset}
        write_atomic(self._marker, json.dumps(marker).encode() + b"\n", mode=0o640)

    def _resume(self) -> _Position:
        """Where uploading continues: the marker's position, moved past the segments
        the bucket already has (an upload whose marker a crash lost)."""
        while True:
            start = f"{SEGMENTS}{self._uploaded.seq + 1:020d}-"
            keys = self.bucket.list(start)
            if not keys:
                return self._uploaded
            segment = self._read_segment(self._uploaded, self._limit)
            if segment is None or segment_key(segment.first, segment.last) not in keys:
                raise AuditError(
                    f"the bucket has {keys[0]}, which is not the local log's next segment "
                    f"(records after {self._uploaded.seq}): a different log?")
            if self.bucket.get(segment_key(segment.first, segment.last)) != segment.data:
                raise AuditError(
                    f"{segment_key(segment.first, segment.last)} in the bucket differs from "
                    "the local log: run 'trustchain audit verify --from-s3'")
            self._advance(segment)

    def _read_marker(self) -> _Position:
        """The marker's position if it names this bucket and fits the file, else the
        start of the file."""
        try:
            marker = json.loads(self._marker.read_bytes())
            position = _Position(int(marker["seq"]), int(marker["offset"]))
            if marker["bucket"] != self.bucket.location:
                return _Position(0, 0)
        except FileNotFoundError:
            return _Position(0, 0)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("audit segments: ignoring the unreadable marker %s (%s)",
                        self._marker, exc)
            return _Position(0, 0)
        if not 0 <= position.offset <= self._limit or position.seq < 0:
            return _Position(0, 0)
        if position.offset < self._limit:  # the next line must be the next record
            with open(self._path, "rb") as handle:
                handle.seek(position.offset)
                try:
                    if _parse_line(handle.readline().rstrip(b"\n")).seq != position.seq + 1:
                        return _Position(0, 0)
                except _Malformed:
                    return _Position(0, 0)
        return position

    def _lines(self, offset: int, limit: int) -> Iterator[bytes]:
        """The complete lines (with their newline) in ``[offset, limit)`` of the log."""
        with open(self._path, "rb") as handle:
            handle.seek(offset)
            while offset < limit:
                line = handle.readline(limit - offset)
                if not line.endswith(b"\n"):
                    return
                offset += len(line)
                yield line

    def _count_closed(self, offset: int) -> None:
        """Set :attr:`waiting` to the checkpoints (closed segments) after ``offset``."""
        with self._cond:
            limit, before = self._limit, self._waiting
        count = sum(1 for line in self._lines(offset, limit) if _is_checkpoint(line[:-1]))
        with self._cond:  # plus the segments closed while counting
            self._waiting = count + self._waiting - before

    def _read_segment(self, after: _Position, limit: int) -> _Segment | None:
        """The segment that starts at ``after`` if its checkpoint is before ``limit``."""
        parts: list[bytes] = []
        first = 0
        for line in self._lines(after.offset, limit):
            parts.append(line)
            if len(parts) == 1:
                try:
                    first = _parse_line(line[:-1]).seq
                except _Malformed as exc:
                    raise AuditError(f"audit log {self._path}: the record after "
                                     f"{after.seq} is damaged ({exc})") from None
                if first != after.seq + 1:
                    raise AuditError(f"audit log {self._path}: record {first} follows the "
                                     f"uploaded record {after.seq}")
            if _is_checkpoint(line[:-1]):
                last = first + len(parts) - 1
                return _Segment(first, last, b"".join(parts))
        return None


# --- verification from the bucket -----------------------------------------------------


class ArchiveReader(Protocol):
    """What :func:`verify_archive` needs of the bucket (:class:`store.LockedBucket`)."""

    @property
    def location(self) -> str: ...

    def versions(self, prefix: str = "") -> list[ObjectVersion]: ...

    def get_version(self, key: str, version_id: str) -> bytes | None: ...


@dataclass
class ArchiveReport(AuditReport):
    """:class:`AuditReport` of the chain in the bucket, and how the local copy compares."""

    segments: int = 0
    local: list[str] = field(default_factory=list)
    """How the local log compares (lines to print); a difference is also a problem."""


def verify_archive(bucket: ArchiveReader, *, public_keys: list[Any] | None = None,
                   local: Path | None = None) -> ArchiveReport:
    """Check the whole chain from the bucket's segments alone: contiguous from seq 1,
    each segment ending in its checkpoint, every record's hash and prev, every
    checkpoint's signature (against ``public_keys`` when given). The first version
    written of each key is the one checked (Object Lock keeps it); a later version or
    a delete marker is reported as a problem. ``local``: the node's log, compared
    record by record with the bucket.
    """
    trusted = None if public_keys is None else {_spki(key) for key in public_keys}
    problems: list[str] = []
    chosen = _first_versions(bucket, problems)
    ranges = sorted((r, key, version) for key, version in chosen.items()
                    if (r := segment_range(key)) is not None)
    expected = 1
    for (first, last), key, _ in ranges:
        if first > expected:
            problems.append(f"records {expected}-{first - 1} are missing from the bucket "
                            f"(no segment before {key})")
        elif first < expected:
            problems.append(f"{key} overlaps the segment before it")
        expected = max(expected, last + 1)
    comparison = _LocalComparison(local)
    try:
        report = _verify_lines(_segment_lines(bucket, ranges, problems, comparison), trusted)
        comparison.finish(report.last_seq or 0)
    finally:
        comparison.close()
    problems.extend(report.problems)
    problems.extend(comparison.problems)
    return ArchiveReport(ok=not problems, records=report.records,
                         last_checkpoint_seq=report.last_checkpoint_seq, problems=problems,
                         unsigned_tail=report.unsigned_tail, warnings=report.warnings,
                         last_seq=report.last_seq, segments=len(ranges),
                         local=comparison.summary)


def _first_versions(bucket: ArchiveReader, problems: list[str]) -> dict[str, str]:
    """Each segment key's first version written; later versions and delete markers
    are problems (someone tried to replace or delete a segment)."""
    by_key: dict[str, list[ObjectVersion]] = {}
    for version in bucket.versions(SEGMENTS):
        by_key.setdefault(version.key, []).append(version)
    chosen: dict[str, str] = {}
    for key, versions in sorted(by_key.items()):
        if segment_range(key) is None:
            problems.append(f"{key}: not a segment key")
            continue
        objects = [v for v in versions if not v.delete_marker]  # newest first
        if any(v.delete_marker and v.latest for v in versions):
            problems.append(f"{key}: deleted (a delete marker hides it; "
                            + ("the locked version is checked)" if objects else
                               "no version is left)"))
        if not objects:
            continue
        if len(objects) > 1:
            problems.append(f"{key}: overwritten ({len(objects)} versions; the first one "
                            "written is checked)")
        chosen[key] = objects[-1].version_id
    return chosen


def _segment_lines(bucket: ArchiveReader, ranges: list[tuple[tuple[int, int], str, str]],
                   problems: list[str], comparison: _LocalComparison) -> Iterator[bytes]:
    """The records of every segment in order, fetched one segment at a time; a
    segment whose records do not match its key's range is a problem."""
    for (first, last), key, version in ranges:
        data = bucket.get_version(key, version)
        if data is None:
            problems.append(f"{key}: listed but cannot be read")
            continue
        lines = data.splitlines(keepends=True)
        try:
            seqs = (_parse_line(lines[0].rstrip(b"\n")).seq,
                    _parse_line(lines[-1].rstrip(b"\n")))
            if seqs[0] != first or seqs[1].seq != last or len(lines) != last - first + 1 \
                    or seqs[1].kind != CHECKPOINT_KIND:
                problems.append(f"{key}: does not hold records {first}-{last} ending in "
                                "their checkpoint")
        except (_Malformed, IndexError):
            problems.append(f"{key}: does not hold records {first}-{last} ending in "
                            "their checkpoint")
        for line in lines:
            comparison.compare(line)
            yield line


class _LocalComparison:
    """Compares the local log, line by line, with the bucket's records as they pass."""

    def __init__(self, path: Path | None) -> None:
        self.problems: list[str] = []
        self.summary: list[str] = []
        self._path = path
        self._handle: BinaryIO | None = None
        if path is not None and path.is_file():
            self._handle = open(path, "rb")  # noqa: SIM115 -- closed by close()
        self._differs = False
        self._count = 0

    def compare(self, line: bytes) -> None:
        if self._handle is None or self._differs:
            return
        self._count += 1
        mine = self._handle.readline()
        if mine == line:
            return
        self._differs = True
        where = _seq_of(line) or f"line {self._count}"
        if not mine:
            self.problems.append(f"local copy {self._path}: ends before record {where} of "
                                 "the bucket (records removed from the local log)")
        else:
            self.problems.append(f"local copy {self._path}: differs from the bucket at "
                                 f"record {where} (the local log was edited; the bucket's "
                                 "copy is locked)")

    def finish(self, bucket_last: int) -> None:
        if self._handle is None:
            if self._path is not None:
                self.summary.append(f"no local copy at {self._path} to compare")
            return
        if self._differs:
            return
        extra = sum(1 for line in self._handle if line.endswith(b"\n"))
        self.summary.append(
            f"local copy {self._path}: the same as the bucket up to record {bucket_last}"
            + (f"; {extra} later record{'s' if extra != 1 else ''} not in the bucket yet "
               "(unsigned, or waiting for upload)" if extra else ""))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _seq_of(line: bytes) -> str | None:
    try:
        return str(_parse_line(line.rstrip(b"\n")).seq)
    except _Malformed:
        return None
