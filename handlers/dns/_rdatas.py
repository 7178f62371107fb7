"""The AAAA and TLSA rdatas the zones publish: known by their wire forms until an answer
needs them, then made once per address and per key, and hashed once.

Every validator publishes every certificate, but only the validator asked makes the
RRsets of an answer: a publication compares and keeps the rdatas' wire forms
(:class:`WireRdatas`, made without dnspython: ``inet_pton``, ``bytes.fromhex``), and
the zone makes the rdatas from them when it first answers with them.

dnspython hashes an rdata by encoding it (an AAAA parses its address text again each
time), and an RRset hashes each rdata twice as it is built; every validator builds the
RRsets of every certificate it publishes. Rdatas are immutable values, so the zones
keep the ones they made (an RRset made again of the same ones is then recognised by
identity: :meth:`Zone.apply`) in subclasses that keep their hash. They equal, hash,
encode and render as dnspython's own.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any

import dns.immutable
import dns.ipv6
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TLSA
import dns.rdtypes.IN.AAAA

IN = dns.rdataclass.IN
AAAA = dns.rdatatype.AAAA
TLSA = dns.rdatatype.TLSA
CACHE_LIMIT = 65_536
"""Rdatas kept at most, of each kind (a cache is emptied when full)."""


@dns.immutable.immutable
class HashedAAAA(dns.rdtypes.IN.AAAA.AAAA):
    """An AAAA rdata that computes its hash once."""

    __slots__ = ("_hash",)

    def __init__(self, rdclass: Any, rdtype: Any, address: str) -> None:
        super().__init__(rdclass, rdtype, address)  # type: ignore[no-untyped-call]
        self._hash: int = super().__hash__()  # type: ignore[no-untyped-call]

    def __hash__(self) -> int:
        return self._hash


@dns.immutable.immutable
class HashedTLSA(dns.rdtypes.ANY.TLSA.TLSA):
    """A TLSA rdata that computes its hash once."""

    __slots__ = ("_hash",)

    def __init__(self, rdclass: Any, rdtype: Any, usage: int, selector: int, mtype: int,
                 cert: bytes) -> None:
        super().__init__(rdclass, rdtype, usage, selector, mtype,  # type: ignore[no-untyped-call]
                         cert)
        self._hash: int = super().__hash__()  # type: ignore[no-untyped-call]

    def __hash__(self) -> int:
        return self._hash


TLSA_3_1_1 = b"\x03\x01\x01"
"""The first octets of a TLSA ``3 1 1`` rdata: DANE-EE, SubjectPublicKeyInfo, SHA-256."""


class WireRdatas:
    """The rdatas of one RRset as their canonical wire forms (sorted, no duplicates), and
    how to make them: two RRsets of one owner and type are equal exactly when these forms
    are, so a zone compares these and makes the RRset only when it is read
    (:class:`handlers.dns._rrsets.ZoneRRsets`).

    :param wires: the wire forms, sorted, without duplicates.
    :param make: makes the rdatas, in the order of ``wires``.
    """

    __slots__ = ("make", "wires")

    def __init__(self, wires: tuple[bytes, ...], make: Callable[[], Sequence[Any]]) -> None:
        self.wires = wires
        self.make = make

    def __len__(self) -> int:
        return len(self.wires)

    def __repr__(self) -> str:
        return f"WireRdatas({self.wires!r})"


def ipv6_wire(address: str) -> bytes:
    """The 16 octets of an IPv6 address (an AAAA rdata's wire form).

    :raises dns.exception.SyntaxError: ``address`` is not an IPv6 address.
    """
    try:
        return socket.inet_pton(socket.AF_INET6, address)
    except OSError:
        return dns.ipv6.inet_aton(address)  # raises what dnspython raises, or agrees


def _kept(cache: dict[Any, Any], key: Any, value: Any) -> Any:
    """Keep ``value`` in ``cache`` (emptied first when full); returns ``value``."""
    if len(cache) >= CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


class RdataCache:
    """AAAA rdatas by address and TLSA rdatas by key, made once."""

    def __init__(self) -> None:
        self._aaaa: dict[str, tuple[bytes, HashedAAAA]] = {}
        """address (as written) -> (canonical wire form, rdata)."""
        self._tlsa: dict[str, HashedTLSA] = {}
        """SHA-256 of a SubjectPublicKeyInfo (hex) -> its ``3 1 1`` rdata."""

    def aaaa(self, addresses: list[str]) -> list[Any]:
        """The AAAA rdatas of ``addresses``, one per address however written, in
        canonical order.

        :raises dns.exception.SyntaxError: an address is not an IPv6 address.
        """
        found: dict[bytes, HashedAAAA] = {}
        for address in addresses:
            made = self._aaaa.get(address)
            if made is None:
                rdata = HashedAAAA(IN, AAAA, address)
                made = _kept(self._aaaa, address, (bytes(rdata.to_digestable()), rdata))
            found.setdefault(made[0], made[1])
        return [found[wire] for wire in sorted(found)]

    def tlsa(self, spki_sha256: str) -> Any:
        """The TLSA ``3 1 1`` rdata of the key whose SPKI hashes to ``spki_sha256``.

        :raises ValueError: ``spki_sha256`` is not hex.
        """
        made = self._tlsa.get(spki_sha256)
        if made is None:
            made = _kept(self._tlsa, spki_sha256,
                         HashedTLSA(IN, TLSA, 3, 1, 1, bytes.fromhex(spki_sha256)))
        return made

    def aaaa_set(self, addresses: list[str]) -> WireRdatas:
        """The AAAA rdatas of ``addresses`` (:meth:`aaaa`), made when first needed.

        :raises dns.exception.SyntaxError: an address is not an IPv6 address.
        """
        wires = tuple(sorted({ipv6_wire(address) for address in addresses}))
        return WireRdatas(wires, lambda: self.aaaa(addresses))

    def tlsa_set(self, spki_sha256: str) -> WireRdatas:
        """The TLSA ``3 1 1`` rdata of ``spki_sha256`` (:meth:`tlsa`), made when first needed.

        :raises ValueError: ``spki_sha256`` is not the hex of 32 octets.
        """
        digest = bytes.fromhex(spki_sha256)
        if len(digest) != 32:  # (what dnspython checks for matching type 1)
            raise ValueError("certificate association data length inconsistent with "
                             "matching type")
        return WireRdatas((TLSA_3_1_1 + digest,), lambda: [self.tlsa(spki_sha256)])
