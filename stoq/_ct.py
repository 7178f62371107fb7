"""Client side of the CT log: a resuming, verifying subscription and proof checks.

::

    async def connect() -> stoq.AsyncClient:
        return await stoq.connect("::1", 8443, cafile="root.pem")

    async for entry in stoq.follow_log(connect, start=0):
        print(entry.index, entry.names)

:func:`follow_log` reconnects and resumes by itself (after a ``resume``
event, the end of the stream or a lost connection), so no entry is skipped
or repeated. It verifies every ``sth`` event's signature with the shard's
key, the consistency of each tree head with the previous one, and, when it
sees every leaf from index 0, recomputes the tree itself and compares the
root. :func:`prove_certificate` checks a certificate's embedded SCT and its
inclusion in the log against a verified tree head.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocol import ErrorCode, TrustChainError
from protocol import ct_merkle as merkle
from protocol import ct_structs as ct

from ._client import AsyncClient, ConnectionFailed, SubscriptionOverflow

log = logging.getLogger("stoq.ct")


class LogVerificationError(TrustChainError):
    """The log's answer does not verify: a bad signature, proof or root."""

    code = ErrorCode.INTERNAL


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One entry of a ``ct.subscribe`` stream."""

    shard: int
    index: int
    timestamp: int
    entry_type: str
    fingerprint: bytes
    names: tuple[str, ...]
    leaf_input: bytes | None


@dataclass
class ShardKeys:
    """The shards' public keys, from ``ct.shards``."""

    keys: dict[int, Any] = field(default_factory=dict)
    by_log_id: dict[bytes, tuple[int, Any]] = field(default_factory=dict)

    @classmethod
    async def fetch(cls, client: AsyncClient) -> ShardKeys:
        result = await client.request("ct.shards")
        out = cls()
        for item in result["shards"]:
            key = serialization.load_der_public_key(item["public_key"])
            if ct.log_id_of(key) != item["log_id"]:
                raise LogVerificationError(f"shard {item['shard']}: its log_id is not the "
                                           "SHA-256 of its key")
            out.keys[item["shard"]] = key
            out.by_log_id[item["log_id"]] = (item["shard"], key)
        return out


def verify_sth(sth: dict[str, Any], key: Any) -> None:
    """Check an ``sth`` (``ct.get-sth`` result or ``sth`` event) with the shard's key.

    :raises LogVerificationError: the signature does not verify.
    """
    try:
        ct.verify_tree_head(key, sth["timestamp"], sth["tree_size"], sth["sha256_root_hash"],
                            sth["tree_head_signature"])
    except (ct.SignatureError, ct.StructureError) as exc:
        raise LogVerificationError(f"tree head of size {sth['tree_size']}: {exc}") from None


async def verify_consistency(client: AsyncClient, shard: int, old: dict[str, Any],
                             new: dict[str, Any]) -> None:
    """Ask for and check the consistency proof between two verified tree heads."""
    first, second = old["tree_size"], new["tree_size"]
    if first == 0 or first == second:
        if first == second and old["sha256_root_hash"] != new["sha256_root_hash"]:
            raise LogVerificationError(f"two tree heads of size {first} with different roots")
        return
    result = await client.request("ct.get-sth-consistency", {"first": first, "second": second,
                                                             "shard": shard})
    try:
        merkle.verify_consistency(first, second, old["sha256_root_hash"],
                                  new["sha256_root_hash"], result["consistency"])
    except merkle.ProofError as exc:
        raise LogVerificationError(f"tree {second} is not consistent with tree {first}: "
                                   f"{exc}") from None


class LogFollower:
    """An async iterator over log entries that resumes by itself. See :func:`follow_log`."""

    def __init__(self, connect: Callable[[], Awaitable[AsyncClient]], *,
                 shard: int | None = None, start: int | None = None,
                 domains: Sequence[str] = (), include_leaf: bool = True, verify: bool = True,
                 retry_delay: float = 0.5, max_reconnects: int | None = None,
                 heartbeat_ms: int = 5000, max_buffered: int | None = 10_000) -> None:
        self._connect = connect
        self.shard = shard
        self.next = start
        self.domains = list(domains)
        self.include_leaf = include_leaf
        self.verify = verify
        self.retry_delay = retry_delay
        self.max_reconnects = max_reconnects
        self.heartbeat_ms = heartbeat_ms
        self.max_buffered = max_buffered
        self.sth: dict[str, Any] | None = None
        """The last verified tree head."""
        self.resumes = 0
        """Times the server told this follower to resume (it fell behind the live feed)."""
        self.overflows = 0
        """Times this follower dropped its subscription because its reader was slow."""
        self.reconnects = 0
        self.verified = 0
        """Tree heads verified so far (signature, consistency, and root if tracked)."""
        self.roots_recomputed = 0
        """Of those, how many roots this follower recomputed from the leaves it received."""
        self._client: AsyncClient | None = None
        self._keys: ShardKeys | None = None
        self._compact: merkle.CompactRange | None = None

    def _start_shard(self, shard: int, start: int) -> None:
        self.shard, self.next, self.sth = shard, start, None
        # Only a follower that sees every leaf from 0 can recompute the roots.
        tracking = start == 0 and not self.domains and self.include_leaf and self.verify
        self._compact = merkle.CompactRange() if tracking else None

    async def _ensure_client(self) -> AsyncClient:
        if self._client is None or not self._client.is_connected:
            self._client = await self._connect()
            if self.verify:
                self._keys = await ShardKeys.fetch(self._client)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aiter__(self) -> AsyncIterator[LogEntry]:
        failures = 0
        if self.next == 0 and self.shard is not None:
            self._start_shard(self.shard, 0)
        try:
            while True:
                try:
                    client = await self._ensure_client()
                    if self.shard is None:
                        sth = await client.request("ct.get-sth")
                        self._start_shard(sth["shard"], sth["tree_size"] if self.next is None
                                          else self.next)
                    elif self.next is None:
                        sth = await client.request("ct.get-sth", {"shard": self.shard})
                        self._start_shard(self.shard, sth["tree_size"])
                    elif self._compact is None and self.next == 0:
                        self._start_shard(self.shard, 0)
                    async for entry in self._stream(client):
                        failures = 0
                        yield entry
                except SubscriptionOverflow:
                    self.overflows += 1  # we read too slowly: subscribe again from self.next
                    continue
                except (ConnectionFailed, TimeoutError) as exc:
                    failures += 1
                    if self.max_reconnects is not None and failures > self.max_reconnects:
                        raise
                    log.info("CT subscription lost (%s); reconnecting", exc)
                    if self._client is not None:
                        await self._client.close()
                    self._client = None
                    self.reconnects += 1
                    await asyncio.sleep(self.retry_delay)
        finally:
            await self.close()

    async def _stream(self, client: AsyncClient) -> AsyncIterator[LogEntry]:
        assert self.shard is not None and self.next is not None
        args = {"shard": self.shard, "start": self.next, "domains": self.domains,
                "include_leaf": self.include_leaf, "heartbeat_ms": self.heartbeat_ms}
        async for event in client.subscribe("ct.subscribe", args,
                                            max_buffered=self.max_buffered):
            data = event.data
            if event.event == "entries":
                for item in data["entries"]:
                    if item["index"] < self.next:
                        raise LogVerificationError(f"entry {item['index']} delivered twice")
                    if self._compact is not None:
                        if item["index"] != self._compact.size:
                            raise LogVerificationError(
                                f"entry {item['index']} arrived, {self._compact.size} expected")
                        self._compact.append(merkle.leaf_hash(item["leaf_input"]))
                    self.next = item["index"] + 1
                    yield LogEntry(shard=data["shard"], index=item["index"],
                                   timestamp=item["timestamp"], entry_type=item["entry_type"],
                                   fingerprint=item["fingerprint"], names=tuple(item["names"]),
                                   leaf_input=item.get("leaf_input"))
                self.next = data["next"]
            elif event.event == "sth":
                if self.verify:
                    await self._check_sth(client, data)
                self.next = data["next"]
            elif event.event == "heartbeat":
                self.next = data["next"]
            elif event.event == "resume":
                self.resumes += 1
                if data["shard"] != self.shard:
                    self._start_shard(data["shard"], data["next"])
                    if self.verify and data["shard"] not in (self._keys or ShardKeys()).keys:
                        self._keys = await ShardKeys.fetch(client)
                else:
                    self.next = data["next"]
                return
        # The server ended the stream (shutdown): reconnect and resume.
        raise ConnectionFailed("the subscription ended; resuming")

    async def _check_sth(self, client: AsyncClient, sth: dict[str, Any]) -> None:
        assert self._keys is not None and self.shard is not None
        key = self._keys.keys.get(self.shard)
        if key is None:
            raise LogVerificationError(f"no key for shard {self.shard}")
        verify_sth(sth, key)
        if self._compact is not None and self._compact.size == sth["tree_size"]:
            if self._compact.root() != sth["sha256_root_hash"]:
                raise LogVerificationError(f"the entries received do not give the signed "
                                           f"root of tree {sth['tree_size']}")
            self.roots_recomputed += 1
        if self.sth is not None:
            await verify_consistency(client, self.shard, self.sth, sth)
        self.sth = sth
        self.verified += 1


def follow_log(connect: Callable[[], Awaitable[AsyncClient]], **kwargs: Any) -> LogFollower:
    """Follow the log from ``start`` (None: from now), resuming after every interruption.

    :param connect: makes a new connection (called again after a failure).
    :param shard: which shard (None: the active one); a full shard is followed by the next.
    :param domains: only entries with a name equal to or under one of these suffixes.
    :param include_leaf: receive each entry's ``leaf_input``.
    :param verify: verify tree heads (signature, consistency, and roots when following
        every leaf from 0); a failure raises :class:`LogVerificationError`.
    :param max_buffered: events held for a slow reader before the subscription is
        dropped and made again from the reader's position (nothing is lost).
    """
    return LogFollower(connect, **kwargs)


@dataclass(frozen=True, slots=True)
class CertificateProof:
    shard: int
    leaf_index: int
    tree_size: int
    root: bytes
    leaf_hash: bytes
    audit_path: list[bytes]
    sct_timestamp: int | None


async def prove_certificate(client: AsyncClient, cert: x509.Certificate,
                            issuer: x509.Certificate | None = None) -> CertificateProof:
    """Check that ``cert`` is in the log, against a freshly verified tree head.

    A certificate with an embedded SCT (every certificate the TrustChain CA
    issues) is checked through it: SCT signature, leaf hash, inclusion proof by
    hash. Others are found by fingerprint (``fp.get``) and checked entry by index.

    :raises LogVerificationError: a signature or proof does not verify.
    """
    keys = await ShardKeys.fetch(client)
    scts = ct.embedded_scts(cert)
    if scts:
        if issuer is None:
            raise ValueError("checking an embedded SCT needs the issuer certificate")
        for sct in scts:
            found = keys.by_log_id.get(sct.log_id)
            if found is None:
                continue
            shard, key = found
            try:
                entry = ct.verify_embedded_sct(cert, issuer, sct, key)
            except ct.SignatureError as exc:
                raise LogVerificationError(str(exc)) from None
            leaf = merkle.leaf_hash(entry.merkle_tree_leaf())
            sth = await client.request("ct.get-sth", {"shard": shard})
            verify_sth(sth, key)
            proof = await client.request("ct.get-proof-by-hash", {
                "hash": leaf, "tree_size": sth["tree_size"], "shard": shard})
            if proof["leaf_index"] != sct.leaf_index:
                raise LogVerificationError(f"the entry is at {proof['leaf_index']}, the SCT "
                                           f"says {sct.leaf_index}")
            return _checked(shard, sct.leaf_index, sth, leaf, proof["audit_path"],
                            sct.timestamp)
        raise LogVerificationError("none of the certificate's SCTs is from this log")
    der = cert.public_bytes(serialization.Encoding.DER)
    found_fp = await client.request("fp.get", {"fingerprint": hashlib.sha256(der).hexdigest()})
    for rec in found_fp["certificates"]:
        if rec["shard"] is None or rec["kind"] != "x509":
            continue
        shard, index = rec["shard"], rec["leaf_index"]
        sth = await client.request("ct.get-sth", {"shard": shard})
        verify_sth(sth, keys.keys[shard])
        got = await client.request("ct.get-entry-and-proof", {
            "leaf_index": index, "tree_size": sth["tree_size"], "shard": shard})
        entry = ct.parse_merkle_tree_leaf(got["leaf_input"])
        if entry.certificate != der:
            raise LogVerificationError(f"entry {index} is another certificate")
        return _checked(shard, index, sth, merkle.leaf_hash(got["leaf_input"]),
                        got["audit_path"], entry.timestamp)
    raise LogVerificationError("the certificate has no SCT and no x509 entry in the log")


def _checked(shard: int, index: int, sth: dict[str, Any], leaf: bytes, path: list[bytes],
             timestamp: int | None) -> CertificateProof:
    try:
        merkle.verify_inclusion(index, sth["tree_size"], leaf, path, sth["sha256_root_hash"])
    except merkle.ProofError as exc:
        raise LogVerificationError(f"inclusion proof: {exc}") from None
    return CertificateProof(shard=shard, leaf_index=index, tree_size=sth["tree_size"],
                            root=sth["sha256_root_hash"], leaf_hash=leaf, audit_path=path,
                            sct_timestamp=timestamp)
