"""The IPv6-only forwarding resolver for names outside the TrustChain zones.

Queries go to the configured upstreams in order, over IPv6 only: UDP (TCP
when the answer is truncated) or DNS over QUIC on a reused connection. An
upstream that times out, fails or answers SERVFAIL/REFUSED is skipped for the
next one; if none answers, the answer is SERVFAIL.

IPv6 only also means that no A record is ever returned: an A query is sent
upstream as a SOA query for the same name, and answered NXDOMAIN or NODATA
(NOERROR, empty answer, the SOA in the authority section); A records and
their signatures are removed from every other answer.

Answers are cached by (name, type, DO bit) for the smallest TTL of the answer
section, negative answers for min(SOA TTL, SOA minimum) (RFC 2308 §5), both
capped at ``max_ttl``; SERVFAIL is not cached. The cache holds at most
``capacity`` answers, dropping the least recently used, and TTLs count down
while an answer is cached. Identical queries in flight share one upstream
query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from ._doq_client import DoqManager

log = logging.getLogger("trustchain.dns")

A = dns.rdatatype.A
SOA = dns.rdatatype.SOA
RRSIG = dns.rdatatype.RRSIG
CNAME = dns.rdatatype.CNAME
DNAME = dns.rdatatype.DNAME


@dataclass(frozen=True)
class Upstream:
    """One forwarding upstream (``dns.upstream_servers``)."""

    protocol: Literal["udp", "doq"]
    address: str
    """IPv6 address."""
    port: int
    server_name: str = ""
    """DoQ: the name its certificate must carry; empty: its address."""

    def __str__(self) -> str:
        if self.protocol == "doq":
            name = f"{self.server_name}@" if self.server_name else ""
            return f"doq://{name}[{self.address}]:{self.port}"
        return f"[{self.address}]:{self.port}"


@dataclass
class UpstreamStatus:
    """What the forwarder saw of one upstream."""

    reachable: bool | None = None
    """None until it was asked once."""
    last_error: str | None = None
    rtt: float | None = None
    """Seconds the last successful query took."""
    queries: int = 0
    failures: int = 0


@dataclass(frozen=True)
class Resolution:
    """An answer, whichever part of the service made it."""

    rcode: int
    answer: list[dns.rrset.RRset]
    authority: list[dns.rrset.RRset] = field(default_factory=list)
    additional: list[dns.rrset.RRset] = field(default_factory=list)
    authoritative: bool = False
    source: str = "upstream"
    """``zone``, ``cache``, ``upstream``, or ``none`` (refused, failed)."""
    upstream: str | None = None


@dataclass
class _Entry:
    rcode: int
    sections: tuple[list[dns.rrset.RRset], list[dns.rrset.RRset], list[dns.rrset.RRset]]
    stored: float
    expires: float
    upstream: str | None


CacheKey = tuple[dns.name.Name, int, bool]


class AnswerCache:
    """Forwarded answers by (name, type, DO bit), least recently used first out."""

    def __init__(self, capacity: int, max_ttl: float) -> None:
        self.capacity = capacity
        self.max_ttl = max_ttl
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey, now: float) -> Resolution | None:
        entry = self._entries.get(key)
        if entry is None or entry.expires <= now:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        elapsed = int(now - entry.stored)
        answer, authority, additional = (
            [_aged(r, elapsed) for r in section] for section in entry.sections)
        return Resolution(entry.rcode, answer, authority, additional, source="cache",
                          upstream=entry.upstream)

    def put(self, key: CacheKey, resolution: Resolution, now: float) -> None:
        ttl = cache_ttl(resolution)
        if ttl is None:
            return
        ttl = min(ttl, self.max_ttl)
        if ttl <= 0:
            return
        self._entries[key] = _Entry(resolution.rcode, (resolution.answer, resolution.authority,
                                                       resolution.additional),
                                    now, now + ttl, resolution.upstream)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


def cache_ttl(resolution: Resolution) -> float | None:
    """How long ``resolution`` may be cached, or None if it may not (RFC 2308)."""
    if resolution.rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return None
    if resolution.rcode == dns.rcode.NOERROR and resolution.answer:
        return float(min(r.ttl for r in resolution.answer))
    for rrset in resolution.authority:
        if rrset.rdtype == SOA:
            return float(min(rrset.ttl, rrset[0].minimum))
    return None  # a negative answer without a SOA is not cached


def _aged(rrset: dns.rrset.RRset, elapsed: int) -> dns.rrset.RRset:
    if elapsed <= 0:
        return rrset
    return dns.rrset.from_rdata_list(rrset.name, max(0, rrset.ttl - elapsed), list(rrset))


def _not_a(rrset: dns.rrset.RRset) -> bool:
    return rrset.rdtype != A and not (rrset.rdtype == RRSIG and rrset.covers == A)


def ipv6_only(response: dns.message.Message, qtype: int) -> Resolution:
    """The upstream's ``response`` with every A record removed; for an A query
    (asked upstream as SOA), NXDOMAIN or NODATA with the SOA in authority."""
    answer = [r for r in response.answer if _not_a(r)]
    authority = [r for r in response.authority if _not_a(r)]
    additional = [r for r in response.additional if _not_a(r)]
    if qtype == A:
        soa = [r for r in answer if r.rdtype == SOA or
               (r.rdtype == RRSIG and r.covers == SOA)]
        answer = [r for r in answer if r.rdtype in (CNAME, DNAME) or
                  (r.rdtype == RRSIG and r.covers in (CNAME, DNAME))]
        authority = soa + [r for r in authority if r not in soa]
        additional = []
    return Resolution(response.rcode(), answer, authority, additional)


class Forwarder:
    """Resolves names outside the TrustChain zones through the upstreams.

    :param clock: monotonic seconds (cache ages).
    """

    def __init__(self, upstreams: list[Upstream], *, cache: AnswerCache, cafile: str = "",
                 timeout: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.upstreams = upstreams
        self.cache = cache
        self.cafile = cafile
        self.timeout = timeout
        self.clock = clock
        self.status = {str(u): UpstreamStatus() for u in upstreams}
        self._managers: dict[Upstream, Any] = {}
        self._connections: dict[Upstream, Any] = {}
        self._inflight: dict[CacheKey, asyncio.Future[Resolution]] = {}

    def cached(self, qname: dns.name.Name, qtype: int, dnssec: bool) -> Resolution | None:
        """The cached answer, without asking anyone."""
        return self.cache.get((qname, qtype, dnssec), self.clock())

    async def resolve(self, qname: dns.name.Name, qtype: int, dnssec: bool, *,
                      cache_checked: bool = False) -> Resolution:
        """The answer from the cache or the first upstream that gives one.

        ``cache_checked``: the caller just missed in :meth:`cached` (not counted twice).
        """
        key = (qname, qtype, dnssec)
        if not cache_checked:
            hit = self.cache.get(key, self.clock())
            if hit is not None:
                return hit
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Resolution] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            resolution = await self._ask(qname, qtype, dnssec)
            self.cache.put(key, resolution, self.clock())
            future.set_result(resolution)
            return resolution
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[key]

    async def _ask(self, qname: dns.name.Name, qtype: int, dnssec: bool) -> Resolution:
        ask = SOA if qtype == A else qtype
        for upstream in self.upstreams:
            status = self.status[str(upstream)]
            status.queries += 1
            query = dns.message.make_query(qname, dns.rdatatype.RdataType.make(ask),
                                           want_dnssec=dnssec, use_edns=0,
                                           payload=1232)
            started = time.monotonic()
            try:
                response = await self._query(upstream, query)
            except (dns.exception.DNSException, OSError, ValueError, EOFError) as exc:
                status.failures += 1
                status.reachable = False
                status.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else \
                    type(exc).__name__
                log.info("upstream failed", extra={"upstream": str(upstream),
                                                   "error": status.last_error})
                await self._drop_connection(upstream)
                continue
            status.reachable = True
            status.rtt = time.monotonic() - started
            if response.rcode() in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
                status.last_error = f"answered {dns.rcode.to_text(response.rcode())}"
                continue
            result = ipv6_only(response, qtype)
            return Resolution(result.rcode, result.answer, result.authority, result.additional,
                              upstream=str(upstream))
        return Resolution(dns.rcode.SERVFAIL, [], source="none")

    async def _query(self, upstream: Upstream, query: dns.message.Message
                     ) -> dns.message.Message:
        if upstream.protocol == "udp":
            response, _tcp = await dns.asyncquery.udp_with_fallback(
                query, upstream.address, timeout=self.timeout, port=upstream.port)
            return response
        connection = self._connections.get(upstream)
        if connection is None:
            manager = self._managers.get(upstream)
            if manager is None:
                manager = DoqManager(
                    verify_mode=self.cafile or True,
                    server_name=upstream.server_name or upstream.address)
                self._managers[upstream] = manager
            connection = manager.connect(upstream.address, upstream.port)
            self._connections[upstream] = connection
        return await dns.asyncquery.quic(query, upstream.address, timeout=self.timeout,
                                         port=upstream.port, connection=connection)

    async def _drop_connection(self, upstream: Upstream) -> None:
        connection = self._connections.pop(upstream, None)
        manager = self._managers.pop(upstream, None)
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
        if manager is not None:
            with contextlib.suppress(Exception):
                await manager.close()

    async def close(self) -> None:
        for upstream in list(self._connections) + list(self._managers):
            await self._drop_connection(upstream)

    def health(self) -> list[dict[str, Any]]:
        out = []
        for upstream in self.upstreams:
            status = self.status[str(upstream)]
            out.append({"server": str(upstream), "protocol": upstream.protocol,
                        "reachable": status.reachable, "last_error": status.last_error,
                        "rtt_ms": None if status.rtt is None else round(status.rtt * 1000, 3),
                        "queries": status.queries, "failures": status.failures})
        return out
