"""The RRsets of a zone by owner and type, each made when an answer first reads it.

Every validator publishes every certificate; only the validator asked answers
for it. A publication gives the zone the AAAA and TLSA data of a name as wire
forms (:class:`WireRdatas`), and :class:`ZoneRRsets` keeps them as they are:
comparing them says whether the RRset changed, and the dnspython RRset (its
rdatas, their hashes) is made the first time it is read, then kept until the
data changes. The SOA, NS and DNSKEY RRsets, and RRsets given as rdatas, are
kept as given.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any

import dns.name
import dns.rdata
import dns.rrset

from ._rdatas import WireRdatas

RRsetKey = tuple[dns.name.Name, int]
"""(owner, rdtype)."""


class _Entry:
    """One RRset: made (``rrset``), or its owner, TTL and wire forms until it is read."""

    __slots__ = ("data", "name", "rrset", "ttl")

    def __init__(self, name: dns.name.Name, ttl: int, data: WireRdatas | None,
                 rrset: dns.rrset.RRset | None) -> None:
        self.name = name
        """The owner as given (not the name it is looked up with: the RRset, and the
        signature cache's key, are then the zone's own name object)."""
        self.ttl = ttl
        self.data = data
        """The wire forms it was given as, or None (given as rdatas or an RRset)."""
        self.rrset = rrset


class ZoneRRsets(MutableMapping[RRsetKey, dns.rrset.RRset]):
    """(owner, rdtype) -> RRset, like a dict; an RRset given as :class:`WireRdatas`
    (:meth:`replace`) is made when first read, and is then the same object at every read
    until it is replaced."""

    def __init__(self) -> None:
        self._entries: dict[RRsetKey, _Entry] = {}

    def __getitem__(self, key: RRsetKey) -> dns.rrset.RRset:
        entry = self._entries[key]
        if entry.rrset is None:
            return self._make(entry)
        return entry.rrset

    def get(self, key: RRsetKey, default: Any = None) -> Any:  # (dict's, for speed)
        entry = self._entries.get(key)
        if entry is None:
            return default
        if entry.rrset is None:
            return self._make(entry)
        return entry.rrset

    @staticmethod
    def _make(entry: _Entry) -> dns.rrset.RRset:
        assert entry.data is not None
        entry.rrset = dns.rrset.from_rdata_list(entry.name, entry.ttl, entry.data.make())
        return entry.rrset

    def __setitem__(self, key: RRsetKey, rrset: dns.rrset.RRset) -> None:
        self._entries[key] = _Entry(key[0], rrset.ttl, None, rrset)

    def __delitem__(self, key: RRsetKey) -> None:
        del self._entries[key]

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[RRsetKey]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def remove(self, key: RRsetKey) -> int | None:
        """Remove ``key``'s RRset without making it.

        :returns: the TTL of the RRset removed if it was ever read, else None (an RRset
            never read was never signed: its signature needs no forgetting).
        """
        entry = self._entries.pop(key, None)
        return None if entry is None or entry.rrset is None else entry.ttl

    def replace(self, key: RRsetKey, ttl: int,
                rdatas: WireRdatas | Sequence[dns.rdata.Rdata]) -> tuple[bool, int | None]:
        """Give ``key`` the RRset of ``rdatas`` (not empty) with ``ttl``, unless it holds
        that RRset already: wire forms are kept as they are, rdatas made into an RRset now.

        :returns: whether the RRset changed, and the TTL of the one replaced if it was
            ever read (else None, as for :meth:`remove`).
        """
        entries = self._entries
        old = entries.get(key)
        if isinstance(rdatas, WireRdatas):
            if old is not None and old.ttl == ttl and _equal(key, old, rdatas):
                return False, None
            entries[key] = _Entry(key[0], ttl, rdatas, None)
            return True, None if old is None or old.rrset is None else old.ttl
        rrset = None
        if old is not None and old.ttl == ttl:
            current = self[key]
            if _holds(current, rdatas):
                return False, None
            rrset = dns.rrset.from_rdata_list(key[0], ttl, rdatas)
            if current == rrset:
                return False, None
        if rrset is None:
            rrset = dns.rrset.from_rdata_list(key[0], ttl, rdatas)
        entries[key] = _Entry(key[0], ttl, None, rrset)
        return True, None if old is None else old.ttl


def _equal(key: RRsetKey, old: _Entry, new: WireRdatas) -> bool:
    """Whether ``old`` holds the RRset of ``new``'s rdatas (its TTL aside)."""
    if old.data is not None:
        return old.data.wires == new.wires
    assert old.rrset is not None  # given as rdatas: compare the RRsets
    return bool(old.rrset == dns.rrset.from_rdata_list(key[0], old.ttl, new.make()))


def _holds(rrset: dns.rrset.RRset, rdatas: Sequence[dns.rdata.Rdata]) -> bool:
    """Whether ``rrset`` holds exactly the objects ``rdatas``, in their order (so it equals
    the RRset of ``rdatas``, without hashing every rdata as comparing sets would)."""
    return len(rrset) == len(rdatas) and all(
        held is given for held, given in zip(rrset, rdatas, strict=True))
