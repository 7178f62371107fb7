"""The CT log: shards, batched sequencing, signed tree heads and the live feed.

Submissions wait in a pool. The sequencer takes the pool as one batch at
most every ``batch_interval`` seconds (at once when ``max_batch`` entries
wait and no batch is being written): it gives each entry the next index and
the batch's timestamp, signs every SCT (with the static-ct-api
``leaf_index`` extension) and the new tree head, stages the changed tiles
(fsync), commits the checkpoint by compare-and-swap in SQLite (fsync), and
only then releases the batch's SCTs and publishes its entries to the live
feed. Tiles are written in place afterwards, off the critical path; a crash
before that is repaired from the staged bundle at the next start
(:meth:`store.TileLog.recover`).

A submission already in the log gets the SCT it got the first time: same
timestamp, same index, same signature.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization

from protocol import Internal, NotFound, Unavailable
from protocol.ct_merkle import EMPTY_ROOT
from protocol.ct_structs import (
    PRECERT_ENTRY,
    X509_ENTRY,
    SignedCertificateTimestamp,
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
    CheckpointConflict,
    CheckpointRecord,
    CtDatabase,
    ShardRecord,
    TileDirectory,
    TileLog,
)

from ._submitted import CheckedChain

log = logging.getLogger("trustchain.ct")


@dataclass(frozen=True, slots=True)
class Submitted:
    """The answer to one submission: its SCT and where the entry is."""

    sct: SignedCertificateTimestamp
    shard: int
    leaf_index: int


@dataclass(slots=True)
class _Pending:
    entry_hash: bytes
    entry_type: int
    chain: CheckedChain
    future: asyncio.Future[Submitted]
    fingerprint: bytes
    waiters: list[asyncio.Future[Submitted]] = field(default_factory=list)
    """Identical submissions that arrived while this one was pooled."""

    def resolve(self, result: Submitted | BaseException) -> None:
        for future in (self.future, *self.waiters):
            if future.done():
                continue  # a submitter that gave up (the entry is logged all the same)
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


PIPELINE_DEPTH = 2
"""Batches prepared ahead of the one being written."""


@dataclass(slots=True)
class Shard:
    """One log: its key, its tiles and its latest checkpoint."""

    record: ShardRecord
    signer: Any
    tiles: TileLog
    checkpoint: CheckpointRecord
    issuers: dict[bytes, bytes] = field(default_factory=dict)
    """SHA-256 -> DER of every issuer certificate the shard's entries refer to."""
    prepared: CheckpointRecord = field(default=None)  # type: ignore[assignment]
    """The tree head of the last batch prepared (committed or not); set from
    ``checkpoint`` when the shard is loaded."""

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
    """One sequenced batch as subscribers receive it."""

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


@dataclass(slots=True, kw_only=True)
class _Prepared:
    """A batch whose durable write is under way."""

    shard: Shard
    batch: list[_Pending]
    bundle: Bundle | None
    old: CheckpointRecord
    new: CheckpointRecord
    signatures: list[bytes]
    items: list[dict[str, Any]]
    slim: list[dict[str, Any]]
    new_issuers: dict[bytes, bytes]
    job: asyncio.Future[None]
    epoch: int


class LiveFeed:
    """The most recent sequenced entries, for subscribers that follow the log live.

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


class CtLog:
    """All shards of the log and the sequencer that feeds the active one.

    :param tiles: where the shards' tiles live (``store.TileDirectory``).
    :param origin: checkpoint origin prefix; shard *n*'s origin is ``origin/<n>``.
    :param batch_interval: seconds between the starts of two batches.
    :param sth_interval: longest time without a fresh signed tree head.
    :param on_sequenced: called with each sequenced batch once it is durable (the
        ``fp.watch`` streams); a failing listener is logged and skipped.
    :param clock: wall clock in seconds; timestamps are its milliseconds.
    """

    def __init__(self, *, tiles: TileDirectory, db: CtDatabase, keystore: Any, origin: str,
                 max_entries_per_shard: int = 10_000_000, batch_interval: float = 0.02,
                 max_batch: int = 4096, sth_interval: float = 1.0,
                 feed_capacity: int = 16_384,
                 on_sequenced: Sequence[Callable[[Shard, LiveBatch], None]] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self.tiles = tiles
        self.db = db
        self.keystore = keystore
        self.origin = origin
        self.max_entries_per_shard = max_entries_per_shard
        self.batch_interval = batch_interval
        self.max_batch = max_batch
        self.sth_interval = sth_interval
        self.clock = clock
        self.shards: list[Shard] = []
        self.feed = LiveFeed(feed_capacity)
        self.failed: str | None = None
        """Set when the log stopped sequencing (another writer, a storage failure)."""
        self.sequenced = 0
        self.batches = 0
        self.on_sequenced = tuple(on_sequenced)
        self._pool: list[_Pending] = []
        self._inflight: dict[bytes, _Pending] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_flush = 0.0
        self._committer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ct-commit")
        self._installer = concurrent.futures.ThreadPoolExecutor(1,
                                                                thread_name_prefix="ct-install")
        self._installing: set[asyncio.Future[None]] = set()
        self._commits: list[_Prepared] = []
        """Batches prepared and not yet completed, oldest first."""
        self._queue: asyncio.Queue[_Prepared] = asyncio.Queue()
        self._progress = asyncio.Event()
        self._committer_task: asyncio.Task[None] | None = None
        self._epoch = 0
        self._reloading = False

    # --- opening ------------------------------------------------------------------------

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def open(self) -> None:
        """Load every shard (repairing tiles from staged bundles); create shard 0 if none."""
        records = self.db.shards()
        if not records:
            self._create_shard(0)
            records = self.db.shards()
        for record in records:
            if record.shard < len(self.shards):
                continue
            self.shards.append(self._load_shard(record))
        if self.active.size >= self.max_entries_per_shard:
            self._rollover()

    def _load_shard(self, record: ShardRecord) -> Shard:
        signer = self.keystore.get(record.key_name)
        if signer is None:
            raise RuntimeError(f"the key {record.key_name!r} of CT shard {record.shard} is "
                               "missing from the keystore")
        checkpoint = self.db.checkpoint(record.shard)
        assert checkpoint is not None
        tiles = self.tiles.shard(record.shard)
        repaired = tiles.recover(checkpoint.size, checkpoint.root)
        if repaired:
            log.warning("CT shard %d: re-installed %d staged tile bundles", record.shard,
                        repaired, extra={"shard": record.shard, "bundles": repaired})
        shard = Shard(record=record, signer=signer, tiles=tiles, checkpoint=checkpoint,
                      prepared=checkpoint, issuers=tiles.issuers())
        tiles.write_checkpoint(checkpoint.note.encode())
        tiles.write_public_key(signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return shard

    def _create_shard(self, number: int) -> None:
        name = f"ct-log-{number}"
        signer = self.keystore.get_or_create(name)
        log_id = log_id_of(signer.public_key())
        origin = f"{self.origin}/{number}"
        timestamp = self.now_ms()
        signature = digitally_signed(signer.sign(tree_head_signed_data(timestamp, 0,
                                                                       EMPTY_ROOT)))
        note = signed_checkpoint(origin, 0, EMPTY_ROOT, timestamp, signature, log_id)
        record = ShardRecord(shard=number, key_name=name, log_id=log_id, origin=origin,
                             created_at=self.clock(), frozen=False)
        self.db.add_shard(record, CheckpointRecord(number, 0, EMPTY_ROOT, timestamp, signature,
                                                   note))
        log.info("CT shard %d created", number, extra={"shard": number,
                                                      "log_id": log_id.hex()})

    def _rollover(self) -> None:
        full = self.active
        self.db.freeze_shard(full.number)
        full.record = ShardRecord(full.record.shard, full.record.key_name, full.record.log_id,
                                  full.record.origin, full.record.created_at, True)
        self._create_shard(full.number + 1)
        record = self.db.shards()[-1]
        self.shards.append(self._load_shard(record))
        self.feed.notify()

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

    # --- running --------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._last_flush = loop.time()
        self._progress = asyncio.Event()
        self._queue = asyncio.Queue()
        self._committer_task = loop.create_task(self._committer_loop())
        self._task = loop.create_task(self._sequencer())

    async def stop(self) -> None:
        """Sequence what is pooled, then stop; wait for tile installation."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._committer_task is not None:
            while self._pool and self.failed is None and self._room():
                await self._prepare_next()
            await self._queue.join()
            self._committer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer_task
            self._committer_task = None
        if self._installing:
            await asyncio.gather(*self._installing, return_exceptions=True)
        self._committer.shutdown(wait=True)
        self._installer.shutdown(wait=True)

    async def _sequencer(self) -> None:
        """Prepare batches; the committer task makes each durable, in order. While one
        batch is being written (fsync), the next is prepared (signing, hashing)."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        last_sth = loop.time()
        while True:
            timeout = max(0.0, last_sth + self.sth_interval - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            if self.failed is not None:
                return
            if self._pool:
                delay = self._last_flush + self.batch_interval - loop.time()
                if delay > 0 and len(self._pool) < self.max_batch:
                    await asyncio.sleep(delay)
            if not self._room():
                # The active shard is full: the batch that filled it is being written;
                # the next shard starts when it completes.
                self._progress.clear()
                await self._progress.wait()
                self._wake.set()
                continue
            due = loop.time() - last_sth >= self.sth_interval
            if self._pool or due:
                await self._prepare_next()
                last_sth = loop.time()
            if self._pool:
                self._wake.set()

    def _room(self) -> int:
        """Entries the active shard can still take (batches in flight counted)."""
        return self.max_entries_per_shard - self.active.tiles.appended

    async def _prepare_next(self) -> None:
        while len(self._commits) >= PIPELINE_DEPTH or self._reloading:
            self._progress.clear()
            await self._progress.wait()
            if self.failed is not None:
                return
        take = min(len(self._pool), self._room(), self.max_batch)
        batch, self._pool = self._pool[:take], self._pool[take:]
        try:
            prepared = self._prepare(batch)
        except Exception as exc:
            # Nothing of this batch is durable; what was appended in memory is dropped.
            log.exception("CT sequencing failed")
            shard = self.active
            self._batch_failed(_Prepared(
                shard=shard, batch=batch, bundle=None, old=shard.prepared, new=shard.prepared,
                signatures=[], items=[], slim=[], new_issuers={},
                job=asyncio.get_running_loop().create_future(), epoch=self._epoch), exc,
                in_flight=False)
            return
        self._commits.append(prepared)
        self._queue.put_nowait(prepared)

    async def _committer_loop(self) -> None:
        while True:
            prepared = await self._queue.get()
            try:
                await prepared.job
                error: BaseException | None = None
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                error = exc
            self._commits.remove(prepared)
            try:
                self._complete(prepared, error)
                self._maybe_reload()
            except Exception:
                log.exception("CT batch completion failed")
            self._progress.set()
            self._queue.task_done()

    # --- submitting -------------------------------------------------------------------------

    async def submit(self, chain: CheckedChain, *, precert: bool) -> Submitted:
        """Log a checked chain; return its SCT once the entry is durable.

        :raises Unavailable: the log stopped sequencing.
        """
        if self.failed is not None:
            raise Unavailable(f"the CT log is not sequencing: {self.failed}")
        if precert:
            entry_type = PRECERT_ENTRY
            signed = (chain.issuer_key_hash + len(chain.tbs).to_bytes(3, "big") + chain.tbs)
        else:
            entry_type = X509_ENTRY
            signed = len(chain.leaf_der).to_bytes(3, "big") + chain.leaf_der
        key = entry_hash(entry_type, signed)
        loop = asyncio.get_running_loop()
        pending = self._inflight.get(key)
        if pending is not None:
            waiter: asyncio.Future[Submitted] = loop.create_future()
            pending.waiters.append(waiter)
            return await waiter
        # Whether the log already holds it is looked up for the whole batch at once.
        future: asyncio.Future[Submitted] = loop.create_future()
        pending = _Pending(entry_hash=key, entry_type=entry_type, chain=chain, future=future,
                           fingerprint=hashlib.sha256(chain.leaf_der).digest())
        self._inflight[key] = pending
        self._pool.append(pending)
        if self._wake is not None:
            self._wake.set()
        return await future

    # --- sequencing -------------------------------------------------------------------------

    def _prepare(self, batch: list[_Pending]) -> _Prepared:
        """Sequence ``batch``: index, timestamp, SCTs, tiles, tree head; start its durable
        write on the committer thread."""
        loop = asyncio.get_running_loop()
        self._last_flush = loop.time()
        shard = self.active
        old = shard.prepared
        if batch:
            batch = self._drop_logged(batch)
        timestamp = max(self.now_ms(), old.timestamp)
        index = old.size
        appended: list[Appended] = []
        leaves: list[tuple[bytes, int, int]] = []
        submissions: list[tuple[bytes, int, int, int, bytes]] = []
        fingerprints: list[tuple[Any, ...]] = []
        names_rows: list[tuple[str, bytes]] = []
        signatures: list[bytes] = []
        items: list[dict[str, Any]] = []
        slim: list[dict[str, Any]] = []
        new_issuers: dict[bytes, bytes] = {}
        sign = shard.signer.sign
        seen = self.clock()
        number = shard.number
        head = struct.pack(">Q", timestamp)
        known_issuers = shard.issuers
        sha256 = hashlib.sha256
        for p in batch:
            chain = p.chain
            extensions = leaf_index_extensions(index)
            # TimestampedEntry; the SCT signs 00 00 || it, which is also the MerkleTreeLeaf.
            if p.entry_type == X509_ENTRY:
                te = (head + b"\x00\x00" + len(chain.leaf_der).to_bytes(3, "big")
                      + chain.leaf_der + b"\x00\x08" + extensions)
                pre = b""
                kind = "x509"
            else:
                te = (head + b"\x00\x01" + chain.issuer_key_hash
                      + len(chain.tbs).to_bytes(3, "big") + chain.tbs + b"\x00\x08"
                      + extensions)
                pre = len(chain.leaf_der).to_bytes(3, "big") + chain.leaf_der
                kind = "precert"
            leaf_input = b"\x00\x00" + te
            signature = digitally_signed(sign(leaf_input))
            hashed = sha256(b"\x00" + leaf_input).digest()
            chain_fps = [sha256(d).digest() for d in chain.issuers]
            for fp, der in zip(chain_fps, chain.issuers, strict=True):
                if fp not in known_issuers:
                    new_issuers[fp] = der
            fps = b"".join(chain_fps)
            appended.append(Appended(hashed, te + pre + len(fps).to_bytes(2, "big") + fps,
                                     p.fingerprint, chain.names))
            leaves.append((hashed, number, index))
            submissions.append((p.entry_hash, number, index, timestamp, signature))
            fingerprints.append((p.fingerprint, chain.spki_sha256, kind, number, index, None,
                                 seen))
            names_rows += [(n, p.fingerprint) for n in chain.names]
            signatures.append(signature)
            item = {"index": index, "timestamp": timestamp, "entry_type": kind,
                    "fingerprint": p.fingerprint, "names": list(chain.names)}
            slim.append(item)
            items.append({**item, "leaf_input": leaf_input})
            index += 1
        bundle: Bundle | None = None
        if batch:
            bundle = shard.tiles.append(appended)
            for fp, der in new_issuers.items():
                shard.tiles.stage_issuer(bundle, fp, der)
            size, root = bundle.size, bundle.root
        else:
            size, root = old.size, old.root
        tree_signature = digitally_signed(sign(tree_head_signed_data(timestamp, size, root)))
        note = signed_checkpoint(shard.origin, size, root, timestamp, tree_signature,
                                 shard.log_id)
        new = CheckpointRecord(shard.number, size, root, timestamp, tree_signature, note)
        shard.prepared = new
        job = loop.run_in_executor(self._committer, self._durable, shard, bundle, old, new,
                                   leaves, submissions, fingerprints, names_rows)
        return _Prepared(shard=shard, batch=batch, bundle=bundle, old=old, new=new,
                         signatures=signatures, items=items, slim=slim,
                         new_issuers=new_issuers, job=job, epoch=self._epoch)

    def _drop_logged(self, batch: list[_Pending]) -> list[_Pending]:
        """Answer the submissions the log already holds with their first SCT."""
        found = self.db.submissions([p.entry_hash for p in batch])
        if not found:
            return batch
        fresh = []
        for p in batch:
            first = found.get(p.entry_hash)
            if first is None:
                fresh.append(p)
                continue
            self._inflight.pop(p.entry_hash, None)
            shard = self.shards[first.shard]
            p.resolve(Submitted(sct=SignedCertificateTimestamp(
                log_id=shard.log_id, timestamp=first.timestamp,
                extensions=leaf_index_extensions(first.leaf_index),
                signature=first.sct_signature), shard=first.shard,
                leaf_index=first.leaf_index))
        return fresh

    def _complete(self, prepared: _Prepared, error: BaseException | None) -> None:
        """A batch's durable write finished: release its SCTs and publish it, or fail it."""
        shard, batch, bundle = prepared.shard, prepared.batch, prepared.bundle
        if error is not None or prepared.epoch != self._epoch:
            self._batch_failed(prepared, error)
            return
        old, new = prepared.old, prepared.new
        if bundle is not None:
            shard.tiles.publish(bundle)
            shard.issuers.update(prepared.new_issuers)
        shard.checkpoint = new
        self.batches += 1
        self.sequenced += len(batch)
        first = old.size
        for i, (p, signature) in enumerate(zip(batch, prepared.signatures, strict=True)):
            self._inflight.pop(p.entry_hash, None)
            p.resolve(Submitted(sct=SignedCertificateTimestamp(
                log_id=shard.log_id, timestamp=new.timestamp,
                extensions=leaf_index_extensions(first + i), signature=signature),
                shard=shard.number, leaf_index=first + i))
        live = LiveBatch(shard=shard.number, start=old.size, entries=prepared.items,
                         slim=prepared.slim, sth=shard.sth())
        if batch:
            self.feed.publish(live)
        else:
            self.feed.notify()
        for callback in self.on_sequenced:
            try:
                callback(shard, live)
            except Exception:
                log.exception("CT on_sequenced callback failed")
        if bundle is not None:
            self._install(shard, bundle)
        else:
            self._installer.submit(shard.tiles.write_checkpoint, new.note.encode())
        if shard is self.active and shard.size >= self.max_entries_per_shard \
                and self.failed is None:
            self._rollover()  # rare: a few milliseconds on the loop
            if self._wake is not None:
                self._wake.set()

    def _durable(self, shard: Shard, bundle: Bundle | None, old: CheckpointRecord,
                 new: CheckpointRecord, leaves: list[tuple[bytes, int, int]],
                 submissions: list[tuple[bytes, int, int, int, bytes]],
                 fingerprints: list[tuple[Any, ...]], names: list[tuple[str, bytes]]) -> None:
        if bundle is not None:
            shard.tiles.write_bundle(bundle, new.note.encode())
        self.db.commit_batch(old, new, leaves, submissions, fingerprints, names)

    def _install(self, shard: Shard, bundle: Bundle) -> None:
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._installer, shard.tiles.install, bundle)
        self._installing.add(job)

        def done(job: asyncio.Future[None]) -> None:
            self._installing.discard(job)
            if job.cancelled():
                return
            error = job.exception()
            if error is not None:
                log.error("CT tiles could not be installed (the staged bundle stays and is "
                          "re-installed at the next start)", extra={"error": str(error)})
                return
            shard.tiles.installed(bundle)
        job.add_done_callback(done)

    def _batch_failed(self, prepared: _Prepared, error: BaseException | None, *,
                      in_flight: bool = True) -> None:
        """Fail a batch's submissions; reload the committed tree once nothing is in flight.

        ``in_flight``: the batch reached the committer, so the batches prepared after it
        (on top of it) fail with it. A batch that failed while being prepared is alone.
        """
        if prepared.epoch == self._epoch:
            if in_flight:
                self._epoch += 1
            self._reloading = True
            if isinstance(error, CheckpointConflict):
                self.failed = str(error)
                log.critical("CT log stopped: %s", error)
            else:
                log.error("CT batch could not be stored: %s", error, extra={"error": str(error)})
        failure = (Unavailable(f"the CT log is not sequencing: {self.failed}") if self.failed
                   else Internal("the CT log could not store the batch; resubmit"))
        for p in prepared.batch:
            self._inflight.pop(p.entry_hash, None)
            p.resolve(failure)
        self._maybe_reload()

    def _maybe_reload(self) -> None:
        """After a failure, once no batch is in flight: forget what was appended in memory
        and load the committed tree again."""
        if not self._reloading or self._commits:
            return
        shard = self.active
        try:
            checkpoint = self.db.checkpoint(shard.number)
            assert checkpoint is not None
            tiles = self.tiles.shard(shard.number)
            tiles.recover(checkpoint.size, checkpoint.root)
        except Exception as exc:
            # The committed tree cannot be read back: stop sequencing rather than guess.
            self.failed = f"the committed tree cannot be reloaded: {exc}"
            log.critical("CT log stopped: %s", self.failed)
            failure = Unavailable(f"the CT log is not sequencing: {self.failed}")
            pool, self._pool = self._pool, []
            for p in pool:
                self._inflight.pop(p.entry_hash, None)
                p.resolve(failure)
        else:
            shard.checkpoint = shard.prepared = checkpoint
            shard.tiles = tiles
        self._reloading = False
        self._progress.set()
