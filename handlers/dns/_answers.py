"""Answers to DNS queries: from the TrustChain zones, the forwarder, or a rendered copy.

:meth:`DnsAnswers.answer_doq` answers one DoQ query (RFC 9250). An
authoritative answer is built once with dnspython and then served from
:class:`RenderedAnswers` (the question spliced in); other names come from
the forwarder's cache or the upstreams. An authoritative answer with the DO
bit signs its RRsets when first asked for (:meth:`Zone.rrsig`); if the key
store cannot sign, the answer is SERVFAIL and not kept. Responses to queries with EDNS are
padded to a multiple of 468 octets (RFC 8467). A records are never served
(the zones hold none; the forwarder drops them).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from protocol import Peer
from protocol.doq import PADDING_BLOCK, QueryReceived, error_response

from ._rendered import AnswerKey, RenderedAnswers
from ._resolver import Forwarder, Resolution
from ._zone import NXNAME
from ._zones import TrustChainZones

log = logging.getLogger("trustchain.dns")

IN = dns.rdataclass.IN
META_REFUSED = {dns.rdatatype.AXFR, dns.rdatatype.IXFR}
META_FORMERR = {dns.rdatatype.OPT, dns.rdatatype.TSIG, dns.rdatatype.TKEY, NXNAME}
"""Meta types no query may ask for (NXNAME: RFC 9824 §3.5)."""
META_NOTIMP = {dns.rdatatype.MAILA, dns.rdatatype.MAILB}


class DnsAnswers:
    """Answers queries for the TrustChain zones and, through ``forwarder``, for the rest.

    :param forwarder: the resolver for other names; None: they are REFUSED.
    :param rendered: answers rendered before (shared with the zones, which drop the
        stale ones).
    """

    def __init__(self, *, zones: TrustChainZones, forwarder: Forwarder | None,
                 rendered: RenderedAnswers) -> None:
        self.zones = zones
        self.forwarder = forwarder
        self._rendered = rendered

    def lookup_now(self, qname: dns.name.Name, qtype: int, dnssec: bool,
                   recursion: bool = True) -> Resolution | None:
        """An answer available without waiting: from a zone, a refusal, or the cache."""
        zone = self.zones.zone_for(qname)
        if zone is not None:
            try:
                found = zone.lookup(qname, qtype, dnssec)  # signs what is not signed yet
            except Exception as exc:  # the key store could not sign: never an unsigned answer
                log.warning("DNS answer not signed", extra={"error": str(exc)})
                self.zones.signing_failed(exc)
                return Resolution(dns.rcode.SERVFAIL, [], source="none")
            return Resolution(found.rcode, found.answer, found.authority, found.additional,
                              authoritative=True, source="zone")
        if self.forwarder is None or not self.forwarder.upstreams or not recursion:
            return Resolution(dns.rcode.REFUSED, [], source="none")
        return self.forwarder.cached(qname, qtype, dnssec)

    async def lookup(self, qname: dns.name.Name, qtype: int, dnssec: bool,
                     recursion: bool = True) -> Resolution:
        now = self.lookup_now(qname, qtype, dnssec, recursion)
        if now is not None:
            return now
        assert self.forwarder is not None
        return await self.forwarder.resolve(qname, qtype, dnssec, cache_checked=True)

    def answer_doq(self, event: QueryReceived, peer: Peer) -> bytes | Awaitable[bytes]:
        """The DNS response to one DoQ query (Message ID 0), now or later."""
        message = event.message
        rendered = self._rendered
        sent = rendered.zone_answer_to(message)
        if sent is not None:
            return sent
        forwarder = self.forwarder
        second = int(forwarder.clock()) if forwarder is not None else 0
        if forwarder is not None:
            sent = rendered.forwarded_answer_to(message, second)
            if sent is not None:
                forwarder.cache.hits += 1
                return sent
        query = event.query
        if query is None:
            flags = event.error.flags if event.error is not None else None
            return error_response(message, dns.rcode.FORMERR, flags)
        key: AnswerKey | None = None
        if not query.compressed and not query.signed:
            edns = None if query.edns is None else (query.edns.version, query.edns.dnssec_ok)
            key = (query.qname, query.qtype, query.qclass, query.flags & 0x7910, edns)
            cached = rendered.zone_answer(key)
            authoritative = cached is not None
            if cached is None and forwarder is not None:
                # a forwarded answer rendered this very second: its TTLs are still right
                cached = rendered.forwarded_answer(key, second)
                if cached is not None:
                    forwarder.cache.hits += 1
            if cached is not None:
                wire = cached[:12] + query.question + cached[12 + len(query.question):]
                if authoritative:
                    rendered.keep_zone_message(key, message, wire)
                else:
                    rendered.keep_forwarded_message(message, second, wire)
                return wire
        if query.opcode != dns.opcode.QUERY:
            return error_response(event.message, dns.rcode.NOTIMP, query.flags)
        try:
            request = dns.message.from_wire(event.message)
        except dns.message.UnknownTSIGKey:
            return error_response(event.message, dns.rcode.NOTAUTH, query.flags)
        except dns.exception.DNSException:
            return error_response(event.message, dns.rcode.FORMERR, query.flags)
        if request.edns > 0:
            return self.render(request, Resolution(dns.rcode.BADVERS, [], source="none"))
        question = request.question[0]
        qtype = question.rdtype
        if question.rdclass != IN or qtype in META_REFUSED:
            return self.render(request, Resolution(dns.rcode.REFUSED, [], source="none"))
        if qtype in META_FORMERR:
            return self.render(request, Resolution(dns.rcode.FORMERR, [], source="none"))
        if qtype in META_NOTIMP:
            return self.render(request, Resolution(dns.rcode.NOTIMP, [], source="none"))
        dnssec = bool(request.ednsflags & dns.flags.DO)
        recursion = bool(request.flags & dns.flags.RD)
        resolution = self.lookup_now(question.name, qtype, dnssec, recursion)
        if resolution is not None:
            wire = self.render(request, resolution)
            if key is not None and resolution.source == "zone":
                # an NSEC answer is a compact denial's: its bitmap changes with the names
                # below it, so it goes with every change of the zone, like the negative ones
                self._rendered.keep_zone_answer(
                    key, question.name, wire,
                    positive=bool(resolution.answer) and qtype != dns.rdatatype.NSEC)
                self._rendered.keep_zone_message(key, event.message, wire)
            elif key is not None and resolution.source == "cache":
                self._remember_forwarded(key, event.message, wire)
            return wire
        return self._forward(request, question.name, qtype, dnssec, key, event.message)

    async def _forward(self, request: dns.message.Message, qname: dns.name.Name, qtype: int,
                       dnssec: bool, key: AnswerKey | None, message: bytes) -> bytes:
        assert self.forwarder is not None
        resolution = await self.forwarder.resolve(qname, qtype, dnssec, cache_checked=True)
        wire = self.render(request, resolution)
        if key is not None and resolution.source == "upstream" and \
                resolution.rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            self._remember_forwarded(key, message, wire)
        return wire

    def _remember_forwarded(self, key: AnswerKey, message: bytes, wire: bytes) -> None:
        """Keep a forwarded answer's wire form for the rest of this second."""
        assert self.forwarder is not None
        second = int(self.forwarder.clock())
        self._rendered.keep_forwarded(key, second, wire)
        self._rendered.keep_forwarded_message(message, second, wire)

    def render(self, request: dns.message.Message, resolution: Resolution) -> bytes:
        recursion = self.forwarder is not None and bool(self.forwarder.upstreams)
        response = dns.message.make_response(
            request, recursion_available=recursion, our_payload=1232,
            pad=PADDING_BLOCK if request.edns >= 0 else 0)
        response.flags |= request.flags & dns.flags.CD
        if resolution.authoritative:
            response.flags |= dns.flags.AA
        if request.edns >= 0 and request.ednsflags & dns.flags.DO:
            response.ednsflags |= dns.flags.DO
        response.set_rcode(dns.rcode.Rcode.make(resolution.rcode))
        response.answer = list(resolution.answer)
        response.authority = list(resolution.authority)
        response.additional = list(resolution.additional)
        try:
            return response.to_wire(max_size=65535)
        except dns.exception.TooBig:
            response.answer, response.authority, response.additional = [], [], []
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=65535)
