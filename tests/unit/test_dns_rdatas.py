"""The zones' AAAA and TLSA rdatas (``handlers.dns._rdatas``) against dnspython's: made
once per address or key and hashing once, they must be the same values (equality, hash,
wire and text forms, copies) in the same RRsets."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import dns.exception
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from handlers.dns._rdatas import HashedAAAA, HashedTLSA, RdataCache

IN = dns.rdataclass.IN
AAAA = dns.rdatatype.AAAA
TLSA = dns.rdatatype.TLSA
SPKI = "ab" * 32


def _pairs() -> list[tuple[Any, Any]]:
    return [(HashedAAAA(IN, AAAA, "2001:DB8:0::7"), dns.rdata.from_text(IN, AAAA, "2001:db8::7")),
            (HashedTLSA(IN, TLSA, 3, 1, 1, bytes.fromhex(SPKI)),
             dns.rdata.from_text(IN, TLSA, f"3 1 1 {SPKI}"))]


@pytest.mark.parametrize("index", [0, 1])
def test_a_hashed_rdata_is_dnspythons_value(index: int) -> None:
    ours, theirs = _pairs()[index]
    assert ours == theirs and theirs == ours and hash(ours) == hash(theirs)
    assert ours.to_wire() == theirs.to_wire() and ours.to_text() == theirs.to_text()
    assert ours.to_digestable() == theirs.to_digestable()
    assert dns.rrset.from_rdata_list("x.trust.", 300, [ours]) == \
        dns.rrset.from_rdata_list("x.trust.", 300, [theirs])
    for other in (pickle.loads(pickle.dumps(ours)), copy.copy(ours), copy.deepcopy(ours),
                  ours.replace()):
        assert other == theirs and hash(other) == hash(theirs)
    with pytest.raises(TypeError):
        ours.rdtype = TLSA  # immutable, so the kept hash stays right


def test_the_cache_makes_each_rdata_once_in_canonical_order() -> None:
    cache = RdataCache()
    first = cache.aaaa(["2001:db8::9", "2001:db8::10", "2001:DB8::9"])
    assert [rd.to_text() for rd in first] == ["2001:db8::9", "2001:db8::10"]
    again = cache.aaaa(["2001:db8::10", "2001:db8::9"])
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert cache.tlsa(SPKI) is cache.tlsa(SPKI)
    assert cache.tlsa(SPKI).to_text() == f"3 1 1 {SPKI}"
    with pytest.raises(dns.exception.SyntaxError):
        cache.aaaa(["192.0.2.1"])
    with pytest.raises(ValueError):
        cache.tlsa("not hex")
