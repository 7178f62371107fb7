"""The DNS service: authoritative TrustChain zones, the forwarder, DoQ answers, ``dns.*`` ops.

Zones. One zone per TrustChain domain, made from three sources: the
certificates the CA issued (for every DNS name of a valid certificate, AAAA
records for the certificate's IPv6 addresses and a TLSA ``3 1 1`` record,
SHA-256 of its SubjectPublicKeyInfo, at ``_443._quic.NAME``), the AAAA
records certificate holders registered with ``dns.register``, and the
nameserver's own ``ns1.DOMAIN``. When several valid certificates carry a
name, the newest one is published (a renewal replaces its predecessor's
records). Revocation and expiry remove the records. The zones are signed
with the keys of :class:`KeyRing`.

Publication is incremental: the service keeps, for every name, the valid
certificates that carry it and the one published; an issuance, revocation,
expiry or registration marks its names, and at the end of the event-loop turn
(so that a burst of issuances is applied together) only the owner names of
the marked names are recomputed and given to :meth:`Zone.apply`, which
re-signs only what changed. The zones are built whole (:func:`build_zone`) at
start, when the DNSKEY set or the signing key changes, and to refresh the
signatures.

Answers. :meth:`DnsService.answer_doq` answers a DoQ query: an
authoritative answer is built once with dnspython and then served from a
wire cache (the question spliced in), other names come from the forwarder's
cache or the upstreams. Responses to queries with EDNS are padded to a
multiple of 468 octets (RFC 8467). A records are never served.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TLSA
import dns.rdtypes.IN.AAAA
import dns.rrset
from cryptography import x509

from protocol import InvalidRequest, NotFound, Peer, Unauthorized
from protocol.doq import PADDING_BLOCK, QueryReceived, error_response
from protocol.ops import dns as ops
from store import CertificateRecord, verify_signature, write_atomic

from .._router import RequestContext, Router
from ._keys import KeyRing
from ._resolver import Forwarder, Resolution
from ._zone import Records, SignatureCache, Zone, ZoneSettings, build_zone, next_serial

log = logging.getLogger("trustchain.dns")

IN = dns.rdataclass.IN
AAAA = dns.rdatatype.AAAA
TLSA = dns.rdatatype.TLSA
DNSKEY = dns.rdatatype.DNSKEY
RRSIG = dns.rdatatype.RRSIG
TLSA_PREFIX = (b"_443", b"_quic")
"""TLSA records live at ``_443._quic.NAME``: port 443, transport QUIC (RFC 6698 §3)."""
REGISTER_WINDOW = 300.0
"""Seconds a registration statement's ``time`` may differ from the server's clock."""
MAX_REGISTERED_ADDRESSES = 16
WIRE_CACHE_LIMIT = 65_536
"""Precomputed authoritative answers kept at most (the cache is emptied when full)."""
_AAAA: Any = dns.rdtypes.IN.AAAA.AAAA  # rdata classes are untyped
_TLSA: Any = dns.rdtypes.ANY.TLSA.TLSA
META_REFUSED = {dns.rdatatype.AXFR, dns.rdatatype.IXFR}
META_FORMERR = {dns.rdatatype.OPT, dns.rdatatype.TSIG, dns.rdatatype.TKEY}
META_NOTIMP = {dns.rdatatype.MAILA, dns.rdatatype.MAILB}


@dataclass(frozen=True, kw_only=True)
class DnsSettings:
    """The ``dns.*`` configuration the service uses."""

    domains: tuple[str, ...]
    nameserver_addresses: tuple[str, ...] = ("::1",)
    zone: ZoneSettings = field(default_factory=ZoneSettings)
    enable_cert_validation: bool = True


@dataclass
class Registration:
    """AAAA records a certificate holder registered for one of its names."""

    spki_sha256: str
    serial: str
    addresses: list[str]
    time: int


def _is_address(name: str) -> bool:
    try:
        ipaddress.IPv6Address(name)
    except ValueError:
        return False
    return True


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name.rstrip(".") + ".")


def _published_names(record: CertificateRecord) -> list[str]:
    """The names of ``record`` that own records: no addresses, no wildcards."""
    return [n for n in record.names if not n.startswith("*.") and not _is_address(n)]


def _issued_at(record: CertificateRecord) -> float:
    return record.issued_at


class DnsService:
    """Answers DNS queries (DoQ) and the ``dns.*`` ops.

    :param certs: the CA's certificate store (read only).
    :param keyring: the DNSSEC keys.
    :param forwarder: the resolver for other names; None: they are REFUSED.
    :param data_dir: where ``registrations.json`` lives (``DATA/dns``).
    :param clock: wall-clock seconds (certificate validity, signatures, key roll).
    """

    def __init__(self, *, settings: DnsSettings, certs: Any, keyring: KeyRing,
                 forwarder: Forwarder | None, data_dir: Path,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.certs = certs
        self.keyring = keyring
        self.forwarder = forwarder
        self.data_dir = data_dir
        self.clock = clock
        self.origins = [_absolute(d) for d in settings.domains]
        self._ns_names = {dns.name.Name((b"ns1", *o.labels)) for o in self.origins}
        self.zones: dict[dns.name.Name, Zone] = {}
        self._signatures = SignatureCache()
        self._valid: dict[str, CertificateRecord] = {}
        self._holders: dict[str, dict[str, CertificateRecord]] = {}
        """name -> serial -> the valid certificates carrying it (in ``_valid``'s order)."""
        self._current: dict[str, CertificateRecord] = {}
        """name -> the certificate the zones publish for it (the newest of its holders)."""
        self._pending: set[str] = set()
        """Names whose holders or registration changed since the zones were updated."""
        self._expiries: list[tuple[float, str]] = []
        """A heap of (not_after, serial); entries of certificates gone are skipped."""
        self._key_state: tuple[tuple[str, ...], str] | None = None
        """The DNSKEY set and the signing ZSK the zones were built with."""
        self._registrations: dict[str, Registration] = {}
        self._wire_cache: dict[Any, bytes] = {}
        self._wire_positive: dict[dns.name.Name, list[Any]] = {}
        """The keys of ``_wire_cache``'s answers with data, by question name."""
        self._wire_negative: list[Any] = []
        """The keys of its NXDOMAIN and NODATA answers (they carry the SOA)."""
        self._forward_wire: dict[Any, tuple[int, bytes]] = {}
        """Forwarded answers as sent, with the (monotonic) second they were rendered in."""
        self._scheduled = False
        self.doq_stats: Callable[[], dict[str, Any]] | None = None
        """Counters of the DoQ transport, set by the wiring (handlers know no transport)."""
        self.rebuilds = 0
        """Zones built whole (start, key changes, signature refresh)."""
        self.updates = 0
        """Incremental updates (batches of issuances, revocations, registrations)."""

    # --- lifetime ------------------------------------------------------------------------

    def start(self) -> None:
        """Load the keys, the valid certificates and the registrations; sign the zones."""
        now = self.clock()
        self.keyring.load(now)
        for serial in self.certs.serials():
            record = self.certs.get(serial)
            if record is not None and record.revoked_at is None and record.not_after > now:
                self._add(record)
        path = self.data_dir / "registrations.json"
        if path.exists():
            for name, entry in json.loads(path.read_text()).items():
                self._registrations[name] = Registration(**entry)
        self._rebuild(now)

    async def run(self, interval: float = 60.0) -> None:
        """Call :meth:`maintain` every ``interval`` seconds, and when a certificate expires."""
        while True:
            now = self.clock()
            try:
                self.maintain(now)
            except Exception:
                log.exception("DNS maintenance failed; retrying")
            expiry = self._next_expiry()
            wait = interval if expiry is None or expiry <= now else min(interval,
                                                                        expiry - now + 0.05)
            await asyncio.sleep(max(wait, 0.05))

    def maintain(self, now: float | None = None) -> list[str]:
        """Expire certificates, roll keys and refresh signatures due at ``now``."""
        now = self.clock() if now is None else now
        done = []
        expired = self._expire(now)
        if expired:
            done.append(f"expired {expired}")
        rolled = self.keyring.roll(now)
        if rolled:
            done.append("keys")
        stale = any(z.signature_expiry - now <= self.settings.zone.signature_refresh
                    for z in self.zones.values())
        if stale:
            done.append("signatures")
        if rolled or stale or self._keys_now(now) != self._key_state:  # (or a build failed)
            self._rebuild(now)
        elif self._pending:
            self._publish(now)
        return done

    # --- certificates ------------------------------------------------------------------

    def certificate_issued(self, record: CertificateRecord) -> None:
        """``CertificateAuthority.on_issued``: publish the certificate's records."""
        if record.revoked_at is None and record.not_after > self.clock():
            self._add(record)
            self._schedule()

    def certificate_revoked(self, record: CertificateRecord) -> None:
        """``CertificateAuthority.on_revoked``: withdraw the certificate's records."""
        if self._remove(record.serial):
            self._schedule()

    def _add(self, record: CertificateRecord) -> None:
        if record.serial not in self._valid:
            heapq.heappush(self._expiries, (record.not_after, record.serial))
        self._valid[record.serial] = record
        for name in _published_names(record):
            self._holders.setdefault(name, {})[record.serial] = record
            self._pending.add(name)

    def _remove(self, serial: str) -> bool:
        record = self._valid.pop(serial, None)
        if record is None:
            return False
        for name in _published_names(record):
            holders = self._holders.get(name)
            if holders is not None:
                holders.pop(serial, None)
                if not holders:
                    del self._holders[name]
            self._pending.add(name)
        return True

    def _expire(self, now: float) -> int:
        """Remove the certificates that expired at ``now``; how many there were."""
        expired = 0
        while self._expiries and self._expiries[0][0] <= now:
            _, serial = heapq.heappop(self._expiries)
            record = self._valid.get(serial)
            if record is not None and record.not_after <= now:
                self._remove(serial)
                expired += 1
        return expired

    def _next_expiry(self) -> float | None:
        while self._expiries and self._expiries[0][1] not in self._valid:
            heapq.heappop(self._expiries)
        return self._expiries[0][0] if self._expiries else None

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._publish(self.clock())
            return
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._pending:
            self._publish(self.clock())

    def current_certificate(self, name: str, now: float | None = None
                            ) -> CertificateRecord | None:
        """The newest valid certificate that carries ``name``, as the zones publish it."""
        now = self.clock() if now is None else now
        if name in self._holders:
            candidates: Any = self._holders[name].values()
        else:  # an address or a wildcard: not indexed
            candidates = [r for r in self._valid.values() if name in r.names]
        holders = [r for r in candidates if r.not_after > now and r.revoked_at is None]
        return max(holders, key=_issued_at) if holders else None

    # --- zones -----------------------------------------------------------------------

    def zone_for(self, name: dns.name.Name) -> Zone | None:
        best = None
        for origin, zone in self.zones.items():
            if name.is_subdomain(origin) and (best is None or len(origin) > len(best.origin)):
                best = zone
        return best

    def _settle(self) -> list[dns.name.Name]:
        """Publish the newest holder of every pending name; the owners to recompute."""
        owners: list[dns.name.Name] = []
        for name in self._pending:
            holders = self._holders.get(name)
            if holders:
                self._current[name] = max(holders.values(), key=_issued_at)  # first of ties
            else:
                self._current.pop(name, None)
            owner = _absolute(name)
            owners += (owner, dns.name.Name((*TLSA_PREFIX, *owner.labels)))
        self._pending.clear()
        return owners

    def _owner_records(self, owner: dns.name.Name) -> dict[int, tuple[int, list[Any]]]:
        """All the records of ``owner`` (AAAA, TLSA), from the published certificates."""
        ttl = int(self.settings.zone.record_ttl)
        sets: dict[int, tuple[int, list[Any]]] = {}
        name = owner.to_text(omit_final_dot=True)
        record = self._current.get(name)
        addresses: list[str] = []
        if record is not None:
            addresses = [a for a in record.names if _is_address(a)]
            registered = self._registrations.get(name)
            if registered is not None and registered.spki_sha256 == record.spki_sha256:
                addresses += [a for a in registered.addresses if a not in addresses]
        rdatas = [_AAAA(IN, AAAA, a) for a in addresses]
        if owner in self._ns_names:
            have = [str(rd.to_text()) for rd in rdatas]
            wanted = have + [a for a in self.settings.nameserver_addresses if a not in have]
            rdatas = [_AAAA(IN, AAAA, a) for a in wanted]
        if rdatas:
            sets[AAAA] = (ttl, sorted(rdatas, key=_digestable))
        if owner.labels[:len(TLSA_PREFIX)] == TLSA_PREFIX:
            host = dns.name.Name(owner.labels[len(TLSA_PREFIX):])
            held = self._current.get(host.to_text(omit_final_dot=True))
            if held is not None:
                sets[TLSA] = (ttl, [_TLSA(IN, TLSA, 3, 1, 1, bytes.fromhex(held.spki_sha256))])
        return sets

    def _records(self) -> Records:
        """Every record of the zones, from the published certificates."""
        self._settle()
        owners = set(self._ns_names)
        for name in self._current:
            owner = _absolute(name)
            owners.update((owner, dns.name.Name((*TLSA_PREFIX, *owner.labels))))
        records: Records = {}
        for owner in owners:
            sets = self._owner_records(owner)
            if sets:
                records[owner] = sets
        return records

    def _keys_now(self, now: float) -> tuple[tuple[str, ...], str]:
        return (tuple(k.name for k in self.keyring.published(now)),
                self.keyring.signing_zsk(now).name)

    def _rebuild(self, now: float) -> None:
        """Build and sign every zone whole."""
        self._expire(now)
        records = self._records()
        for origin in self.origins:
            subset = {name: sets for name, sets in records.items() if name.is_subdomain(origin)}
            previous = self.zones.get(origin)
            serial = next_serial(previous.serial if previous is not None else None, now)
            self.zones[origin] = build_zone(origin, subset, serial=serial, keyring=self.keyring,
                                            now=now, settings=self.settings.zone,
                                            cache=self._signatures)
        self._key_state = self._keys_now(now)
        self._clear_wire_cache()
        self.rebuilds += 1

    def _publish(self, now: float) -> None:
        """Bring the zones up to date with the pending names (and expiries) at ``now``."""
        self._expire(now)
        if not self._pending or self._key_state is None:  # (not started: start() builds)
            return
        if self._keys_now(now) != self._key_state:
            self._rebuild(now)  # the DNSKEY set or the signing key changed: sign it all
            return
        names = set(self._pending)
        changes = {owner: self._owner_records(owner) for owner in self._settle()}
        changed: set[dns.name.Name] = set()
        try:
            for origin in self.origins:
                subset = {o: sets for o, sets in changes.items() if o.is_subdomain(origin)}
                if subset:
                    zone = self.zones[origin]
                    changed |= zone.apply(subset, serial=next_serial(zone.serial, now),
                                          keyring=self.keyring, now=now,
                                          settings=self.settings.zone, cache=self._signatures)
        except BaseException:
            # the zone that failed is as it was: publish these names again next time
            self._pending |= names
            raise
        finally:
            if changed:
                self._invalidate(changed)
        self.updates += 1

    def _clear_wire_cache(self) -> None:
        self._wire_cache.clear()
        self._wire_positive.clear()
        self._wire_negative.clear()

    def _invalidate(self, changed: set[dns.name.Name]) -> None:
        """Forget the rendered answers that the change of ``changed``'s RRsets (and of
        the SOA, in every negative answer) made stale."""
        cache = self._wire_cache
        for key in self._wire_negative:
            cache.pop(key, None)
        self._wire_negative.clear()
        for name in changed:
            for key in self._wire_positive.pop(name, ()):
                cache.pop(key, None)

    def ds_records(self, origin: dns.name.Name) -> list[str]:
        """The DS records of ``origin`` for its parent (SHA-256 of the KSK)."""
        assert self.keyring.ksk is not None
        ds = dns.dnssec.make_ds(origin, self.keyring.ksk.dnskey, "SHA256")
        return [f"{origin.to_text()} {3600} IN DS {ds.to_text()}"]

    # --- answering ---------------------------------------------------------------------

    def lookup_now(self, qname: dns.name.Name, qtype: int, dnssec: bool,
                   recursion: bool = True) -> Resolution | None:
        """An answer available without waiting: from a zone, a refusal, or the cache."""
        zone = self.zone_for(qname)
        if zone is not None:
            found = zone.lookup(qname, qtype, dnssec)
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
        query = event.query
        if query is None:
            flags = event.error.flags if event.error is not None else None
            return error_response(event.message, dns.rcode.FORMERR, flags)
        key = None
        if not query.compressed and not query.signed:
            edns = None if query.edns is None else (query.edns.version, query.edns.dnssec_ok)
            key = (query.qname, query.qtype, query.qclass, query.flags & 0x7910, edns)
            cached = self._wire_cache.get(key)
            if cached is None and self.forwarder is not None:
                # a forwarded answer rendered this very second: its TTLs are still right
                forwarded = self._forward_wire.get(key)
                if forwarded is not None and forwarded[0] == int(self.forwarder.clock()):
                    cached = forwarded[1]
                    self.forwarder.cache.hits += 1
            if cached is not None:
                size = len(query.question)
                return cached[:12] + query.question + cached[12 + size:]
        if query.opcode != dns.opcode.QUERY:
            return error_response(event.message, dns.rcode.NOTIMP, query.flags)
        try:
            request = dns.message.from_wire(event.message)
        except dns.message.UnknownTSIGKey:
            return error_response(event.message, dns.rcode.NOTAUTH, query.flags)
        except dns.exception.DNSException:
            return error_response(event.message, dns.rcode.FORMERR, query.flags)
        if request.edns > 0:
            return self._render(request, Resolution(dns.rcode.BADVERS, [], source="none"))
        question = request.question[0]
        qtype = question.rdtype
        if question.rdclass != IN or qtype in META_REFUSED:
            return self._render(request, Resolution(dns.rcode.REFUSED, [], source="none"))
        if qtype in META_FORMERR:
            return self._render(request, Resolution(dns.rcode.FORMERR, [], source="none"))
        if qtype in META_NOTIMP:
            return self._render(request, Resolution(dns.rcode.NOTIMP, [], source="none"))
        dnssec = bool(request.ednsflags & dns.flags.DO)
        recursion = bool(request.flags & dns.flags.RD)
        resolution = self.lookup_now(question.name, qtype, dnssec, recursion)
        if resolution is not None:
            wire = self._render(request, resolution)
            if key is not None and resolution.source == "zone":
                if len(self._wire_cache) >= WIRE_CACHE_LIMIT:
                    self._clear_wire_cache()
                self._wire_cache[key] = wire
                if resolution.answer:
                    self._wire_positive.setdefault(question.name, []).append(key)
                else:
                    self._wire_negative.append(key)
            elif key is not None and resolution.source == "cache":
                self._remember_forwarded(key, wire)
            return wire
        return self._forward(request, question.name, qtype, dnssec, key)

    async def _forward(self, request: dns.message.Message, qname: dns.name.Name, qtype: int,
                       dnssec: bool, key: Any) -> bytes:
        assert self.forwarder is not None
        resolution = await self.forwarder.resolve(qname, qtype, dnssec, cache_checked=True)
        wire = self._render(request, resolution)
        if key is not None and resolution.source == "upstream" and \
                resolution.rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            self._remember_forwarded(key, wire)
        return wire

    def _remember_forwarded(self, key: Any, wire: bytes) -> None:
        """Keep a forwarded answer's wire form for the rest of this second."""
        assert self.forwarder is not None
        if len(self._forward_wire) >= WIRE_CACHE_LIMIT:
            self._forward_wire.clear()
        self._forward_wire[key] = (int(self.forwarder.clock()), wire)

    def _render(self, request: dns.message.Message, resolution: Resolution) -> bytes:
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

    # --- dns.resolve -----------------------------------------------------------------------

    async def resolve(self, args: ops.ResolveArgs, ctx: RequestContext) -> dict[str, Any]:
        qname = _parse_name(args.name)
        try:
            qtype = dns.rdatatype.from_text(args.type)
        except dns.exception.DNSException:
            raise InvalidRequest(f"{args.type!r} is not a DNS record type",
                                 field="type") from None
        if dns.rdatatype.is_metatype(qtype) or qtype == dns.rdatatype.OPT:
            raise InvalidRequest(f"{args.type} cannot be resolved here", field="type")
        resolution = await self.lookup(qname, qtype, args.dnssec)
        zone = self.zone_for(qname)
        result: dict[str, Any] = {
            "name": qname.to_text(),
            "type": dns.rdatatype.to_text(qtype),
            "rcode": dns.rcode.to_text(dns.rcode.Rcode.make(resolution.rcode)),
            "authoritative": resolution.authoritative,
            "source": resolution.source,
            "answer": _records_out(resolution.answer),
            "authority": _records_out(resolution.authority),
            "dnssec": self._dnssec_status(zone, resolution, args.dnssec),
            "tlsa": None,
        }
        if zone is not None and self.settings.enable_cert_validation:
            result["tlsa"] = self._tlsa_binding(zone, qname)
        return result

    def _dnssec_status(self, zone: Zone | None, resolution: Resolution, dnssec: bool) -> str:
        """``secure``: every RRset of the answer and authority sections verified with the
        zone's DNSKEY set, itself signed by the KSK whose DS the zone exports;
        ``bogus``: one did not; ``unchecked``: DNSSEC was not asked for;
        ``unvalidated``: a forwarded answer (no trust anchor for other zones)."""
        if zone is None:
            return "unvalidated"
        if not dnssec:
            return "unchecked"
        dnskeys = zone.rrsets[(zone.origin, DNSKEY)]
        keys: dict[dns.name.Name, Any] = {zone.origin: dnskeys}
        try:
            check_ksk(zone.origin, dnskeys, zone.sigs[(zone.origin, DNSKEY)],
                      self.ds_records(zone.origin), self.clock())
            sections = resolution.answer + resolution.authority
            sigs = {(r.name, r.covers): r for r in sections if r.rdtype == RRSIG}
            for rrset in sections:
                if rrset.rdtype == RRSIG:
                    continue
                sig = sigs.get((rrset.name, rrset.rdtype))
                if sig is None:
                    return "bogus"
                dns.dnssec.validate(rrset, sig, keys, now=self.clock())
        except dns.exception.ValidationFailure:
            return "bogus"
        return "secure"

    def _tlsa_binding(self, zone: Zone, qname: dns.name.Name) -> dict[str, Any]:
        labels = qname.labels
        host = dns.name.Name(labels[2:]) if labels[:2] == TLSA_PREFIX else qname
        tlsa_name = dns.name.Name((*TLSA_PREFIX, *host.labels))
        text = host.to_text(omit_final_dot=True).lower()
        # the CA's own database, not the zone's view of it: a drift shows as a mismatch
        holders = self.certs.holders(text, self.clock())
        record = max(holders, key=lambda r: r.issued_at) if holders else None
        tlsa = zone.rrset(tlsa_name, TLSA)
        binding: dict[str, Any] = {"name": tlsa_name.to_text(), "serial": None,
                                   "fingerprint": None}
        if record is not None:
            binding["serial"] = record.serial
            binding["fingerprint"] = record.fingerprint
        if tlsa is None:
            binding["status"] = "no_record" if record is not None else "no_certificate"
        elif record is None:
            binding["status"] = "no_certificate"
        else:
            spki = bytes.fromhex(record.spki_sha256)
            ok = any(rd.usage == 3 and rd.selector == 1 and rd.mtype == 1 and rd.cert == spki
                     for rd in tlsa)
            binding["status"] = "match" if ok else "mismatch"
        return binding

    # --- dns.health ----------------------------------------------------------------------

    def health(self, args: ops.HealthArgs, ctx: RequestContext) -> dict[str, Any]:
        now = self.clock()
        upstreams = self.forwarder.health() if self.forwarder is not None else []
        cache = self.forwarder.cache if self.forwarder is not None else None
        looked = (cache.hits + cache.misses) if cache is not None else 0
        zones = []
        for origin in self.origins:
            zone = self.zones[origin]
            zones.append({
                "name": origin.to_text(),
                "serial": zone.serial,
                "rrsets": len(zone.rrsets),
                "signature_expiry": zone.signature_expiry,
                "keys": [{"tag": k.tag, "role": k.role, "state": k.state(now),
                          "algorithm": int(k.dnskey.algorithm)}
                         for k in self.keyring.published(now)],
                "ds": self.ds_records(origin),
            })
        degraded = (any(u["reachable"] is False for u in upstreams)
                    or any(self.zones[o].signature_expiry <= now for o in self.origins))
        return {
            "status": "degraded" if degraded else "ok",
            "upstreams": upstreams,
            "cache": {"size": len(cache) if cache else 0,
                      "capacity": cache.capacity if cache else 0,
                      "hits": cache.hits if cache else 0,
                      "misses": cache.misses if cache else 0,
                      "hit_rate": round(cache.hits / looked, 4) if cache and looked else 0.0},
            "zones": zones,
            "doq": self.doq_stats() if self.doq_stats is not None else {},
        }

    # --- dns.register --------------------------------------------------------------------

    def register_records(self, args: ops.RegisterArgs, ctx: RequestContext) -> dict[str, Any]:
        serial = args.serial.strip().lower()
        if not serial or any(c not in "0123456789abcdef" for c in serial):
            raise InvalidRequest(f"serial {args.serial!r} is not a hexadecimal number",
                                 field="serial")
        serial = serial.lstrip("0") or "0"
        name = args.name.strip().lower().rstrip(".")
        if len(args.addresses) > MAX_REGISTERED_ADDRESSES:
            raise InvalidRequest(f"at most {MAX_REGISTERED_ADDRESSES} addresses",
                                 field="addresses")
        addresses = [_unicast(a) for a in args.addresses]
        now = self.clock()
        record = self.certs.get(serial)
        if record is None:
            raise NotFound(f"no certificate with serial {serial}", field="serial")
        if record.revoked_at is not None or record.not_after <= now:
            raise Unauthorized(f"certificate {serial} is revoked or expired", field="serial")
        if name not in record.names or _is_address(name) or name.startswith("*."):
            raise Unauthorized(f"certificate {serial} does not carry the DNS name {name!r}",
                               field="name")
        if abs(now - args.time) > REGISTER_WINDOW:
            raise Unauthorized(f"the registration statement's time is more than "
                               f"{int(REGISTER_WINDOW)} s from the server's clock", field="time")
        previous = self._registrations.get(name)
        if previous is not None and previous.spki_sha256 == record.spki_sha256 \
                and args.time <= previous.time:
            raise Unauthorized("a registration at this time or later is already recorded "
                               "(replayed statement?)", field="time")
        statement = ops.registration_statement(serial, name, addresses, args.time)
        key = x509.load_der_x509_certificate(record.der).public_key()
        if not verify_signature(key, args.signature, statement):
            raise Unauthorized("the signature does not prove possession of the "
                               "certificate's key", field="signature")
        if addresses:
            self._registrations[name] = Registration(record.spki_sha256, serial, addresses,
                                                     args.time)
        else:
            self._registrations.pop(name, None)
        write_atomic(self.data_dir / "registrations.json", json.dumps(
            {n: vars(r) for n, r in sorted(self._registrations.items())}, indent=1).encode())
        self._pending.add(name)
        self._publish(now)
        current = self.current_certificate(name, now)
        zone = self.zone_for(_absolute(name))
        return {"name": name, "addresses": addresses, "serial": serial,
                "published": current is not None and current.spki_sha256 == record.spki_sha256,
                "zone_serial": zone.serial if zone is not None else 0}

    def register(self, router: Router) -> None:
        router.add(ops.RESOLVE, self.resolve)
        router.add(ops.HEALTH, self.health)
        router.add(ops.REGISTER, self.register_records)


def check_ksk(origin: dns.name.Name, dnskeys: dns.rrset.RRset, sig: dns.rrset.RRset,
              ds_lines: list[str], now: float | None = None) -> None:
    """Validate the DNSKEY set with the key that a DS in ``ds_lines`` names.

    :raises dns.exception.ValidationFailure: no DNSKEY matches a DS, or the set's
        signature does not verify with it.
    """
    anchors = {dns.rrset.from_text(origin, 3600, "IN", "DS",
                                   line.split(" DS ", 1)[1])[0] for line in ds_lines}
    matching = [k for k in dnskeys
                if dns.dnssec.make_ds(origin, k, "SHA256") in anchors]
    if not matching:
        failure: Any = dns.exception.ValidationFailure  # untyped constructor
        raise failure("no DNSKEY matches the DS")
    anchor = dns.rrset.from_rdata_list(origin, dnskeys.ttl, matching)
    anchors_by_name: dict[dns.name.Name, Any] = {origin: anchor}
    dns.dnssec.validate(dnskeys, sig, anchors_by_name, now=now)


def _digestable(rdata: dns.rdata.Rdata) -> bytes:
    return rdata.to_digestable()


def _records_out(rrsets: list[dns.rrset.RRset]) -> list[dict[str, Any]]:
    return [{"name": r.name.to_text(), "type": dns.rdatatype.to_text(r.rdtype), "ttl": r.ttl,
             "data": rd.to_text()} for r in rrsets for rd in r]


def _parse_name(text: str) -> dns.name.Name:
    try:
        name = dns.name.from_text(text.strip() or ".")
    except dns.exception.DNSException as exc:
        raise InvalidRequest(f"{text!r} is not a domain name: {exc}", field="name") from None
    return name


def _unicast(text: str) -> str:
    try:
        address = ipaddress.IPv6Address(text.strip())
    except ValueError:
        raise InvalidRequest(f"{text!r} is not an IPv6 address (TrustChain is IPv6 only)",
                             field="addresses") from None
    if address.ipv4_mapped is not None or address.is_unspecified or address.is_multicast:
        raise InvalidRequest(f"{text!r} cannot identify a host", field="addresses")
    return address.compressed
