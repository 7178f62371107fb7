"""An incremental, order-independent hash of a set of rows: the replicated state's digest.

The state after a block is a set of rows (certificates, names, stake, CT
roots...). Its digest must change with any row, be the same whatever order
the rows came in, and be cheap to update when a block adds, changes or
removes a few rows, yet also recomputable from the rows alone (to check
stored state at start). A multiset hash does all of that: AdHash
(Bellare and Micciancio, "A new paradigm for collision-free hashing", 1997),
the sum of the rows' hashes modulo 2^4096, each row hashed with SHAKE-128 to
512 bytes. Adding a row adds its hash, removing it subtracts it. Finding two
sets with the same sum is the weighted knapsack problem the paper reduces
it to; the best known attack on a 2^k modulus (Wagner's generalised birthday)
costs about 2^(2 sqrt(k)), 2^128 here.

Rows are canonical CBOR arrays of integers, text, bytes and null (no floats),
whose first item names their table, so a row of one table never equals a row
of another.

A row of some tables is often removed soon after it was added (a pending
certificate when its signed certificate arrives one block later, a CT shard's
size and root every block): the digests of the last such rows added are kept
(:data:`RECENT_ROWS`, :data:`REPLACED_TABLES`), so such a row is hashed once.
The rows of the other tables (names, used work, CT entries and leaves,
fingerprints) stay for epochs or for good: keeping theirs would only push the
others out. The sum is reduced modulo 2^4096 when it is read, not at every
row.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, TypeGuard

import cbor2

BITS = 4096
_MASK = (1 << BITS) - 1
_BYTES = BITS // 8
CONTEXT = b"trustchain-state-v1"
RECENT_ROWS = 4096
"""How many digests of the rows added last are kept (some MB at most)."""
REPLACED_TABLES = frozenset(("certificates", "ct_shards", "stake", "registrations",
                             "validator_keys"))
"""The tables whose rows are replaced by a later block (a certificate signed or
revoked, a shard grown, a balance or registration changed): only their digests are
kept."""
_PLAIN = frozenset((str, bytes, int, type(None)))
"""The column types whose equality in Python is their equality in CBOR (not so for
``True == 1`` or ``1.0 == 1``): only rows of these are kept."""
_recent: OrderedDict[tuple[Any, ...], int] = OrderedDict()
"""row -> its digest, for the rows added last (oldest first). An ``OrderedDict``: a
plain dict whose oldest key is dropped at every addition finds it by skipping the
slots of the keys dropped before (about 5 µs a row at 4,096 rows, once full)."""


def row_digest(row: tuple[Any, ...] | list[Any]) -> int:
    """The 4096-bit hash of one row (a table name, then its columns)."""
    return int.from_bytes(hashlib.shake_128(cbor2.dumps(row, canonical=True)
                                            ).digest(_BYTES), "big")


def _keepable(row: tuple[Any, ...] | list[Any]) -> TypeGuard[tuple[Any, ...]]:
    return (type(row) is tuple and row[0] in REPLACED_TABLES
            and all(type(v) in _PLAIN for v in row))


def _added_digest(row: tuple[Any, ...] | list[Any]) -> int:
    """:func:`row_digest` of a row being added, kept for its removal if its table's rows
    are replaced soon."""
    if not _keepable(row):
        return row_digest(row)
    digest = _recent.get(row)
    if digest is None:
        digest = _recent[row] = row_digest(row)
        if len(_recent) > RECENT_ROWS:
            _recent.popitem(last=False)
    return digest


def _removed_digest(row: tuple[Any, ...] | list[Any]) -> int:
    """:func:`row_digest` of a row being removed: kept if it was added lately."""
    digest = _recent.get(row) if _keepable(row) else None
    return row_digest(row) if digest is None else digest


class MultisetHash:
    """The running AdHash of a multiset of rows."""

    __slots__ = ("_sum",)

    def __init__(self, value: int = 0) -> None:
        self._sum = value & _MASK

    @property
    def value(self) -> int:
        """The sum of the rows' digests modulo 2^4096."""
        return self._sum & _MASK

    @classmethod
    def of(cls, rows: Iterable[tuple[Any, ...] | list[Any]]) -> MultisetHash:
        """The hash of ``rows``, computed from scratch."""
        total = 0
        for row in rows:
            total += row_digest(row)
        return cls(total)

    @classmethod
    def from_bytes(cls, data: bytes) -> MultisetHash:
        if len(data) != _BYTES:
            raise ValueError(f"a multiset hash is {_BYTES} bytes, not {len(data)}")
        return cls(int.from_bytes(data, "big"))

    def to_bytes(self) -> bytes:
        return self.value.to_bytes(_BYTES, "big")

    def add(self, row: tuple[Any, ...] | list[Any]) -> None:
        self._sum += _added_digest(row)

    def remove(self, row: tuple[Any, ...] | list[Any]) -> None:
        self._sum -= _removed_digest(row)

    def copy(self) -> MultisetHash:
        return MultisetHash(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MultisetHash) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


def state_hash(height: int, rows: MultisetHash) -> bytes:
    """The 32-byte state commitment a block carries: the rows' hash after ``height``."""
    return hashlib.sha256(CONTEXT + height.to_bytes(8, "big") + rows.to_bytes()).digest()
