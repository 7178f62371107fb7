"""The AAAA and TLSA rdatas the zones publish: made once per address and per key, and
hashed once.

dnspython hashes an rdata by encoding it (an AAAA parses its address text again each
time), and an RRset hashes each rdata twice as it is built; every validator builds the
RRsets of every certificate it publishes. Rdatas are immutable values, so the zones
keep the ones they made (an RRset made again of the same ones is then recognised by
identity: :meth:`Zone.apply`) in subclasses that keep their hash. They equal, hash,
encode and render as dnspython's own.
"""

from __future__ import annotations

from typing import Any

import dns.immutable
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
