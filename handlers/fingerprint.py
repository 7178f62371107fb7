"""``fp.*``: real-time fingerprints of every certificate issued or logged.

The SHA-256 of a certificate's DER and of its SubjectPublicKeyInfo are
computed when the CA issues it (:class:`FingerprintService` is one of its
publishers) or the CT log sequences it, and indexed with its names and its
log position. :class:`FingerprintWatchers` holds the ``fp.watch`` streams:
the CT log tells it what it sequenced, the service what the CA issued or
revoked.
``fp.get`` looks them up, ``fp.verify`` recomputes the fingerprint from the
stored DER and checks the certificate's inclusion in the log against the
current signed tree head (``validate_fingerprint_integrity`` of the
reference), and ``fp.watch`` streams an event whenever the certificate of a
watched name or key changes: issued, rotated (a new certificate replaces
another key's for a name), revoked, or logged by someone else.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from protocol import Event, InvalidRequest, NotFound
from protocol import ct_merkle as merkle
from protocol import ct_structs as ct
from protocol.ops import fp as ops
from store import CertificateRecord, FingerprintRecord, StateDatabase

from ._router import RequestContext, Router
from .ca import CertificateIssued, CertificateRevoked
from .ct import CtLog, LiveBatch, Shard

log = logging.getLogger("trustchain.fp")

WATCH_QUEUE = 10_000
"""Changes queued for one ``fp.watch`` stream before it is told to resynchronise."""


def parse_hex256(text: str, field: str) -> bytes:
    value = text.strip().lower().replace(":", "")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise InvalidRequest(f"{field} must be 64 hexadecimal digits (a SHA-256)", field=field)
    return bytes.fromhex(value)


def record_item(rec: FingerprintRecord) -> dict[str, Any]:
    return {"fingerprint": rec.sha256.hex(), "spki_sha256": rec.spki_sha256.hex(),
            "kind": rec.kind, "names": list(rec.names), "serial": rec.serial,
            "shard": rec.shard, "leaf_index": rec.leaf_index,
            "first_seen": round(rec.first_seen, 3)}


@dataclass(eq=False)
class _Watcher:
    names: set[str]
    keys: set[bytes]
    queue: asyncio.Queue[dict[str, Any]] = field(
        default_factory=lambda: asyncio.Queue(WATCH_QUEUE))
    overflowed: bool = False


class FingerprintWatchers:
    """The ``fp.watch`` streams, and the changes each one is waiting for."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._watchers: set[_Watcher] = set()

    def sequenced(self, shard: Shard, batch: LiveBatch) -> None:
        """The CT log sequenced ``batch`` (it indexed the entries itself): tell the
        watchers of their names."""
        if not self._watchers:
            return
        for item in batch.slim:
            names = set(item["names"])
            if any(w.names & names for w in self._watchers):
                rec = FingerprintRecord(sha256=item["fingerprint"], spki_sha256=b"",
                                        kind=item["entry_type"], shard=shard.number,
                                        leaf_index=item["index"], serial=None,
                                        first_seen=item["timestamp"] / 1000,
                                        names=tuple(item["names"]))
                self.publish(rec, "logged")

    def watched(self, names: tuple[str, ...], spki_sha256: bytes) -> bool:
        """Whether a watcher waits for one of ``names`` or for the key ``spki_sha256``
        (so a change nobody watches costs nothing to describe)."""
        return any(spki_sha256 in w.keys or not w.names.isdisjoint(names)
                   for w in self._watchers)

    def publish(self, rec: FingerprintRecord, kind: str, **extra: Any) -> None:
        """Queue a change of ``kind`` for every watcher of one of ``rec``'s names or key."""
        if not self._watchers:
            return
        change = {"change": kind, **record_item(rec), "time": round(self.clock(), 3), **extra}
        for watcher in list(self._watchers):
            matched = sorted(watcher.names.intersection(rec.names))
            if rec.spki_sha256 in watcher.keys:
                matched.append(rec.spki_sha256.hex())
            if not matched:
                continue
            try:
                watcher.queue.put_nowait({**change, "matched": matched})
            except asyncio.QueueFull:
                watcher.overflowed = True

    async def watch(self, args: ops.WatchArgs, ctx: RequestContext) -> AsyncIterator[Event]:
        names = {n.strip().lower().rstrip(".") for n in args.names if n.strip()}
        keys = {parse_hex256(k, "spki_sha256") for k in args.spki_sha256}
        if not names and not keys:
            raise InvalidRequest("fp.watch: give at least one name or spki_sha256",
                                 field="names")
        watcher = _Watcher(names=names, keys=keys)
        self._watchers.add(watcher)
        heartbeat = args.heartbeat_ms / 1000
        try:
            yield Event(event="watching", data={"names": sorted(names),
                                                "spki_sha256": sorted(k.hex() for k in keys)})
            while True:
                if watcher.overflowed and watcher.queue.empty():
                    yield Event(event="resync", data={"reason": "too_slow"})
                    return
                try:
                    change = await asyncio.wait_for(watcher.queue.get(), heartbeat)
                except TimeoutError:
                    yield Event(event="heartbeat", data={"time": round(self.clock(), 3)})
                    continue
                yield Event(event="change", data=change)
        finally:
            self._watchers.discard(watcher)


class FingerprintService:
    """Answers ``fp.get`` and ``fp.verify`` from the replicated fingerprint index; tells
    the ``fp.watch`` streams of issuances and revocations (a publisher of the CA).

    :param state: the replicated state (the index, and the DER of issued certificates).
    :param issuer_der: the DER of the intermediate with this SHA-256 (hex), or None.
    :param log_key: a CT log ID -> (shard, public key) of the log of a validator of the
        cluster (every validator's log holds the same entries), or None.
    :param watchers: the ``fp.watch`` streams told of issuances and revocations.
    """

    def __init__(self, *, state: StateDatabase, log: CtLog,
                 issuer_der: Callable[[str], bytes | None],
                 log_key: Callable[[bytes], tuple[int, Any] | None],
                 watchers: FingerprintWatchers,
                 clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.log = log
        self.issuer_der = issuer_der
        self.log_key = log_key
        self.watchers = watchers
        self.clock = clock

    # --- a publisher of the CA ---------------------------------------------------------

    def certificate_issued(self, event: CertificateIssued) -> None:
        """A certificate was committed (the state indexed it): tell its watchers."""
        record = event.record
        spki = bytes.fromhex(record.spki_sha256)
        if not self.watchers.watched(record.names, spki):
            return
        logged = event.logged
        rec = FingerprintRecord(sha256=bytes.fromhex(record.fingerprint), spki_sha256=spki,
                                kind="issued", shard=logged.shard if logged else None,
                                leaf_index=logged.leaf_index if logged else None,
                                serial=record.serial, first_seen=record.issued_at,
                                names=record.names)
        previous = self.state.other_key_holder(record.names, record.spki_sha256,
                                               self.clock())
        self.watchers.publish(rec, "rotated" if previous else "issued", previous=previous)

    def certificate_revoked(self, event: CertificateRevoked) -> None:
        record = event.record
        rec = FingerprintRecord(sha256=bytes.fromhex(record.fingerprint),
                                spki_sha256=bytes.fromhex(record.spki_sha256), kind="issued",
                                shard=None, leaf_index=None, serial=record.serial,
                                first_seen=record.issued_at, names=record.names)
        self.watchers.publish(rec, "revoked", reason=record.revocation_reason)

    def registration_changed(self, name: str) -> None:
        """Registrations are the DNS service's business."""

    # --- fp.get -------------------------------------------------------------------------------

    def _lookup(self, sha: bytes) -> FingerprintRecord | None:
        return self.state.fingerprint(sha)

    def get(self, args: ops.GetArgs, ctx: RequestContext) -> dict[str, Any]:
        given = [k for k in ("fingerprint", "spki_sha256", "name") if getattr(args, k)]
        if len(given) != 1:
            raise InvalidRequest("give exactly one of fingerprint, spki_sha256 or name",
                                 field=given[1] if len(given) > 1 else "fingerprint")
        if args.fingerprint:
            rec = self._lookup(parse_hex256(args.fingerprint, "fingerprint"))
            records = [rec] if rec else []
        elif args.spki_sha256:
            key = parse_hex256(args.spki_sha256, "spki_sha256")
            records = self.state.fingerprints_by_spki(key)
        else:
            name = (args.name or "").strip().lower()
            records = self.state.fingerprints_by_name(name)
        unique = {r.sha256: r for r in records}
        if not unique:
            raise NotFound(f"no certificate with {given[0]} "
                           f"{getattr(args, given[0])}", field=given[0])
        return {"certificates": [record_item(r) for r in unique.values()]}

    # --- fp.verify ------------------------------------------------------------------------------

    def verify(self, args: ops.VerifyArgs, ctx: RequestContext) -> dict[str, Any]:
        """Recompute the fingerprint from the stored DER and prove the log inclusion."""
        sha = parse_hex256(args.fingerprint, "fingerprint")
        rec = self._lookup(sha)
        if rec is None:
            raise NotFound(f"no certificate with fingerprint {sha.hex()}", field="fingerprint")
        result: dict[str, Any] = {"fingerprint": sha.hex(), "kind": rec.kind}
        problems: list[str] = []
        leaf: bytes | None = None
        shard: Shard | None = None
        index: int | None = None
        if rec.kind == "issued":
            stored = self.state.by_fingerprint(sha.hex())
            der = stored.der if stored else b""
            result["der_matches"] = hashlib.sha256(der).digest() == sha
            sct_valid = False
            if stored is not None:
                leaf, shard, index, sct_valid = self._embedded(stored, problems)
            result["sct_valid"] = sct_valid
        else:
            if rec.shard is None or rec.leaf_index is None:
                raise NotFound("the record has no log position", field="fingerprint")
            shard = self.log.shard(rec.shard)
            index = rec.leaf_index
            ((item, _),) = shard.tiles.entries(index, index + 1)
            tile_leaf = ct.TileLeaf.parse(item)
            der = (tile_leaf.entry.certificate if tile_leaf.entry.entry_type == ct.X509_ENTRY
                   else tile_leaf.pre_certificate)
            result["der_matches"] = hashlib.sha256(der).digest() == sha
            leaf = merkle.leaf_hash(tile_leaf.entry.merkle_tree_leaf())
        if not result["der_matches"]:
            problems.append("the stored certificate does not hash to the fingerprint")
        included = False
        if leaf is not None and shard is not None and index is not None:
            checkpoint = shard.checkpoint
            result.update(shard=shard.number, leaf_index=index, tree_size=checkpoint.size,
                          sha256_root_hash=checkpoint.root, leaf_hash=leaf)
            try:
                ct.verify_tree_head(shard.signer.public_key(), checkpoint.timestamp,
                                    checkpoint.size, checkpoint.root, checkpoint.signature)
                proof = shard.tiles.inclusion_proof(index, checkpoint.size)
                result["audit_path"] = proof
                merkle.verify_inclusion(index, checkpoint.size, leaf, proof, checkpoint.root)
                included = True
            except (merkle.ProofError, ct.SignatureError, ValueError) as exc:
                problems.append(f"log inclusion: {exc}")
        elif not problems:
            problems.append("no log position")
        result["included"] = included
        result["valid"] = not problems
        result["problems"] = problems
        return result

    def _embedded(self, stored: CertificateRecord,
                  problems: list[str]) -> tuple[bytes | None, Shard | None, int | None, bool]:
        cert = x509.load_der_x509_certificate(stored.der)
        issuer_der = self.issuer_der(stored.issuer)
        try:
            scts = ct.embedded_scts(cert)
        except ct.StructureError as exc:
            problems.append(f"embedded SCT list: {exc}")
            return None, None, None, False
        if not scts:
            problems.append("the certificate carries no SCT")
            return None, None, None, False
        if issuer_der is None:
            problems.append(f"the issuing intermediate {stored.issuer} is unknown")
            return None, None, None, False
        issuer = x509.load_der_x509_certificate(issuer_der)
        for sct in scts:
            # this validator's log, or another validator's: every log holds the same tree
            found = self.log_key(sct.log_id)
            if found is None:
                continue
            number, key = found
            try:
                shard = self.log.shard(number)
                entry = ct.verify_embedded_sct(cert, issuer, sct, key)
            except ct.SignatureError as exc:
                problems.append(str(exc))
                return None, None, None, False
            except NotFound:
                continue
            return merkle.leaf_hash(entry.merkle_tree_leaf()), shard, sct.leaf_index, True
        problems.append("no SCT from a log of this cluster")
        return None, None, None, False

    def register(self, router: Router) -> None:
        router.add(ops.GET, self.get)
        router.add(ops.VERIFY, self.verify)
        router.add(ops.WATCH, self.watchers.watch)
