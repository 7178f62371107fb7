"""The multiset hash of the replicated rows: kept digests change no hash."""

from __future__ import annotations

import hashlib
from typing import Any

from store import MultisetHash, state_hash
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
        rows.add(("stake", f"{i:064x}", 5))
    assert first not in statehash._recent and len(statehash._recent) <= RECENT_ROWS
    rows.remove(first)
    assert rows == MultisetHash.of(("stake", f"{i:064x}", 5) for i in range(RECENT_ROWS))


def test_only_rows_of_tables_replaced_soon_are_kept() -> None:
    """A name, a CT leaf or used work stays for epochs: keeping its digest would only
    push out a pending certificate's, which its signed certificate replaces soon."""
    rows = MultisetHash()
    pending = pending_row("03")
    rows.add(pending)
    for i in range(RECENT_ROWS):
        rows.add(("used_work", i.to_bytes(32, "big"), 5))
        rows.add(("ct_leaves", i.to_bytes(32, "big"), 0, i))
    assert pending in statehash._recent
    assert ("used_work", bytes(32), 5) not in statehash._recent
    rows.remove(pending)
    rows.remove(("used_work", bytes(32), 5))
    assert rows == MultisetHash.of([
        *(("used_work", i.to_bytes(32, "big"), 5) for i in range(1, RECENT_ROWS)),
        *(("ct_leaves", i.to_bytes(32, "big"), 0, i) for i in range(RECENT_ROWS))])


FIXED_ROWS: list[tuple[Any, ...]] = [
    pending_row("8f" * 16),
    ("certificates", "9e" * 16, "ab" * 32, "node-2", "ef" * 32, 1700000000, 1700086400,
     1700000000123, "node", b"\x30" * 900, b"\x31" * 1100, "01" * 32, 1700000500000,
     "keyCompromise", 1, 42, 8, 1),
    ("names", "a.trust", "8f" * 16, 0),
    ("names", "2001:db8::1", "8f" * 16, 1),
    ("registrations", "a.trust", "cd" * 32, "8f" * 16, '["2001:db8::1"]', 1700000001),
    ("stake", "12" * 32, 100),
    ("used_work", bytes(range(32)), 5),
    ("validator_keys", "node-1", b"\xa1\x61a\x01"),
    ("isolated", "node-3", 9, "equivocation"),
    ("ct_shards", 0, 1234, bytes(32)),
    ("ct_entries", b"\x01" * 32, 0, 17, 1700000000123),
    ("ct_leaves", b"\x02" * 32, 0, 17),
    ("fingerprints", b"\x03" * 32, b"\x04" * 32, "precert", 0, 17, None, 1700000000123),
    ("fingerprints", b"\x05" * 32, b"\x04" * 32, "issued", None, None, "8f" * 16,
     1700000000999),
    ("fingerprint_names", "a.trust", b"\x03" * 32),
]
FIXED_STATE_HASH = "7068ab96c2e0728030b1f7326ccb2f71d1b324fb60f24a562b36dfb952de01bb"
"""Recorded from the code before the kept digests were limited to some tables (main at
3ecdc3c): the state hash is defined over the rows alone (spec §18.4), so no change of
how it is computed may change it."""


def test_the_state_hash_of_fixed_rows_is_the_one_recorded() -> None:
    assert state_hash(12, MultisetHash.of(FIXED_ROWS)).hex() == FIXED_STATE_HASH
    incremental = MultisetHash()
    for row in FIXED_ROWS:  # kept and fresh digests alike
        incremental.add(row)
    incremental.add(("stake", "34" * 32, 1))
    incremental.remove(("stake", "34" * 32, 1))
    assert state_hash(12, incremental).hex() == FIXED_STATE_HASH


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
