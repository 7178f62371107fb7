"""The multiset hash of the replicated rows: kept digests change no hash."""

from __future__ import annotations

import hashlib
from typing import Any

from store import MultisetHash
from store import _statehash as statehash
from store._statehash import RECENT_ROWS, row_digest


def pending_row(serial: str) -> tuple[Any, ...]:
    """A certificate row as big as a pending one (its precertificate's DER)."""
    return ("certificates", serial, "ab" * 32, "v", "cd" * 32, 1700000000, 1700086400,
            1700000000123, "client", hashlib.sha256(serial.encode()).digest() * 40, None,
            None, None, None, 0, 7, 3, 0)


def test_removing_a_kept_row_is_removing_it_fresh() -> None:
    row = pending_row("01")
    kept = MultisetHash()
    kept.add(row)
    assert row in statehash._recent  # added lately: its digest is kept
    kept.add(("names", "a.trust", "01", 0))
    kept.remove(row)
    fresh = MultisetHash((row_digest(row) + row_digest(("names", "a.trust", "01", 0))
                          - row_digest(row)) % 2**4096)
    assert kept == fresh
    assert kept == MultisetHash.of([("names", "a.trust", "01", 0)])
    assert kept.to_bytes() == fresh.to_bytes()


def test_a_row_removed_long_after_it_was_added_is_hashed_again() -> None:
    first = pending_row("02")
    rows = MultisetHash()
    rows.add(first)
    for i in range(RECENT_ROWS):
        rows.add(("used_work", i.to_bytes(32, "big"), 5))
    assert first not in statehash._recent and len(statehash._recent) <= RECENT_ROWS
    rows.remove(first)
    assert rows == MultisetHash.of(("used_work", i.to_bytes(32, "big"), 5)
                                   for i in range(RECENT_ROWS))


def test_rows_equal_in_python_but_not_in_cbor_are_not_confused() -> None:
    """``1 == True == 1.0`` in Python; their CBOR differs, and so must the digest used."""
    rows = MultisetHash()
    rows.add(("isolated", "v", 1, "r"))
    rows.remove(("isolated", "v", True, "r"))
    rows.remove(("isolated", "v", 1.0, "r"))
    expected = (row_digest(("isolated", "v", 1, "r")) - row_digest(("isolated", "v", True, "r"))
                - row_digest(("isolated", "v", 1.0, "r"))) % 2**4096
    assert rows.value == expected
    assert rows != MultisetHash(row_digest(("isolated", "v", 1, "r")) - row_digest(
        ("isolated", "v", 1, "r")) * 2)


def test_the_sum_is_taken_modulo_2_4096_whenever_it_is_read() -> None:
    rows = MultisetHash()
    digests = []
    for i in range(40):  # far past 2^4096 before any reduction
        row = ("stake", f"{i:064x}", i)
        rows.add(row)
        digests.append(row_digest(row))
    total = sum(digests) % 2**4096
    assert rows.value == total and rows.to_bytes() == total.to_bytes(512, "big")
    assert rows == MultisetHash.from_bytes(total.to_bytes(512, "big"))
    assert hash(rows) == hash(MultisetHash(total)) and rows.copy() == rows
    for i in range(40):
        rows.remove(("stake", f"{i:064x}", i))
    assert rows.value == 0 and rows.to_bytes() == bytes(512)  # not negative
