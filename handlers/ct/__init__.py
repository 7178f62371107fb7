"""The Certificate Transparency log: chains, sequencing, tiles, proofs, subscriptions."""

from ._log import CtLog, LiveBatch, LiveFeed, Shard, Submitted, entry_hash
from ._submitted import ChainValidator, CheckedChain, leaf_names
from .service import CtService

__all__ = [
    "ChainValidator",
    "CheckedChain",
    "CtLog",
    "CtService",
    "LiveBatch",
    "LiveFeed",
    "Shard",
    "Submitted",
    "entry_hash",
    "leaf_names",
]
