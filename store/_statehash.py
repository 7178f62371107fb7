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
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import cbor2

BITS = 4096
_MASK = (1 << BITS) - 1
_BYTES = BITS // 8
CONTEXT = b"trustchain-state-v1"


def row_digest(row: tuple[Any, ...] | list[Any]) -> int:
    """The 4096-bit hash of one row (a table name, then its columns)."""
    return int.from_bytes(hashlib.shake_128(cbor2.dumps(list(row), canonical=True)
                                            ).digest(_BYTES), "big")


class MultisetHash:
    """The running AdHash of a multiset of rows."""

    __slots__ = ("value",)

    def __init__(self, value: int = 0) -> None:
        self.value = value & _MASK

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
        self.value = (self.value + row_digest(row)) & _MASK

    def remove(self, row: tuple[Any, ...] | list[Any]) -> None:
        self.value = (self.value - row_digest(row)) & _MASK

    def copy(self) -> MultisetHash:
        return MultisetHash(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MultisetHash) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


def state_hash(height: int, rows: MultisetHash) -> bytes:
    """The 32-byte state commitment a block carries: the rows' hash after ``height``."""
    return hashlib.sha256(CONTEXT + height.to_bytes(8, "big") + rows.to_bytes()).digest()
