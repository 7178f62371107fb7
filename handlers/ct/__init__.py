"""The Certificate Transparency log: chains, block-driven appends, tiles, proofs, subscriptions."""

from ._log import (
    UNREACHABLE_RETRY_AFTER,
    CtBatch,
    CtLog,
    Entry,
    LiveBatch,
    LiveFeed,
    Logged,
    Shard,
    Submitted,
    chain_entry_hash,
    entry_hash,
)
from ._submitted import ChainValidator, CheckedChain, leaf_names
from .service import CtService

__all__ = [
    "UNREACHABLE_RETRY_AFTER",
    "ChainValidator",
    "CheckedChain",
    "CtBatch",
    "CtLog",
    "CtService",
    "Entry",
    "LiveBatch",
    "LiveFeed",
    "Logged",
    "Shard",
    "Submitted",
    "chain_entry_hash",
    "entry_hash",
    "leaf_names",
]
