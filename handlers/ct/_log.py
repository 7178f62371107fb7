"""The CT log: shards, entries appended block by block, SCTs, signed tree heads, the live feed.

Every validator holds the same log. Entries come only from committed blocks:
when a block is executed, its entries (the precertificates of the issuances
it commits, and the chains submitted with ``ct.add-chain``) are appended in
block order with the block's time as their timestamp, so every validator
computes the same tree. :meth:`CtLog.append` extends the tiles in memory and
returns a :class:`CtBatch`: the replicated rows (tree size and root, the leaf
and submission indexes, fingerprints) go into the block's state transaction,
the changed tiles are staged on disk first (:meth:`CtLog.stage`, fsync), and
once the transaction is committed :meth:`CtLog.published` lets readers see
the entries and tells subscribers.

What a validator signs is its own: each validator has its own key for each
shard (``ct-log-N`` in its keystore), so its log has its own log ID and
origin, and it signs SCTs (on demand, :meth:`CtLog.sct`) and tree heads for
the shared tree. A shard is full at ``max_entries_per_shard`` entries; the
next entry starts the next shard, at the same entry on every validator.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import hashlib
import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization

from protocol import NotFound
from protocol.ct_merkle import EMPTY_ROOT
from protocol.ct_structs import (
    PRECERT_ENTRY,
    X509_ENTRY,
    SignedCertificateTimestamp,
    TileLeaf,
    TimestampedEntry,
    digitally_signed,
    leaf_index_extensions,
    log_id_of,
    signed_checkpoint,
    tree_head_signed_data,
)
from store import (
    Appended,
    Bundle,
    CtLogRecord,
    KeyStore,
    MultisetHash,
    ObjectStoreUnavailable,
    Row,
    StateChanges,
    StateDatabase,
    TileDirectory,
    TileError,
    TileLog,
    TreeHead,
)

from .._tasks import cancel_and_wait
from ._submitted import CheckedChain

log = logging.getLogger("trustchain.ct")

SIGNED_CACHE = 4096
RETRY_FIRST = 0.1
RETRY_MAX = 2.0
"""Back-off (seconds) between attempts to write tiles to an unreachable object store."""
UNREACHABLE_RETRY_AFTER = 5.0
"""Seconds a client is asked to wait while the tiles' object store cannot be reached."""
"""SCT signatures kept in memory until the state holds them (one SCT per entry)."""


@dataclass(frozen=True, slots=True)
class Submitted:
    """One entry's SCT from this validator's log, and where the entry is."""

    sct: SignedCertificateTimestamp
    shard: int
    leaf_index: int


@dataclass(frozen=True, slots=True)
class Logged:
    """Where the log holds an entry: the same on every validator."""

    entry_hash: bytes
    shard: int
    leaf_index: int
    timestamp: int
    fresh: bool
    """False if the log already held it (a duplicate submission)."""


@dataclass(slots=True)
class Shard:
    """One shard: the shared tree's tiles, and this validator's key and tree head for it."""

    record: CtLogRecord
    signer: Any
    tiles: TileLog
    checkpoint: TreeHead
    """This validator's latest signed tree head of the shard."""
    capacity: int
    in_state: bool
    """Whether the state holds the shard's row (size, root) yet: shard 0 of a new log
    gets it with its first entries."""
    issuers: dict[bytes, bytes] = field(default_factory=dict)
    """SHA-256 -> DER of every issuer certificate the shard's entries refer to."""

    @property
    def number(self) -> int:
        return self.record.shard

    @property
    def log_id(self) -> bytes:
        return self.record.log_id

    @property
    def origin(self) -> str:
        return self.record.origin

    @property
    def size(self) -> int:
        return self.tiles.size

    @property
    def frozen(self) -> bool:
        """Full as readers see it: no more entries (the next shard, already published,
        takes them)."""
        return self.tiles.size >= self.capacity

    def public_key_der(self) -> bytes:
        return bytes(self.signer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))

    def sth(self) -> dict[str, Any]:
        """The RFC 6962 §4.3 ``get-sth`` output plus the checkpoint note."""
        cp = self.checkpoint
        return {"tree_size": cp.size, "timestamp": cp.timestamp, "sha256_root_hash": cp.root,
                "tree_head_signature": cp.signature, "checkpoint": cp.note,
                "shard": self.number, "log_id": self.log_id}


@dataclass(frozen=True, slots=True)
class LiveBatch:
    """One block's entries of one shard as subscribers receive them."""

    shard: int
    start: int
    entries: list[dict[str, Any]]
    """Entry items with ``leaf_input``."""
    slim: list[dict[str, Any]]
    """The same items without ``leaf_input``."""
    sth: dict[str, Any]

    @property
    def end(self) -> int:
        return self.start + len(self.entries)


class LiveFeed:
    """The most recent entries, for subscribers that follow the log live.

    Holds at most ``capacity`` entries; a subscriber whose position falls
    behind the oldest one held is too slow and is told where to resume.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.batches: collections.deque[LiveBatch] = collections.deque()
        self._held = 0
        self._waiters: set[asyncio.Event] = set()
        self.dropped_before: dict[int, int] = {}
        """Per shard: entries below this index are no longer held."""

    def publish(self, batch: LiveBatch) -> None:
        self.batches.append(batch)
        self._held += len(batch.entries)
        while self._held > self.capacity and len(self.batches) > 1:
            old = self.batches.popleft()
            self._held -= len(old.entries)
            self.dropped_before[old.shard] = max(self.dropped_before.get(old.shard, 0), old.end)
        self.notify()

    def notify(self) -> None:
        for waiter in self._waiters:
            waiter.set()

    def find(self, shard: int, position: int) -> LiveBatch | None:
        """The held batch of ``shard`` that contains ``position``."""
        for batch in reversed(self.batches):
            if batch.shard == shard and batch.start <= position < batch.end:
                return batch
            if batch.shard == shard and batch.end <= position:
                return None
        return None

    def waiter(self) -> asyncio.Event:
        event = asyncio.Event()
        self._waiters.add(event)
        return event

    def forget(self, event: asyncio.Event) -> None:
        self._waiters.discard(event)


def entry_hash(entry_type: int, signed_entry: bytes) -> bytes:
    """The deduplication key: SHA-256 of the entry type and what the SCT covers."""
    return hashlib.sha256(struct.pack(">H", entry_type) + signed_entry).digest()


def chain_entry_hash(chain: CheckedChain, *, precert: bool) -> bytes:
    """:func:`entry_hash` of a checked chain, as a precertificate or a certificate entry."""
    if precert:
        return entry_hash(PRECERT_ENTRY, chain.issuer_key_hash
                          + len(chain.tbs).to_bytes(3, "big") + chain.tbs)
    return entry_hash(X509_ENTRY, len(chain.leaf_der).to_bytes(3, "big") + chain.leaf_der)


def entry_item(index: int, entry: TimestampedEntry, fingerprint: bytes,
               names: list[str] | tuple[str, ...], *, leaf_input: bytes | None) -> dict[str, Any]:
    """One entry of a ``ct.subscribe`` ``entries`` event."""
    item: dict[str, Any] = {"index": index, "timestamp": entry.timestamp,
                            "entry_type": "x509" if entry.entry_type == X509_ENTRY
                            else "precert",
                            "fingerprint": fingerprint, "names": list(names)}
    if leaf_input is not None:
        item["leaf_input"] = leaf_input
    return item


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry a block logs: a checked chain, as a precertificate or a certificate."""

    chain: CheckedChain
    precert: bool


@dataclass(slots=True)
class _ShardWrite:
    shard: Shard
    start: int
    bundle: Bundle
    new_issuers: dict[bytes, bytes]
    head: TreeHead
    items: list[dict[str, Any]] = field(default_factory=list)
    slim: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class CtBatch:
    """One block's entries, appended in memory: what to stage, commit and publish."""

    logged: list[Logged]
    """Where each entry of the block went, in the order given."""
    writes: list[_ShardWrite] = field(default_factory=list)
    new_shards: list[Shard] = field(default_factory=list)


class CtLog:
    """All shards of the log.

    :param tiles: where the shards' tiles live (``store.TileDirectory``).
    :param origin: checkpoint origin prefix; shard *n*'s origin is ``origin/<n>``.
    :param sth_interval: longest time without a fresh signed tree head.
    :param on_sequenced: called with each block's entries of a shard once they are
        committed (the ``fp.watch`` streams); a failing listener is logged and skipped.
    :param clock: wall clock in seconds (tree head timestamps).
    """

    def __init__(self, *, tiles: TileDirectory, state: StateDatabase, keystore: KeyStore,
                 origin: str,
                 max_entries_per_shard: int = 10_000_000, sth_interval: float = 1.0,
                 feed_capacity: int = 16_384,
                 on_sequenced: Sequence[Callable[[Shard, LiveBatch], None]] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self.tiles = tiles
        self.state = state
        self.keystore = keystore
        self.origin = origin
        self.max_entries_per_shard = max_entries_per_shard
        self.sth_interval = sth_interval
        self.clock = clock
        self.shards: list[Shard] = []
        self.feed = LiveFeed(feed_capacity)
        self.on_sequenced = tuple(on_sequenced)
        self.sequenced = 0
        self.batches = 0
        self._installer = concurrent.futures.ThreadPoolExecutor(1,
                                                                thread_name_prefix="ct-install")
        self._installing: set[asyncio.Future[None]] = set()
        self._checkpoint_writes: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._signed: collections.OrderedDict[tuple[bytes, int], bytes] = \
            collections.OrderedDict()  # drops its oldest in constant time
        self.failed: str | None = None
        """Why a block's tiles could not be staged: the log in memory is ahead of the
        state, so it appends nothing more until a restart reloads it."""
        self.install_failure: str | None = None
        """Why the latest tiles could not be installed in place (None once some are)."""
        self.head_failure: str | None = None
        """Why the latest fresh tree head could not be saved (None once one is)."""
        self.unreachable: str | None = None
        """Why the tiles' object store cannot be reached now: sequencing waits for it
        (None while it can)."""
        self.listener_failure: str | None = None
        """Why the latest ``on_sequenced`` call failed (fingerprint watchers), else None."""
        self.listener_failures = 0

    # --- opening ------------------------------------------------------------------------

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def open(self) -> None:
        """Load every shard the state holds, repairing tiles from staged bundles; a new
        log has shard 0 (its row is written with the first block)."""
        own = {r.shard: r for r in self.state.ct_logs()}
        for number, size, root in self.state.ct_shards():
            self.shards.append(self._load(number, size, root, own.get(number), in_state=True))
        if not self.shards:
            self.shards.append(self._load(0, 0, EMPTY_ROOT, own.get(0), in_state=False))

    def _own_log(self, number: int) -> CtLogRecord:
        name = f"ct-log-{number}"
        signer = self.keystore.get_or_create(name)
        return CtLogRecord(shard=number, key_name=name, log_id=log_id_of(signer.public_key()),
                           origin=f"{self.origin}/{number}")

    def _load(self, number: int, size: int, root: bytes, record: CtLogRecord | None, *,
              in_state: bool) -> Shard:
        if record is None:
            record = self._own_log(number)
            self.state.save_own(logs=[record])
        signer = self.keystore.get(record.key_name)
        if signer is None:
            raise RuntimeError(f"the key {record.key_name!r} of CT shard {number} is missing "
                               "from the keystore")
        tiles = self.tiles.shard(number)
        repaired = tiles.recover(size, root)
        if repaired:
            log.warning("CT shard %d: re-installed %d staged tile bundles", number, repaired,
                        extra={"shard": number, "bundles": repaired})
        head = self.state.ct_head(number)
        if head is None or head.size != size or head.root != root:
            head = self._sign_head(record, signer, size, root, self.now_ms())
            self.state.save_own(heads=[head])
        shard = Shard(record=record, signer=signer, tiles=tiles, checkpoint=head,
                      capacity=self.max_entries_per_shard, in_state=in_state,
                      issuers=tiles.issuers())
        tiles.write_checkpoint(head.note.encode())
        tiles.write_public_key(signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return shard

    @staticmethod
    def _sign_head(record: CtLogRecord, signer: Any, size: int, root: bytes,
                   timestamp: int) -> TreeHead:
        signature = digitally_signed(signer.sign(tree_head_signed_data(timestamp, size, root)))
        note = signed_checkpoint(record.origin, size, root, timestamp, signature, record.log_id)
        return TreeHead(shard=record.shard, size=size, root=root, timestamp=timestamp,
                        signature=signature, note=note)

    @property
    def active(self) -> Shard:
        return self.shards[-1]

    def shard(self, number: int | None) -> Shard:
        """Shard ``number`` (None: the active one).

        :raises NotFound: no such shard.
        """
        if number is None:
            return self.active
        if not 0 <= number < len(self.shards):
            raise NotFound(f"no CT shard {number} (shards 0 to {len(self.shards) - 1})",
                           field="shard")
        return self.shards[number]

    def shard_by_log_id(self, log_id: bytes) -> Shard | None:
        for shard in self.shards:
            if shard.log_id == log_id:
                return shard
        return None

    # --- appending a block's entries -----------------------------------------------------

    def append(self, entries: Sequence[Entry], timestamp: int, changes: StateChanges,
               rows: MultisetHash) -> CtBatch:
        """Append a block's entries (in order, stamped ``timestamp``) to the tiles in
        memory; add their replicated rows to ``changes`` and ``rows``.

        An entry the log already holds (or that the block logs twice) keeps its first
        place. A shard that fills up is followed at once by the next, empty one.
        """
        if self.failed is not None:
            raise TileError(f"the CT log stopped after a failed block ({self.failed}); "
                            "restart the node")
        keys = [chain_entry_hash(e.chain, precert=e.precert) for e in entries]
        known = self.state.ct_entries(keys)
        places: dict[bytes, Logged] = {
            k: Logged(k, e.shard, e.leaf_index, e.timestamp, fresh=False)
            for k, e in known.items()}
        new: list[tuple[Entry, bytes]] = []
        for entry, key in zip(entries, keys, strict=True):
            if key not in places:
                places[key] = Logged(key, -1, -1, timestamp, fresh=True)  # placed below
                new.append((entry, key))
        batch = CtBatch(logged=[])
        issued = {r[1] for r in changes.upserts.get("fingerprints", ())}
        shard = self.active
        while new:
            room = shard.capacity - shard.tiles.appended
            chunk, new = new[:room], new[room:]
            write = self._write(shard, chunk, timestamp, changes, rows, issued)
            batch.writes.append(write)
            for offset, (_, key) in enumerate(chunk):
                places[key] = Logged(key, shard.number, write.start + offset, timestamp,
                                     fresh=True)
            if shard.tiles.appended >= shard.capacity:  # full once this block is committed
                shard = self._next_shard(shard.number + 1, batch, changes, rows)
        batch.logged = [places[k] for k in keys]
        return batch

    def _next_shard(self, number: int, batch: CtBatch, changes: StateChanges,
                    rows: MultisetHash) -> Shard:
        """Shard ``number``, empty, with this validator's key and a first tree head."""
        record = self._own_log(number)
        signer = self.keystore.get(record.key_name)
        head = self._sign_head(record, signer, 0, EMPTY_ROOT, self.now_ms())
        shard = Shard(record=record, signer=signer, tiles=self.tiles.shard(number),
                      checkpoint=head, capacity=self.max_entries_per_shard, in_state=True)
        batch.new_shards.append(shard)
        changes.ct_logs.append(record)
        changes.ct_heads.append(head)
        row = ("ct_shards", number, 0, EMPTY_ROOT)
        changes.upsert(row)
        rows.add(row)
        return shard

    def _write(self, shard: Shard, entries: list[tuple[Entry, bytes]], timestamp: int,
               changes: StateChanges, rows: MultisetHash, issued: set[bytes]) -> _ShardWrite:
        """The tiles and rows of ``entries`` appended to ``shard``, and its new head."""
        sha256 = hashlib.sha256
        number = shard.number
        start = shard.tiles.appended
        index = start
        head = struct.pack(">Q", timestamp)
        appended: list[Appended] = []
        new_issuers: dict[bytes, bytes] = {}
        items: list[dict[str, Any]] = []
        slim: list[dict[str, Any]] = []
        for entry, key in entries:
            chain = entry.chain
            extensions = leaf_index_extensions(index)
            # TimestampedEntry; the SCT signs 00 00 || it, which is also the MerkleTreeLeaf.
            if entry.precert:
                te = (head + b"\x00\x01" + chain.issuer_key_hash
                      + len(chain.tbs).to_bytes(3, "big") + chain.tbs + b"\x00\x08"
                      + extensions)
                pre = len(chain.leaf_der).to_bytes(3, "big") + chain.leaf_der
                kind = "precert"
            else:
                te = (head + b"\x00\x00" + len(chain.leaf_der).to_bytes(3, "big")
                      + chain.leaf_der + b"\x00\x08" + extensions)
                pre = b""
                kind = "x509"
            leaf_input = b"\x00\x00" + te
            hashed = sha256(b"\x00" + leaf_input).digest()
            chain_fps = [sha256(d).digest() for d in chain.issuers]
            for fp, der in zip(chain_fps, chain.issuers, strict=True):
                if fp not in shard.issuers:
                    new_issuers[fp] = der
            fps = b"".join(chain_fps)
            fingerprint = sha256(chain.leaf_der).digest()
            appended.append(Appended(hashed, te + pre + len(fps).to_bytes(2, "big") + fps,
                                     fingerprint, chain.names))
            indexed: tuple[Row, ...] = ()
            if not self._fingerprinted(fingerprint, entry.precert, issued):
                indexed = (("fingerprints", fingerprint, chain.spki_sha256, kind, number,
                            index, None, timestamp),
                           *(("fingerprint_names", n, fingerprint) for n in chain.names))
            for row in (("ct_entries", key, number, index, timestamp),
                        ("ct_leaves", hashed, number, index), *indexed):
                changes.upsert(row)
                rows.add(row)
            item = {"index": index, "timestamp": timestamp, "entry_type": kind,
                    "fingerprint": fingerprint, "names": list(chain.names)}
            slim.append(item)
            items.append({**item, "leaf_input": leaf_input})
            index += 1
        if shard.in_state:
            rows.remove(("ct_shards", number, shard.tiles.size, shard.tiles.root))
        shard.in_state = True
        bundle = shard.tiles.append(appended)
        for fp, der in new_issuers.items():
            shard.tiles.stage_issuer(bundle, fp, der)
        new_row = ("ct_shards", number, bundle.size, bundle.root)
        changes.upsert(new_row)
        rows.add(new_row)
        signed = self._sign_head(shard.record, shard.signer, bundle.size, bundle.root,
                                 max(timestamp, self.now_ms()))
        changes.ct_heads.append(signed)
        return _ShardWrite(shard=shard, start=start, bundle=bundle, new_issuers=new_issuers,
                           head=signed, items=items, slim=slim)

    def _fingerprinted(self, fingerprint: bytes, precert: bool, issued: set[bytes]) -> bool:
        """Whether the fingerprint index already has this certificate (one the CA issued,
        submitted again with ``ct.add-chain``): its issued row stays the one kept.

        :param issued: the fingerprints this block's own rows index already.
        """
        if precert:
            return False  # a precertificate is logged once (the entry hash says so)
        return fingerprint in issued or self.state.fingerprint(fingerprint) is not None

    async def stage(self, batch: CtBatch) -> None:
        """Make the batch's tiles durable before the state that refers to them is
        committed: staged locally (fsync), or written to the remote object store.

        While that store cannot be reached, sequencing waits (retrying with back-off up
        to :data:`RETRY_MAX` seconds) and :meth:`problem` says why; nothing appended is
        dropped, and it resumes by itself when the store is back.
        """
        loop = asyncio.get_running_loop()
        try:
            for write in batch.writes:
                delay = RETRY_FIRST
                while True:
                    try:
                        await loop.run_in_executor(self._installer,
                                                   write.shard.tiles.write_bundle,
                                                   write.bundle, write.head.note.encode())
                    except ObjectStoreUnavailable as exc:
                        self._unreachable(exc)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, RETRY_MAX)
                        continue
                    self._reachable()
                    break
        except BaseException as exc:
            self.abandon(f"{type(exc).__name__}: {exc}")
            raise

    def _unreachable(self, error: ObjectStoreUnavailable) -> None:
        if self.unreachable is None:
            log.error("CT tiles cannot be written; sequencing waits for the object store",
                      extra={"error": str(error)})
        self.unreachable = str(error)

    def _reachable(self) -> None:
        if self.unreachable is not None:
            log.warning("CT tiles written again; sequencing resumes")
            self.unreachable = None

    def abandon(self, reason: str) -> None:
        """A block appended in memory will not be committed: append nothing more."""
        self.failed = reason
        log.critical("CT log stopped: a block's entries could not be made durable",
                     extra={"reason": reason})

    def published(self, batch: CtBatch) -> None:
        """The block's state is committed: readers see the entries, subscribers hear of
        them, and the tiles are written in place (off the critical path)."""
        self.shards.extend(batch.new_shards)
        for shard in batch.new_shards:
            self._background(self._write_shard_files, shard)
        for write in batch.writes:
            shard = write.shard
            shard.tiles.publish(write.bundle)
            shard.issuers.update(write.new_issuers)
            shard.checkpoint = write.head
            self.sequenced += len(write.items)
            live = LiveBatch(shard=shard.number, start=write.start, entries=write.items,
                             slim=write.slim, sth=shard.sth())
            self.feed.publish(live)
            for callback in self.on_sequenced:
                try:
                    callback(shard, live)
                except Exception as exc:
                    self.listener_failures += 1
                    self.listener_failure = f"{type(exc).__name__}: {exc}"
                    log.exception("CT on_sequenced callback failed")
                else:
                    self.listener_failure = None
            self._install(shard, write.bundle)
        self.batches += 1

    def _install(self, shard: Shard, bundle: Bundle) -> None:
        def done() -> None:
            shard.tiles.installed(bundle)
        self._background(shard.tiles.install, bundle, done=done)

    @staticmethod
    def _write_shard_files(shard: Shard) -> None:
        """A shard's checkpoint and public key objects (blocking)."""
        shard.tiles.write_checkpoint(shard.checkpoint.note.encode())
        shard.tiles.write_public_key(shard.signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def _background(self, write: Callable[..., None], *args: Any,
                    done: Callable[[], None] | None = None,
                    always: Callable[[], None] | None = None) -> None:
        """Run a blocking tile write on the installer thread (in order, off the event
        loop); a failure is logged and shown by :meth:`problem` until one succeeds
        (a staged bundle stays and is re-installed at the next start)."""
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._installer, write, *args)
        self._installing.add(job)

        def finished(job: asyncio.Future[None]) -> None:
            self._installing.discard(job)
            if always is not None:
                always()
            if job.cancelled():
                return
            error = job.exception()
            if isinstance(error, ObjectStoreUnavailable):
                self._unreachable(error)
                return
            if error is not None:
                self.install_failure = f"{type(error).__name__}: {error}"
                log.error("CT tiles could not be installed (the staged bundle stays and is "
                          "re-installed at the next start)", extra={"error": str(error)})
                return
            self.install_failure = None
            self._reachable()
            if done is not None:
                done()
        job.add_done_callback(finished)

    # --- SCTs and tree heads ---------------------------------------------------------------

    def sct(self, logged: Logged) -> Submitted:
        """This validator's SCT for an entry of the log (signed once, then kept)."""
        shard = self.shard(logged.shard)
        key = (logged.entry_hash, logged.shard)
        signature = self._signed.get(key) or self.state.sct_signature(*key)
        if signature is None:
            ((item, _),) = shard.tiles.entries(logged.leaf_index, logged.leaf_index + 1)
            leaf_input = TileLeaf.parse(item).entry.merkle_tree_leaf()
            signature = digitally_signed(shard.signer.sign(leaf_input))
            # kept here until the state has it: a second request meanwhile gets this one
            if len(self._signed) >= SIGNED_CACHE:
                self._signed.popitem(last=False)
            self._signed[key] = signature
            self.state.save_sct(logged.entry_hash, logged.shard, signature)
        return Submitted(sct=SignedCertificateTimestamp(
            log_id=shard.log_id, timestamp=logged.timestamp,
            extensions=leaf_index_extensions(logged.leaf_index), signature=signature),
            shard=logged.shard, leaf_index=logged.leaf_index)

    def start(self) -> None:
        """Re-sign the tree heads every ``sth_interval`` seconds (fresh timestamps while
        no block adds entries)."""
        self._task = asyncio.get_running_loop().create_task(self._refresh_heads())

    async def _refresh_heads(self) -> None:
        while True:
            await asyncio.sleep(self.sth_interval)
            now = self.now_ms()
            for shard in self.shards:
                head = shard.checkpoint
                if shard.frozen or now - head.timestamp < self.sth_interval * 1000:
                    continue
                if shard.number in self._checkpoint_writes:
                    continue  # the previous one is still being written (a slow store)
                fresh = self._sign_head(shard.record, shard.signer, head.size, head.root, now)
                try:
                    self.state.save_own(heads=[fresh])
                except Exception as exc:
                    self.head_failure = f"{type(exc).__name__}: {exc}"
                    log.error("CT tree head not saved: %s", exc)
                    continue
                self.head_failure = None
                shard.checkpoint = fresh
                self._checkpoint_writes.add(shard.number)
                self._background(shard.tiles.write_checkpoint, fresh.note.encode(),
                                 always=functools.partial(self._checkpoint_writes.discard,
                                                          shard.number))
            self.feed.notify()

    def problem(self) -> str | None:
        """None if the log works, else why not (the ``ct`` health check)."""
        if self.failed is not None:
            return f"blocks' entries cannot be staged ({self.failed}); restart the node"
        if self.unreachable is not None:
            return f"sequencing waits for the tiles' object store: {self.unreachable}"
        if self._task is None:
            return "the log is stopped: it signs no fresh tree heads"
        if self._task.done():
            error = None if self._task.cancelled() else self._task.exception()
            return f"the tree-head task ended: {error or 'cancelled'}"
        if self.install_failure is not None:
            return f"tiles could not be installed: {self.install_failure}"
        if self.head_failure is not None:
            return f"a fresh tree head could not be saved: {self.head_failure}"
        return None

    def listener_problem(self) -> str | None:
        """None if the latest fingerprint notification of sequenced entries worked, else
        why not and how many failed (the ``fingerprints`` health check)."""
        if self.listener_failure is None:
            return None
        return (f"indexing sequenced entries for fp.watch failed ({self.listener_failures} "
                f"failures so far): {self.listener_failure}")

    async def stop(self) -> None:
        """Stop re-signing; wait for tile installation."""
        await cancel_and_wait(self._task)
        self._task = None
        if self._installing:
            await asyncio.gather(*self._installing, return_exceptions=True)
        self._installer.shutdown(wait=True)
