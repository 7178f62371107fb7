"""``ct.*``: the Certificate Transparency log (RFC 6962 §4 over STOQ) and its live feed.

Field names are RFC 6962's; byte strings travel as CBOR byte strings instead
of base64. Every log op takes an optional ``shard`` (default: the active
shard; see ``ct.shards``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .._schema import OpSpec, arg, register

MAX_GET_ENTRIES = 1000
"""Most entries one ``ct.get-entries`` may ask for."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AddChainArgs:
    chain: list[bytes] = arg(max_length=10, doc="DER certificates: the end entity first, "
                                                "then each issuer, up to an accepted root")


@dataclass(frozen=True, slots=True, kw_only=True)
class GetRootsArgs:
    """No arguments."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GetSthArgs:
    shard: int | None = arg(None, minimum=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class GetSthConsistencyArgs:
    first: int = arg(minimum=0, doc="the older tree size")
    second: int = arg(minimum=0, doc="the newer tree size")
    shard: int | None = arg(None, minimum=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class GetProofByHashArgs:
    hash: bytes = arg(max_length=32, doc="the leaf hash, SHA-256(0x00 || MerkleTreeLeaf)")
    tree_size: int = arg(minimum=1)
    shard: int | None = arg(None, minimum=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class GetEntriesArgs:
    start: int = arg(minimum=0)
    end: int = arg(minimum=0, doc="inclusive, as in RFC 6962")
    shard: int | None = arg(None, minimum=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class GetEntryAndProofArgs:
    leaf_index: int = arg(minimum=0)
    tree_size: int = arg(minimum=1)
    shard: int | None = arg(None, minimum=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardsArgs:
    """No arguments."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscribeArgs:
    start: int | None = arg(None, minimum=0, doc="first index; null: the current tree size")
    shard: int | None = arg(None, minimum=0)
    domains: list[str] = arg([], max_length=100,
                             doc="only entries with a name equal to or under one of these")
    include_leaf: bool = arg(True, doc="include each entry's leaf_input")
    heartbeat_ms: int = arg(5000, minimum=100, maximum=60_000)


ADD_CHAIN = register(OpSpec(name="ct.add-chain", args=AddChainArgs,
                            summary="log a certificate chain; returns its SCT"))
ADD_PRE_CHAIN = register(OpSpec(name="ct.add-pre-chain", args=AddChainArgs,
                                summary="log a precertificate chain; returns its SCT"))
GET_ROOTS = register(OpSpec(name="ct.get-roots", args=GetRootsArgs,
                            summary="the roots the log accepts"))
GET_STH = register(OpSpec(name="ct.get-sth", args=GetSthArgs,
                          summary="the latest signed tree head and checkpoint"))
GET_STH_CONSISTENCY = register(OpSpec(name="ct.get-sth-consistency", args=GetSthConsistencyArgs,
                                      summary="consistency proof between two tree sizes"))
GET_PROOF_BY_HASH = register(OpSpec(name="ct.get-proof-by-hash", args=GetProofByHashArgs,
                                    summary="inclusion proof of a leaf hash"))
GET_ENTRIES = register(OpSpec(name="ct.get-entries", args=GetEntriesArgs,
                              summary="entries by index range"))
GET_ENTRY_AND_PROOF = register(OpSpec(name="ct.get-entry-and-proof", args=GetEntryAndProofArgs,
                                      summary="one entry and its inclusion proof"))
SHARDS = register(OpSpec(name="ct.shards", args=ShardsArgs,
                         summary="the log's shards, their keys and sizes"))
SUBSCRIBE = register(OpSpec(name="ct.subscribe", args=SubscribeArgs, streaming=True,
                            summary="backfill then follow the log's entries live"))
