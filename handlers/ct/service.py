"""``ct.*`` ops: RFC 6962 §4 over STOQ, the shards, and the live subscription."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from protocol import Event, InvalidRequest, NotFound, Unavailable, error_from_wire
from protocol.ct_structs import TileLeaf, extra_data, tile_leaf_header
from protocol.decisions import Decision, LogChain
from protocol.ops import ct as ops
from store import ObjectStoreUnavailable, TileCorrupted

from .._router import RequestContext, Router
from ._log import (
    UNREACHABLE_RETRY_AFTER,
    CtLog,
    LiveBatch,
    Logged,
    Shard,
    Submitted,
    chain_entry_hash,
)
from ._submitted import ChainValidator


class _ShardArgs(Protocol):
    """Arguments of an op that reads one shard's tiles."""

    @property
    def shard(self) -> int | None: ...


A = TypeVar("A", bound=_ShardArgs)

EVENT_ENTRIES = 256
"""Most entries in one ``entries`` event."""
EVENT_BYTES = 256 * 1024
"""About the most bytes of entries in one ``entries`` event (a client's frame limit is
1 MiB by default); one entry larger than this still goes alone."""


GET_ENTRIES_BYTES = 512 * 1024
"""About the most bytes of entries one ``ct.get-entries`` answer carries."""


def _limit(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first items of ``items`` that fit one event."""
    total = 0
    for i, item in enumerate(items):
        total += 64 + len(item.get("leaf_input", b"")) + sum(len(n) + 2 for n in item["names"])
        if total > EVENT_BYTES and i:
            return items[:i]
    return items


def _beyond(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, field=field, reason="beyond_tree")


def normalise_suffixes(domains: list[str]) -> tuple[str, ...]:
    out = []
    for domain in domains:
        d = domain.strip().lower().rstrip(".")
        if not d or len(d) > 253 or " " in d:
            raise InvalidRequest(f"ct.subscribe: {domain!r} is not a domain suffix",
                                 field="domains")
        out.append(d)
    return tuple(out)


def matches(names: list[str], suffixes: tuple[str, ...]) -> bool:
    """Whether a name is one of ``suffixes`` or under one (``a.b.trust`` is under ``trust``)."""
    for name in names:
        for suffix in suffixes:
            if name == suffix or name.endswith("." + suffix):
                return True
    return False


class Decisions(Protocol):
    """This validator's way to the cluster (``handlers.replica.DecisionLog``)."""

    async def commit(self, decision: Decision, *, checked: bool = False) -> Any:
        """The outcome (``.accepted``, ``.logged``...) of ``decision`` once executed."""
        ...

    def now_ms(self) -> int: ...


class Watch(Protocol):
    """Looks at every certificate submitted, for one a validator signed without a
    decision (the replica's misissuance evidence)."""

    def examine(self, der: bytes) -> None: ...


class CtService:
    """Answers the ``ct.*`` ops from a :class:`CtLog`.

    :param decisions: how a submitted chain gets into every validator's log (a ``log``
        decision); None: this node cannot submit (an observer of the cluster).
    :param watch: shown every submitted leaf.
    """

    def __init__(self, log: CtLog, validator: ChainValidator, *,
                 decisions: Decisions | None = None, watch: Watch | None = None,
                 max_get_entries: int = ops.MAX_GET_ENTRIES,
                 clock: Callable[[], float] = time.time) -> None:
        self.log = log
        self.validator = validator
        self.decisions = decisions
        self.watch = watch
        self.max_get_entries = max_get_entries
        self.clock = clock

    # --- submission ---------------------------------------------------------------------

    async def add_chain(self, args: ops.AddChainArgs, ctx: RequestContext) -> dict[str, Any]:
        return await self._submit(args.chain, precert=False)

    async def add_pre_chain(self, args: ops.AddChainArgs,
                            ctx: RequestContext) -> dict[str, Any]:
        return await self._submit(args.chain, precert=True)

    async def _submit(self, chain: list[bytes], *, precert: bool) -> dict[str, Any]:
        """Check the chain here (a clear error at once), log it through a block (every
        validator appends it at the same index), answer this validator's SCT."""
        checked = self.validator.check(chain, precert=precert)
        if self.watch is not None:
            self.watch.examine(checked.leaf_der)
        known = self.log.state.ct_entry(chain_entry_hash(checked, precert=precert))
        if known is not None and known.shard < len(self.log.shards) \
                and known.leaf_index < self.log.shard(known.shard).size:
            return self._sct_result(self.log.sct(Logged(known.entry_hash, known.shard,
                                                        known.leaf_index, known.timestamp,
                                                        fresh=False)))
        if self.decisions is None:
            raise Unavailable("this node follows the cluster without a validator key; "
                              "submit to a validator")
        outcome = await self.decisions.commit(LogChain(chain=tuple(chain), precert=precert,
                                                       at_ms=self.decisions.now_ms()))
        if not outcome.accepted:
            raise error_from_wire({**outcome.details, "code": outcome.code,
                                   "message": outcome.message})
        return self._sct_result(self.log.sct(outcome.logged))

    @staticmethod
    def _sct_result(submitted: Submitted) -> dict[str, Any]:
        result = submitted.sct.to_item()
        result["shard"] = submitted.shard
        result["leaf_index"] = submitted.leaf_index
        return result

    # --- reads ----------------------------------------------------------------------------

    def get_roots(self, args: ops.GetRootsArgs, ctx: RequestContext) -> dict[str, Any]:
        return {"certificates": list(self.validator.roots)}

    def get_sth(self, args: ops.GetSthArgs, ctx: RequestContext) -> dict[str, Any]:
        return self.log.shard(args.shard).sth()

    def get_sth_consistency(self, args: ops.GetSthConsistencyArgs,
                            ctx: RequestContext) -> dict[str, Any]:
        shard = self.log.shard(args.shard)
        if args.first > args.second:
            raise InvalidRequest(f"first ({args.first}) is larger than second ({args.second})",
                                 field="first", reason="range_reversed")
        if args.second > shard.size:
            raise _beyond("second", f"second ({args.second}) is beyond the tree size "
                                    f"{shard.size}")
        if args.first == 0:
            raise InvalidRequest("a consistency proof from the empty tree proves nothing; "
                                 "first must be at least 1", field="first", reason="empty_tree")
        proof = [] if args.first == args.second else shard.tiles.consistency_proof(
            args.first, args.second)
        return {"consistency": proof}

    def _check_tree_size(self, shard: Shard, tree_size: int) -> None:
        if tree_size > shard.size:
            raise _beyond("tree_size", f"tree_size {tree_size} is beyond the tree size "
                                       f"{shard.size}")

    def get_proof_by_hash(self, args: ops.GetProofByHashArgs,
                          ctx: RequestContext) -> dict[str, Any]:
        shard = self.log.shard(args.shard)
        if len(args.hash) != 32:
            raise InvalidRequest("hash must be a 32-byte leaf hash", field="hash",
                                 reason="bad_hash")
        self._check_tree_size(shard, args.tree_size)
        found = self.log.state.leaf_index(args.hash)
        if found is None or found[0] != shard.number or found[1] >= shard.size:
            raise NotFound(f"no entry with leaf hash {args.hash.hex()} in shard {shard.number}",
                           field="hash")
        index = found[1]
        if index >= args.tree_size:
            raise NotFound(f"the entry is at index {index}, not in the tree of size "
                           f"{args.tree_size}", field="tree_size", reason="not_in_tree")
        return {"leaf_index": index,
                "audit_path": shard.tiles.inclusion_proof(index, args.tree_size)}

    def _entry(self, shard: Shard, item: bytes) -> dict[str, Any]:
        leaf = TileLeaf.parse(item)
        try:
            chain = [shard.issuers[fp] for fp in leaf.chain_fingerprints]
        except KeyError:
            raise TileCorrupted(f"CT shard {shard.number}: an entry names an issuer the shard "
                                "does not hold (its data tile was altered)") from None
        return {"leaf_input": leaf.entry.merkle_tree_leaf(),
                "extra_data": extra_data(leaf, chain)}

    def get_entries(self, args: ops.GetEntriesArgs, ctx: RequestContext) -> dict[str, Any]:
        shard = self.log.shard(args.shard)
        if args.start > args.end:
            raise InvalidRequest(f"start ({args.start}) is after end ({args.end})",
                                 field="start", reason="range_reversed")
        if args.end - args.start + 1 > self.max_get_entries:
            raise InvalidRequest(f"at most {self.max_get_entries} entries per request; asked "
                                 f"for {args.end - args.start + 1}", field="end",
                                 reason="range_too_large")
        if args.start >= shard.size:
            raise _beyond("start", f"start ({args.start}) is beyond the last entry "
                                   f"({shard.size - 1})")
        end = min(args.end + 1, shard.size)
        entries: list[dict[str, Any]] = []
        total = 0
        for item, _ in shard.tiles.entries(args.start, end):
            entry = self._entry(shard, item)
            total += len(entry["leaf_input"]) + len(entry["extra_data"]) + 32
            if total > GET_ENTRIES_BYTES and entries:
                break  # RFC 6962 §4.6: a log may return fewer entries than asked for
            entries.append(entry)
        return {"entries": entries}

    def get_entry_and_proof(self, args: ops.GetEntryAndProofArgs,
                            ctx: RequestContext) -> dict[str, Any]:
        shard = self.log.shard(args.shard)
        self._check_tree_size(shard, args.tree_size)
        if args.leaf_index >= args.tree_size:
            raise InvalidRequest(f"leaf_index {args.leaf_index} is not in a tree of size "
                                 f"{args.tree_size}", field="leaf_index", reason="beyond_tree")
        ((item, _),) = shard.tiles.entries(args.leaf_index, args.leaf_index + 1)
        result = self._entry(shard, item)
        result["audit_path"] = shard.tiles.inclusion_proof(args.leaf_index, args.tree_size)
        return result

    def shards(self, args: ops.ShardsArgs, ctx: RequestContext) -> dict[str, Any]:
        return {"shards": [self.describe(s) for s in self.log.shards],
                "max_entries_per_shard": self.log.max_entries_per_shard}

    def describe(self, shard: Shard) -> dict[str, Any]:
        return {"shard": shard.number, "log_id": shard.log_id,
                "public_key": shard.public_key_der(), "origin": shard.origin,
                "tree_size": shard.size,
                "state": "frozen" if shard.frozen else "active"}

    # --- ct.subscribe ------------------------------------------------------------------------

    async def subscribe(self, args: ops.SubscribeArgs,
                        ctx: RequestContext) -> AsyncIterator[Event]:
        shard = self.log.shard(args.shard)
        suffixes = normalise_suffixes(args.domains)
        position = shard.size if args.start is None else args.start
        if position > shard.size:
            raise _beyond("start", f"start ({position}) is beyond the tree size {shard.size}")
        feed = self.log.feed
        waiter = feed.waiter()
        heartbeat = args.heartbeat_ms / 1000
        live = False
        sth_sent = -1
        try:
            while True:
                size = shard.size
                if position < size:
                    batch = feed.find(shard.number, position)
                    if batch is None and live:
                        # Following live, the subscriber lagged until the feed dropped the
                        # entries it needs next: too slow. It resumes from storage.
                        yield Event(event="resume", data={
                            "shard": shard.number, "next": position, "reason": "too_slow"})
                        return
                    if batch is not None:
                        items = self._from_feed(batch, position, args.include_leaf)
                    else:
                        items = self._from_tiles(shard, position,
                                                 min(size, position + EVENT_ENTRIES),
                                                 args.include_leaf)
                    items = _limit(items)
                    position += len(items)
                    if suffixes:
                        items = [i for i in items if matches(i["names"], suffixes)]
                    if items:
                        yield Event(event="entries", data={"shard": shard.number,
                                                           "entries": items, "next": position})
                    continue
                live = True
                if sth_sent != size:
                    sth = shard.sth()
                    del sth["checkpoint"], sth["log_id"]
                    sth["next"] = position
                    yield Event(event="sth", data=sth)
                    sth_sent = size
                    continue
                if shard.frozen:
                    yield Event(event="resume", data={"shard": shard.number + 1, "next": 0,
                                                      "reason": "shard_full"})
                    return
                waiter.clear()
                if shard.size > position or shard.frozen:
                    continue
                try:
                    await asyncio.wait_for(waiter.wait(), heartbeat)
                except TimeoutError:
                    yield Event(event="heartbeat", data={
                        "shard": shard.number, "tree_size": shard.size,
                        "time": round(self.clock(), 3), "next": position})
        finally:
            feed.forget(waiter)

    @staticmethod
    def _from_feed(batch: LiveBatch, position: int, include_leaf: bool) -> list[dict[str, Any]]:
        items = batch.entries if include_leaf else batch.slim
        offset = position - batch.start
        return items[offset:offset + EVENT_ENTRIES]

    @staticmethod
    def _from_tiles(shard: Shard, start: int, end: int,
                    include_leaf: bool) -> list[dict[str, Any]]:
        out = []
        for i, (item, record) in enumerate(shard.tiles.entries(start, end)):
            timestamp, entry_type, te_end = tile_leaf_header(item)
            fingerprint, names = record
            entry: dict[str, Any] = {
                "index": start + i, "timestamp": timestamp,
                "entry_type": "x509" if entry_type == 0 else "precert",
                "fingerprint": fingerprint, "names": names}
            if include_leaf:
                entry["leaf_input"] = b"\x00\x00" + item[:te_end]
            out.append(entry)
        return out

    # --- tiles in a bucket: read what a proof needs off the event loop first -------------

    def _read_ahead(self, handler: Callable[[A, RequestContext], dict[str, Any]],
                    plan: Callable[[Shard, A], list[str]]
                    ) -> Callable[[A, RequestContext], Awaitable[dict[str, Any]]]:
        """``handler`` served so that, when the tiles are in a remote store, the tiles
        it will read (``plan``) are fetched on a worker thread before it runs on the
        loop with them at hand. Local tiles are read where they are, as before."""
        async def serve(args: A, ctx: RequestContext) -> dict[str, Any]:
            shard = self.log.shard(args.shard)
            if not shard.tiles.remote:
                return handler(args, ctx)
            try:
                fetched = await shard.tiles.fetch(plan(shard, args))
            except ObjectStoreUnavailable as exc:
                raise Unavailable(f"the CT tiles' object store cannot be reached ({exc})",
                                  retry_after=UNREACHABLE_RETRY_AFTER) from None
            with shard.tiles.reading(fetched):
                return handler(args, ctx)
        return serve

    @staticmethod
    def _consistency_tiles(shard: Shard, args: ops.GetSthConsistencyArgs) -> list[str]:
        if not 0 < args.first < args.second <= shard.size:
            return []  # the handler refuses it, or the proof is empty
        return shard.tiles.paths_for_proof("consistency", args.first, args.second)

    def _inclusion_tiles(self, shard: Shard, args: ops.GetProofByHashArgs) -> list[str]:
        found = self.log.state.leaf_index(args.hash) if len(args.hash) == 32 else None
        if found is None or found[0] != shard.number or \
                not found[1] < args.tree_size <= shard.size:
            return []
        return shard.tiles.paths_for_proof("inclusion", found[1], args.tree_size)

    def _entries_tiles(self, shard: Shard, args: ops.GetEntriesArgs) -> list[str]:
        end = min(args.end + 1, shard.size, args.start + self.max_get_entries)
        return shard.tiles.paths_for_entries(args.start, end) if args.start < end else []

    @staticmethod
    def _entry_and_proof_tiles(shard: Shard, args: ops.GetEntryAndProofArgs) -> list[str]:
        if not args.leaf_index < args.tree_size <= shard.size:
            return []
        return (shard.tiles.paths_for_entries(args.leaf_index, args.leaf_index + 1)
                + shard.tiles.paths_for_proof("inclusion", args.leaf_index, args.tree_size))

    def register(self, router: Router) -> None:
        router.add(ops.ADD_CHAIN, self.add_chain)
        router.add(ops.ADD_PRE_CHAIN, self.add_pre_chain)
        router.add(ops.GET_ROOTS, self.get_roots)
        router.add(ops.GET_STH, self.get_sth)
        router.add(ops.GET_STH_CONSISTENCY,
                   self._read_ahead(self.get_sth_consistency, self._consistency_tiles))
        router.add(ops.GET_PROOF_BY_HASH,
                   self._read_ahead(self.get_proof_by_hash, self._inclusion_tiles))
        router.add(ops.GET_ENTRIES, self._read_ahead(self.get_entries, self._entries_tiles))
        router.add(ops.GET_ENTRY_AND_PROOF,
                   self._read_ahead(self.get_entry_and_proof, self._entry_and_proof_tiles))
        router.add(ops.SHARDS, self.shards)
        router.add(ops.SUBSCRIBE, self.subscribe)
