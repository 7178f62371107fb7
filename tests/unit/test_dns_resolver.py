"""The forwarder's cache and its IPv6-only rewriting, on dnspython messages (no I/O)."""

from __future__ import annotations

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from handlers.dns import AnswerCache, Resolution, ipv6_only
from handlers.dns._resolver import cache_ttl

NAME = dns.name.from_text("www.example.")
SOA = dns.rrset.from_text("example.", 900, "IN", "SOA",
                          "ns.example. host.example. 1 3600 600 86400 120")


def aaaa(ttl: int = 300) -> dns.rrset.RRset:
    return dns.rrset.from_text(NAME, ttl, "IN", "AAAA", "2001:db8::1")


def response(*answer: dns.rrset.RRset, authority: tuple[dns.rrset.RRset, ...] = (),
             additional: tuple[dns.rrset.RRset, ...] = (),
             rcode: int = dns.rcode.NOERROR) -> dns.message.Message:
    query = dns.message.make_query(NAME, "SOA")
    r = dns.message.make_response(query)
    r.set_rcode(rcode)  # type: ignore[arg-type]
    r.answer, r.authority, r.additional = list(answer), list(authority), list(additional)
    return r


def test_positive_answers_age_and_expire() -> None:
    cache = AnswerCache(capacity=10, max_ttl=600)
    key = (NAME, dns.rdatatype.AAAA, False)
    cache.put(key, Resolution(dns.rcode.NOERROR, [aaaa(300)]), now=100.0)
    hit = cache.get(key, 160.0)
    assert hit is not None and hit.answer[0].ttl == 240 and hit.source == "cache"
    assert cache.get(key, 400.0) is None and len(cache) == 0
    assert (cache.hits, cache.misses) == (1, 1)


def test_ttl_is_capped_by_cache_ttl() -> None:
    cache = AnswerCache(capacity=10, max_ttl=60)
    key = (NAME, dns.rdatatype.AAAA, False)
    cache.put(key, Resolution(dns.rcode.NOERROR, [aaaa(86400)]), now=0.0)
    assert cache.get(key, 59.0) is not None and cache.get(key, 61.0) is None


def test_negative_answers_use_the_soa_minimum() -> None:
    nx = Resolution(dns.rcode.NXDOMAIN, [], [SOA])
    assert cache_ttl(nx) == 120  # min(900, minimum 120), RFC 2308 §5
    nodata = Resolution(dns.rcode.NOERROR, [], [SOA])
    assert cache_ttl(nodata) == 120
    assert cache_ttl(Resolution(dns.rcode.NXDOMAIN, [])) is None  # no SOA: not cached
    assert cache_ttl(Resolution(dns.rcode.SERVFAIL, [])) is None


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    cache = AnswerCache(capacity=3, max_ttl=600)
    keys = [(dns.name.from_text(f"n{i}.example."), dns.rdatatype.AAAA, False)
            for i in range(4)]
    for key in keys[:3]:
        cache.put(key, Resolution(dns.rcode.NOERROR, [aaaa()]), 0.0)
    assert cache.get(keys[0], 1.0) is not None  # now the most recently used
    cache.put(keys[3], Resolution(dns.rcode.NOERROR, [aaaa()]), 1.0)
    assert len(cache) == 3 and cache.get(keys[1], 1.0) is None
    assert cache.get(keys[0], 1.0) is not None and cache.get(keys[3], 1.0) is not None


def test_a_records_never_pass() -> None:
    a = dns.rrset.from_text(NAME, 300, "IN", "A", "192.0.2.1")
    a_sig = dns.rrset.from_text(NAME, 300, "IN", "RRSIG",
                                "A 13 3 300 20300101000000 20200101000000 1 example. AAAA")
    glue = dns.rrset.from_text("ns.example.", 300, "IN", "A", "192.0.2.53")
    out = ipv6_only(response(a, a_sig, aaaa(), additional=(glue,)), dns.rdatatype.AAAA)
    assert [r.rdtype for r in out.answer] == [dns.rdatatype.AAAA] and out.additional == []


def test_a_query_becomes_nodata_with_the_soa() -> None:
    cname = dns.rrset.from_text(NAME, 300, "IN", "CNAME", "host.example.")
    # asked upstream as SOA: the name is below the apex, so the SOA is in authority
    out = ipv6_only(response(cname, authority=(SOA,)), dns.rdatatype.A)
    assert out.rcode == dns.rcode.NOERROR and out.answer == [cname]
    assert out.authority == [SOA]
    # at an apex the SOA comes back as the answer and moves to authority
    apex = ipv6_only(response(SOA), dns.rdatatype.A)
    assert apex.answer == [] and apex.authority == [SOA]
    nx = ipv6_only(response(authority=(SOA,), rcode=dns.rcode.NXDOMAIN), dns.rdatatype.A)
    assert nx.rcode == dns.rcode.NXDOMAIN and nx.authority == [SOA]
