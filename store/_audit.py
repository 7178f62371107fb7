"""The audit log: an append-only, hash-chained file of every CA operation.

One record per line, as JSON, so that ``grep`` and ``jq`` work on it::

    {"seq":7,"time":1700000000123456,"kind":"ca.issued","data":{...},"prev":"<hex>","hash":"<hex>"}

- ``seq`` counts 1, 2, 3, ... without gaps.
- ``time`` is integer microseconds since the Unix epoch: an integer keeps the
  hash deterministic (:attr:`AuditRecord.time` is the same instant in seconds).
- ``data`` is a JSON object of text, integers (64-bit), finite floats, booleans,
  null, lists and objects with text keys. Byte strings are written as
  ``{"hex": "<lowercase hex>"}``, so a one-key object whose key is ``"hex"`` is
  reserved and :meth:`AuditLog.append` refuses it inside ``data``.
- ``prev`` is the previous record's ``hash`` (32 zero bytes for record 1) and
  ``hash`` is SHA-256 of the deterministic CBOR (RFC 8949 §4.2.1) of
  ``{"seq", "time", "kind", "data", "prev"}`` with bytes as byte strings. The
  hash covers the values, not the JSON text, so any language with a
  deterministic CBOR encoder can verify a log.

A ``checkpoint`` record signs the hash of the record just before it, which by
the chain commits to everything before that; its data is ``{covers_seq,
covers_hash, key, algorithm, public_key (DER SPKI), signature}``, the signature
being over ``encode_deterministic({"ctx": CHECKPOINT_CONTEXT, "seq":
covers_seq, "hash": covers_hash})``. With a signer, one ends every write that
reaches or passes a ``seq`` that is a multiple of ``checkpoint_every`` (so a
group commit of many records gets one, after its last), one is written by
:meth:`AuditLog.checkpoint`, one by :meth:`AuditLog.sign_tail` when records
are unsigned (:meth:`AuditLog.sign_tail_every` calls it at an interval, so a
running node leaves no record unsigned for longer than that), and one by
:meth:`AuditLog.close`.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from protocol import MAX_DEPTH, LocalProtocolError, encode_deterministic

from ._errors import AuditError
from ._files import fsync_directory
from ._signer import verify_signature

if TYPE_CHECKING:
    from ._audit_archive import SegmentUploader

log = logging.getLogger("trustchain.audit")

CHECKPOINT_KIND = "checkpoint"
CHECKPOINT_CONTEXT = "trustchain-audit-checkpoint-v1"
GENESIS = bytes(32)
"""The ``prev`` of record 1."""

ALGORITHMS = ("ecdsa-p256-sha256", "ed25519")

# Kinds are identifiers ("ca.issued", "key.generated"): easy to grep, nothing to escape.
_KIND = re.compile(r"[a-z][a-z0-9._-]{0,63}")
_INT_MIN = -(2**64)
_INT_MAX = 2**64 - 1
_FIELDS = frozenset(("seq", "time", "kind", "data", "prev", "hash"))
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
"""``json.dumps(..., separators=(",", ":"), allow_nan=False)`` without making an encoder
for every record."""
_TAIL_CHUNK = 64 * 1024
_TAIL_LIMIT = 8 << 20
"""Bytes read back from the end to find the last checkpoint at start."""


class CheckpointSigner(Protocol):
    """What a checkpoint needs of a key; the keystore's signers fit as they are."""

    @property
    def name(self) -> str: ...

    @property
    def algorithm(self) -> str:
        """``ecdsa-p256-sha256`` (DER ECDSA over SHA-256(data)) or ``ed25519``."""
        ...

    def public_key(self) -> Any: ...

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class AuditRecord:
    """One line of the log. ``time`` is seconds; the file keeps whole microseconds."""

    seq: int
    time: float
    kind: str
    data: dict[str, Any]
    prev: bytes
    hash: bytes


@dataclass
class AuditReport:
    """What :func:`verify_log` found.

    ``unsigned_tail`` counts the records after the last good checkpoint: nothing
    in the file can reveal that records were cut off the end after it, so only
    an external copy of a later head (or a checkpoint) protects them.
    ``warnings`` are findings that are not tampering, such as the incomplete
    last line a crash leaves behind.
    """

    ok: bool
    records: int
    last_checkpoint_seq: int | None
    problems: list[str] = field(default_factory=list)
    unsigned_tail: int = 0
    warnings: list[str] = field(default_factory=list)
    last_seq: int | None = None
    """The ``seq`` of the last record (None: an empty log, or a last line that is not a
    record); the unsigned tail is the records after the last checkpoint up to it."""

    def unsigned_range(self) -> tuple[int, int] | None:
        """``(first, last)`` seq of the unsigned tail; None if there is none (or the last
        line is not a record)."""
        if not self.unsigned_tail or self.last_seq is None:
            return None
        return self.last_seq - self.unsigned_tail + 1, self.last_seq


class _Entry(NamedTuple):
    """A record waiting for its ``seq`` and ``prev``: validated and encoded up front."""

    kind: str
    time_us: int
    data: dict[str, Any]
    data_cbor: bytes
    data_json: str


class _Parsed(NamedTuple):
    seq: int
    time_us: int
    kind: str
    data: dict[str, Any]
    prev: bytes
    hash: bytes


class _Malformed(Exception):
    pass


# --- encoding ---------------------------------------------------------------------

DataPath = tuple[str | int, ...]
"""Where a value sits in a record's data: map keys and list indexes, outermost first."""


def _where(path: DataPath) -> str:
    """``path`` as an error message names it: ``data.names[2]``."""
    return "data" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _normalize(value: Any, depth: int, path: DataPath) -> tuple[Any, Any]:
    """A private copy of ``value`` (for the record and the hash) and its JSON form.

    Copying means a caller who mutates its dict afterwards cannot make the
    returned record disagree with the file.
    """
    kind = type(value)
    if kind is str or value is None or kind is bool:
        return value, value
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise AuditError(f"{_where(path)}: integer outside the 64-bit range CBOR allows")
        return value, value
    if kind is dict or kind is list or kind is tuple:
        return _normalize_container(value, depth, path)
    if isinstance(value, str):
        text = str.__str__(value)  # enum members become their plain value
        return text, text
    if isinstance(value, int):
        return _normalize(int(value), depth, path)
    if isinstance(value, float):
        real = float(value)
        if not math.isfinite(real):
            raise AuditError(f"{_where(path)}: {real} has no JSON form; log it as text")
        return real, real
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return raw, {"hex": raw.hex()}
    if isinstance(value, list | tuple | dict):
        return _normalize_container(value, depth, path)
    raise AuditError(f"{_where(path)}: a {type(value).__name__} has no deterministic CBOR "
                     "encoding")


def _normalize_container(value: Any, depth: int, path: DataPath) -> tuple[Any, Any]:
    if depth >= MAX_DEPTH:
        raise AuditError(f"{_where(path)}: nested deeper than {MAX_DEPTH} levels")
    if not isinstance(value, dict):
        pairs = [_normalize(item, depth + 1, (*path, i)) for i, item in enumerate(value)]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    if len(value) == 1 and "hex" in value:
        raise AuditError(f"{_where(path)}: a map whose only key is 'hex' is reserved for bytes")
    plain: dict[str, Any] = {}
    shown: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise AuditError(f"{_where(path)}: map key {key!r} is not text (JSON keys are "
                             "text)")
        name = key if type(key) is str else str.__str__(key)
        plain[name], shown[name] = _normalize(item, depth + 1, (*path, name))
    return plain, shown


def _from_json(value: Any, where: str) -> Any:
    """Undo :func:`_normalize`'s JSON form (bytes back from ``{"hex": ...}``)."""
    if isinstance(value, dict):
        if len(value) == 1 and "hex" in value:
            text = value["hex"]
            try:
                raw = bytes.fromhex(text) if isinstance(text, str) else None
            except ValueError:
                raw = None
            if raw is None or raw.hex() != text:
                raise _Malformed(f"{where}: 'hex' is not lowercase hexadecimal")
            return raw
        return {k: _from_json(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


# Keys of the hashed map in deterministic order (shorter encodings first).
_K_SEQ, _K_DATA, _K_KIND, _K_PREV, _K_TIME = (
    encode_deterministic(k) for k in ("seq", "data", "kind", "prev", "time"))


def _record_hash(seq: int, time_us: int, kind: str, data_cbor: bytes, prev: bytes) -> bytes:
    """SHA-256 of ``encode_deterministic({"seq", "time", "kind", "data", "prev"})``.

    Assembled from the already encoded ``data`` so the hot path encodes it once;
    a unit test holds this equal to encoding the whole map.
    """
    encoded = b"".join((
        b"\xa5", _K_SEQ, encode_deterministic(seq), _K_DATA, data_cbor,
        _K_KIND, encode_deterministic(kind), _K_PREV, encode_deterministic(prev),
        _K_TIME, encode_deterministic(time_us)))
    return hashlib.sha256(encoded).digest()


def _seal(seq: int, entry: _Entry, prev: bytes) -> tuple[AuditRecord, bytes]:
    """The record at ``seq`` after ``prev``, and its line in the file."""
    digest = _record_hash(seq, entry.time_us, entry.kind, entry.data_cbor, prev)
    record = AuditRecord(seq, entry.time_us / 1_000_000, entry.kind, entry.data, prev, digest)
    line = (f'{{"seq":{seq},"time":{entry.time_us},"kind":"{entry.kind}",'
            f'"data":{entry.data_json},"prev":"{prev.hex()}","hash":"{digest.hex()}"}}\n')
    return record, line.encode("ascii")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A duplicated key would let the file show a reader one value and hash another.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Malformed("duplicate key in a JSON object")
    return result


def _no_constants(name: str) -> Any:
    raise _Malformed(f"{name} is not JSON")


def _hex32(value: Any, name: str) -> bytes:
    if not isinstance(value, str) or len(value) != 64:
        raise _Malformed(f"{name} is not 64 hex digits")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise _Malformed(f"{name} is not 64 hex digits") from None
    if raw.hex() != value:
        raise _Malformed(f"{name} is not lowercase hex")
    return raw


def _parse_line(line: bytes) -> _Parsed:
    """One record from its line (without the newline); _Malformed if it is not one."""
    try:
        obj = json.loads(line, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _Malformed(f"not JSON: {exc}") from None
    if not isinstance(obj, dict) or set(obj) != _FIELDS:
        raise _Malformed("not an object with exactly seq, time, kind, data, prev and hash")
    seq, time_us, kind, data = obj["seq"], obj["time"], obj["kind"], obj["data"]
    if type(seq) is not int or seq < 1:
        raise _Malformed("seq is not a positive integer")
    if type(time_us) is not int:
        raise _Malformed("time is not an integer (microseconds)")
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise _Malformed("kind is not a valid kind")
    if not isinstance(data, dict):
        raise _Malformed("data is not an object")
    return _Parsed(seq, time_us, kind, _from_json(data, "data"),
                   _hex32(obj["prev"], "prev"), _hex32(obj["hash"], "hash"))


def _hash_of(parsed: _Parsed) -> bytes:
    try:
        data_cbor = encode_deterministic(parsed.data)
    except LocalProtocolError as exc:
        raise _Malformed(f"data has no deterministic CBOR encoding: {exc}") from None
    return _record_hash(parsed.seq, parsed.time_us, parsed.kind, data_cbor, parsed.prev)


# --- signatures -------------------------------------------------------------------

def _checkpoint_message(seq: int, digest: bytes) -> bytes:
    return encode_deterministic({"ctx": CHECKPOINT_CONTEXT, "seq": seq, "hash": digest})


def _spki(public_key: Any) -> bytes:
    """DER SubjectPublicKeyInfo of a ``cryptography`` public key (or DER given as is)."""
    if isinstance(public_key, bytes):
        return public_key
    der: bytes = public_key.public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _algorithm_of(public_key: Any) -> str | None:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve,
                                                                        ec.SECP256R1):
        return "ecdsa-p256-sha256"
    return None


def _check_checkpoint(parsed: _Parsed, trusted: set[bytes] | None) -> str | None:
    """What is wrong with a checkpoint record, or None if it holds."""
    data = parsed.data
    covers_seq, covers_hash = data.get("covers_seq"), data.get("covers_hash")
    algorithm, der, signature = data.get("algorithm"), data.get("public_key"), data.get("signature")
    if (type(covers_seq) is not int or not isinstance(covers_hash, bytes)
            or not isinstance(der, bytes) or not isinstance(signature, bytes)
            or not isinstance(data.get("key"), str)):
        return "malformed (needs covers_seq, covers_hash, key, algorithm, public_key, signature)"
    if covers_seq != parsed.seq - 1 or covers_hash != parsed.prev:
        return f"covers record {covers_seq}, not the record before it"
    try:
        public_key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        return "public_key is not a DER SubjectPublicKeyInfo"
    if algorithm not in ALGORITHMS or _algorithm_of(public_key) != algorithm:
        return f"algorithm {algorithm!r} does not match its public key"
    if not verify_signature(public_key, signature, _checkpoint_message(covers_seq, covers_hash)):
        return "bad signature"
    if trusted is not None and der not in trusted:
        return f"key {data['key']!r} not trusted"
    return None


# --- the log ----------------------------------------------------------------------

class AuditLog:
    """The node's audit log, open for appending; one writer per file (an flock).

    Every append is on disk (``fdatasync``: the bytes and the new length) before
    it returns, so a record exists for every operation that was answered. Use
    :meth:`append_async` on the event loop: :meth:`append`, :meth:`checkpoint`
    and :meth:`close` block for a disk flush. ``checkpoint_every=0`` turns the
    automatic checkpoints off. Opening checks the last record only; checking the
    whole chain is :func:`verify_log`'s job.

    Opening also verifies the chain from the record the last signed checkpoint
    covers to the end (``check_all``: from the first record), and refuses a log
    that was edited there: appending to it would bury the edit under new records.

    ``segments``: an uploader told of every write that ends with a checkpoint, which
    copies the closed segments to an Object Lock bucket off the critical path
    (:mod:`store._audit_archive`); its trouble shows in :meth:`problem`.
    """

    def __init__(self, path: Path, *, signer: CheckpointSigner | None = None,
                 checkpoint_every: int = 1000, check_all: bool = False,
                 clock: Callable[[], float] = time.time,
                 segments: SegmentUploader | None = None) -> None:
        if checkpoint_every < 0:
            raise AuditError("checkpoint_every must be 0 (off) or more")
        self.path = Path(path)
        self._signer = signer
        self._checkpoint_every = checkpoint_every
        self._clock = clock
        self._lock = threading.Lock()  # the file, the head and _failed
        self._failed: str | None = None
        self.checkpoint_failure: str | None = None
        """Why the last checkpoint this log tried failed; None once one succeeds."""
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[tuple[_Entry, asyncio.Future[AuditRecord]]] = []
        self._flushing = False  # a group commit is scheduled or running (event loop only)
        self._signer_spki = b""
        if signer is not None:
            public_key = signer.public_key()
            if signer.algorithm not in ALGORITHMS or _algorithm_of(public_key) != signer.algorithm:
                raise AuditError(f"audit signer {signer.name!r}: algorithm {signer.algorithm!r}"
                                 " does not match its key (P-256 or Ed25519 only)")
            self._signer_spki = _spki(public_key)
        self._fd = self._open()
        try:
            seq, digest, self._unsigned = self._recover()
            self._check_chain(check_all)
        except BaseException:
            os.close(self._fd)
            raise
        self._head = (seq, digest)
        self._size = os.fstat(self._fd).st_size
        self._segments = segments
        if segments is not None:
            segments.start(self._size)

    def _open(self) -> int:
        parent = self.path.parent
        if not parent.is_dir():
            parent.mkdir(parents=True, exist_ok=True)
            fsync_directory(parent.parent)
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o640)
            created = True
        except FileExistsError:
            fd = os.open(self.path, flags)
            created = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AuditError(f"audit log {self.path} is open in another process (a running "
                             "node?); two writers would fork the chain") from None
        if created:
            fsync_directory(parent)
        return fd

    def _recover(self) -> tuple[int, bytes, bool]:
        """The head from the last line; drop an incomplete last line left by a crash."""
        size = os.fstat(self._fd).st_size
        line, end = _last_line(self._fd, size)
        if end < size:
            # append() returns only after its whole line is flushed, so a line
            # without its newline was never acknowledged to anyone.
            log.warning("audit log %s: dropping an incomplete last record (%d bytes), "
                        "a write interrupted by a crash", self.path, size - end)
            os.ftruncate(self._fd, end)
            os.fdatasync(self._fd)
        if line is None:
            return 0, GENESIS, False
        try:
            parsed = _parse_line(line)
            if _hash_of(parsed) != parsed.hash:
                raise _Malformed("hash mismatch")
        except _Malformed as exc:
            raise AuditError(f"audit log {self.path}: the last record is damaged ({exc}); "
                             "run 'trustchain audit verify' before appending") from None
        return parsed.seq, parsed.hash, parsed.kind != CHECKPOINT_KIND

    def _check_chain(self, check_all: bool) -> None:
        """Verify the records from the last signed checkpoint (or all) before appending."""
        start = 0 if check_all else _tail_start(self._fd, os.fstat(self._fd).st_size)
        trusted = {self._signer_spki} if self._signer_spki else None
        with open(self.path, "rb") as handle:
            handle.seek(start)
            report = _verify_lines(handle, trusted, resume=start > 0)
        if report.problems:
            more = len(report.problems) - 1
            raise AuditError(
                f"audit log {self.path} was altered: {report.problems[0]}"
                f"{f' (and {more} more)' if more else ''}; the node will not append "
                "to it. `trustchain audit verify` lists every problem; keep the file as "
                "evidence and move it aside to start a new log")

    @property
    def head(self) -> tuple[int, bytes]:
        """The last record's seq and hash; (0, 32 zero bytes) for an empty log."""
        return self._head

    # -- appending -----------------------------------------------------------

    def _prepare(self, kind: str, data: dict[str, Any], internal: bool = False) -> _Entry:
        """Validate and encode outside the lock (and, for append_async, on the caller)."""
        if self._failed is not None or self._fd < 0:
            self._raise_unusable()
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise AuditError(f"audit kind {kind!r}: use 1-64 of a-z, 0-9, '.', '_', '-', "
                             "starting with a letter")
        if kind == CHECKPOINT_KIND and not internal:
            raise AuditError("the kind 'checkpoint' is reserved for signed checkpoints")
        if not isinstance(data, dict):
            raise AuditError(f"audit data must be a dict, not {type(data).__name__}")
        plain, shown = _normalize(data, 0, ())
        try:
            data_cbor = encode_deterministic(plain)
        except LocalProtocolError as exc:
            raise AuditError(f"audit data: {exc}") from exc
        data_json = _JSON.encode(shown)
        return _Entry(str.__str__(kind), round(self._clock() * 1_000_000), plain, data_cbor,
                      data_json)

    def append(self, kind: str, data: dict[str, Any]) -> AuditRecord:
        """Add one record; it is on disk when this returns. Blocks for the flush."""
        entry = self._prepare(kind, data)
        return self._commit([entry])[0]

    async def append_async(self, kind: str, data: dict[str, Any]) -> AuditRecord:
        """Add one record without blocking the loop; returns once it is on disk.

        Group commit: every call made before the next loop turn, and every call
        made while a flush is running, shares one write and one flush in a
        worker thread. Records keep the order of the calls. Cancelling the
        caller does not withdraw its record. One event loop per log.
        """
        entry = self._prepare(kind, data)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[AuditRecord] = loop.create_future()
        self._pending.append((entry, waiter))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush, loop)
        return await waiter

    async def append_all_async(self, records: Sequence[tuple[str, dict[str, Any]]]
                               ) -> list[AuditRecord]:
        """:meth:`append_async` of ``(kind, data)`` records at once, in their order: one
        write and one flush (shared with any other records waiting), one hand-off to
        the writer thread, rather than one each. All are checked before any is queued:
        one that :meth:`append` would refuse refuses them all.
        """
        entries = [self._prepare(kind, data) for kind, data in records]
        if not entries:
            return []
        loop = asyncio.get_running_loop()
        waiters: list[asyncio.Future[AuditRecord]] = [loop.create_future() for _ in entries]
        self._pending.extend(zip(entries, waiters, strict=True))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush, loop)
        return [await waiter for waiter in waiters]

    def _writer(self) -> ThreadPoolExecutor:
        """The one thread that writes for the event loop (group commits, timed
        checkpoints), so that they never wait for each other's flush on the loop."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="trustchain-audit")
        return self._executor

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            self._flushing = False
            return
        if self._fd < 0:
            self._settle(loop, batch, None, AuditError(f"audit log {self.path} is closed"))
            return
        try:
            running = loop.run_in_executor(self._writer(), self._commit, [e for e, _ in batch])
        except Exception as exc:  # closed: the executor refuses new work
            self._settle(loop, batch, None, exc)
            return
        running.add_done_callback(lambda done: self._flushed(loop, batch, done))

    def _flushed(self, loop: asyncio.AbstractEventLoop,
                 batch: list[tuple[_Entry, asyncio.Future[AuditRecord]]],
                 done: asyncio.Future[list[AuditRecord]]) -> None:
        if done.cancelled():
            self._settle(loop, batch, None, AuditError("the audit flush was cancelled"))
        elif (error := done.exception()) is not None:
            self._settle(loop, batch, None, error)
        else:
            self._settle(loop, batch, done.result(), None)

    def _settle(self, loop: asyncio.AbstractEventLoop,
                batch: list[tuple[_Entry, asyncio.Future[AuditRecord]]],
                records: list[AuditRecord] | None, error: BaseException | None) -> None:
        """Wake the batch's callers, then start the next batch if one has gathered."""
        if records is not None:
            for (_, waiter), record in zip(batch, records, strict=True):
                if not waiter.done():
                    waiter.set_result(record)
        else:
            message = str(error) if isinstance(error, AuditError) else (
                f"audit log {self.path}: {type(error).__name__}: {error}")
            for _, waiter in batch:
                if not waiter.done():
                    exc = AuditError(message)
                    exc.__cause__ = error
                    waiter.set_exception(exc)
        if self._pending:
            loop.call_soon(self._flush, loop)
        else:
            self._flushing = False

    def checkpoint(self) -> AuditRecord:
        """Sign the current head now (a ``checkpoint`` record). Blocks for the flush."""
        if self._signer is None:
            raise AuditError("this audit log has no signer for checkpoints")
        return self._commit([], checkpoint=True)[-1]

    @property
    def unsigned(self) -> bool:
        """Whether records follow the last checkpoint (or no checkpoint exists yet)."""
        return self._unsigned

    @property
    def failure(self) -> str | None:
        """Why the log accepts no more records (a write failed), else None."""
        return self._failed

    def problem(self) -> str | None:
        """None if records are written and signed, else why not (the ``audit`` health
        check)."""
        if self._failed is not None:
            return (f"a write failed ({self._failed}); no records are written until the "
                    "node restarts")
        if self.checkpoint_failure is not None:
            return f"checkpoints cannot be signed: {self.checkpoint_failure}"
        return self._segments.problem() if self._segments is not None else None

    def sign_tail(self) -> AuditRecord | None:
        """A checkpoint over the records after the last one, if there are any (and a
        signer); None if there was nothing to sign. Blocks for the flush."""
        with self._lock:
            if self._signer is None or not self._unsigned or self._fd < 0:
                return None
            return self._commit_locked([], checkpoint=True)[-1]

    async def sign_tail_every(self, interval: float) -> None:
        """Until cancelled: every ``interval`` seconds, sign the records written since the
        last checkpoint (if any), in the writer thread, so no record stays unsigned for
        longer than about ``interval`` while the node runs. A failure is logged, kept in
        :attr:`checkpoint_failure` (``node.health`` reports it) and tried again."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            if not self._unsigned or self._signer is None or self._fd < 0:
                continue
            try:
                await loop.run_in_executor(self._writer(), self.sign_tail)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.checkpoint_failure is None:
                    log.error("audit log %s: timed checkpoint failed: %s", self.path, exc)
                self.checkpoint_failure = f"{type(exc).__name__}: {exc}"

    def _commit(self, entries: list[_Entry], checkpoint: bool = False) -> list[AuditRecord]:
        """Chain, write and flush ``entries`` (plus a checkpoint when due) at once."""
        with self._lock:
            return self._commit_locked(entries, checkpoint)

    def _commit_locked(self, entries: list[_Entry], checkpoint: bool) -> list[AuditRecord]:
        if self._failed is not None or self._fd < 0:
            self._raise_unusable()
        old_seq, prev = self._head
        seq = old_seq
        records: list[AuditRecord] = []
        lines: list[bytes] = []
        for entry in entries:
            seq += 1
            record, line = _seal(seq, entry, prev)
            records.append(record)
            lines.append(line)
            prev = record.hash
        last_kind = entries[-1].kind if entries else ""
        every = self._checkpoint_every
        due = (self._signer is not None and every > 0 and bool(entries)
               and seq // every > old_seq // every)
        if checkpoint or due:
            try:
                record, line = _seal(seq + 1, self._checkpoint_entry(seq, prev), prev)
            except Exception as exc:
                self.checkpoint_failure = f"{type(exc).__name__}: {exc}"
                if checkpoint:
                    raise
                # The operations matter more than the signature over them: log
                # them unsigned and sign at the next multiple.
                log.exception("audit log %s: checkpoint after record %d failed",
                              self.path, seq)
            else:
                self.checkpoint_failure = None
                seq += 1
                lines.append(line)
                prev = record.hash
                last_kind = CHECKPOINT_KIND
                if checkpoint:  # an automatic one is not the caller's record
                    records.append(record)
        payload = b"".join(lines)
        self._write(payload)
        self._size += len(payload)
        self._head = (seq, prev)
        self._unsigned = last_kind != CHECKPOINT_KIND
        if not self._unsigned and self._segments is not None:
            self._segments.closed(self._size)
        return records

    def _checkpoint_entry(self, covers_seq: int, covers_hash: bytes) -> _Entry:
        signer = self._signer
        assert signer is not None
        message = _checkpoint_message(covers_seq, covers_hash)
        signature = signer.sign(message)
        # Check our own signature: a token that signs garbage should fail here, not at audit.
        if not verify_signature(signer.public_key(), signature, message):
            raise AuditError(f"audit signer {signer.name!r} made a signature that does not verify")
        return self._prepare(CHECKPOINT_KIND, {
            "covers_seq": covers_seq, "covers_hash": covers_hash, "key": signer.name,
            "algorithm": signer.algorithm, "public_key": self._signer_spki,
            "signature": signature}, internal=True)

    def _write(self, payload: bytes) -> None:
        try:
            view = memoryview(payload)
            while view:
                written = os.write(self._fd, view)
                if written <= 0:
                    raise OSError("write returned 0")
                view = view[written:]
            os.fdatasync(self._fd)
        except OSError as exc:
            # The file now ends in an unknown state (after a failed flush the
            # kernel may have dropped the pages): stop until a restart re-reads it.
            self._failed = f"{type(exc).__name__}: {exc}"
            raise AuditError(f"audit log {self.path}: write failed ({exc}); no further "
                             "records until the node restarts") from exc

    def _raise_unusable(self) -> NoReturn:
        if self._fd < 0:
            raise AuditError(f"audit log {self.path} is closed")
        raise AuditError(f"audit log {self.path} failed earlier ({self._failed}); "
                         "restart the node to recover")

    def close(self) -> None:
        """Sign the unsigned tail (if there is a signer) and release the file.

        Close this before the keystore that holds the signer.
        """
        with self._lock:
            if self._fd < 0:
                return
            if self._signer is not None and self._unsigned and self._failed is None:
                try:
                    self._commit_locked([], checkpoint=True)
                except Exception:
                    log.exception("audit log %s: final checkpoint failed", self.path)
            fd, self._fd = self._fd, -1
            os.close(fd)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._segments is not None:
            self._segments.stop()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AuditLog {self.path} head={self._head[0]}>"


def _last_line(fd: int, size: int) -> tuple[bytes | None, int]:
    """The last newline-terminated line (without it) and the offset just past it."""
    buf = b""
    pos = size
    end = -1  # offset just past the last newline
    while pos > 0:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        if end < 0:
            found = buf.rfind(b"\n")
            if found < 0:
                continue
            end = pos + found + 1
        start = buf.rfind(b"\n", 0, end - pos - 1)
        if start >= 0:
            return buf[start + 1:end - pos - 1], end
    if end < 0:
        return None, 0
    return buf[:end - 1], end


def _tail_start(fd: int, size: int) -> int:
    """Offset of the record the last checkpoint covers (the line before it), or 0 when
    there is none within the last few MiB (then everything is checked)."""
    lines = _lines_backwards(fd, size, _TAIL_LIMIT)
    for _, line in lines:
        if _is_checkpoint(line):
            return next(lines, (0, b""))[0]
    return 0


def _lines_backwards(fd: int, size: int, limit: int) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` of the newline-terminated lines before ``size``, the last
    first, reading at most about ``limit`` bytes back; each byte is read and split once."""
    pos = size
    rest = b""  # bytes [pos, end of what is not yet yielded): a line cut by the last read
    while pos > 0 and size - pos < limit:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        rest = os.pread(fd, step, pos) + rest
        parts = rest.split(b"\n")[:-1]  # rest ends with a newline: the last part is empty
        first = 0 if pos == 0 else 1     # parts[0] may be cut unless the read reached 0
        offset = pos + len(rest)
        for line in reversed(parts[first:]):
            offset -= len(line) + 1
            yield offset, line
        rest = rest[:len(parts[0]) + 1] if first else b""


def _is_checkpoint(line: bytes) -> bool:
    if CHECKPOINT_KIND.encode() not in line:
        return False
    try:
        return _parse_line(line).kind == CHECKPOINT_KIND
    except _Malformed:
        return False


def verify_log(path: Path, *, public_keys: list[Any] | None = None) -> AuditReport:
    """Check every record's hash, the sequence, the chain and every checkpoint.

    Editing, removing or reordering records is detected and reported by seq (or
    line, for a line that is not a record). Removing records from the end is not
    detectable from the file alone once no checkpoint follows them: the report's
    ``unsigned_tail`` says how many records that could be. ``public_keys``
    (``cryptography`` public keys or DER SPKI bytes) are the keys trusted to sign
    checkpoints; without them a checkpoint is only checked against the key it
    names itself, which someone rewriting the whole file could replace.
    """
    trusted = None if public_keys is None else {_spki(key) for key in public_keys}
    try:
        with open(path, "rb") as handle:
            return _verify_lines(handle, trusted)
    except FileNotFoundError:
        raise AuditError(f"no audit log at {path}") from None


def _verify_lines(handle: Iterable[bytes], trusted: set[bytes] | None, *,
                  resume: bool = False) -> AuditReport:
    """The report on the lines from ``handle`` (a file from its position, or any lines
    with their newlines); ``resume``: that is not the start of the log (the first
    line's predecessor is unknown)."""
    problems: list[str] = []
    warnings: list[str] = []
    records = 0
    last_seq: int | None = None if resume else 0  # None: unknown (not a record, or resumed)
    last_hash: bytes | None = None if resume else GENESIS
    last_checkpoint: int | None = None
    since_checkpoint = 0
    for number, raw in enumerate(handle, 1):
        if not raw.endswith(b"\n"):
            warnings.append(f"line {number}: incomplete last line ({len(raw)} bytes), a "
                            "write interrupted by a crash; opening the log removes it")
            break
        records += 1
        since_checkpoint += 1
        try:
            parsed = _parse_line(raw[:-1])
            digest = _hash_of(parsed)
        except _Malformed as exc:
            problems.append(f"line {number}: not a valid record ({exc})")
            last_seq = last_hash = None
            continue
        seq = parsed.seq
        if digest != parsed.hash:
            problems.append(f"record {seq}: hash mismatch (edited)")
        if last_seq is not None and seq != last_seq + 1:
            if last_seq == 0:
                problems.append(f"record {seq}: the log starts at {seq}, not 1 "
                                "(records removed from the start)")
            else:
                problems.append(f"record {seq}: sequence {seq} follows {last_seq} "
                                "(records removed or reordered)")
        elif last_hash is not None and parsed.prev != last_hash:
            if last_seq == 0:
                problems.append(f"record {seq}: prev of the first record is not zero")
            else:
                problems.append(f"record {seq}: prev does not match record {last_seq}'s "
                                "hash (that record edited, or records removed)")
        if parsed.kind == CHECKPOINT_KIND:
            problem = _check_checkpoint(parsed, trusted)
            if problem is None:
                last_checkpoint = seq
                since_checkpoint = 0
            else:
                problems.append(f"checkpoint at {seq}: {problem}")
        last_seq, last_hash = seq, parsed.hash
    return AuditReport(ok=not problems, records=records, last_checkpoint_seq=last_checkpoint,
                       problems=problems, unsigned_tail=since_checkpoint, warnings=warnings,
                       last_seq=last_seq)
