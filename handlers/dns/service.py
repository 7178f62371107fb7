"""``dns.*`` ops: resolve, health and register, over the zones and the answers.

The zones (:mod:`._zones`) keep what the TrustChain domains publish; the
answers (:mod:`._answers`) answer queries, DoQ or ``dns.resolve``, from the
zones or the forwarder. This module adds what a client asks of the service
itself: a resolution with its DNSSEC and TLSA verdicts, the service's
health, and AAAA records a certificate holder registers for its names.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Any, Protocol

import dns.dnssec
import dns.exception
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
from cryptography import x509

from protocol import InvalidRequest, NotFound, Unauthorized, Unavailable, error_from_wire
from protocol.decisions import Decision, Register
from protocol.ops import dns as ops
from store import verify_signature

from .._router import RequestContext, Router
from ..ca import is_address
from ._answers import DnsAnswers
from ._names import absolute
from ._resolver import Forwarder, Resolution
from ._zone import Zone, denies_name
from ._zones import TLSA_PREFIX, TrustChainZones, newest_first

DNSKEY = dns.rdatatype.DNSKEY
RRSIG = dns.rdatatype.RRSIG
TLSA = dns.rdatatype.TLSA
REGISTER_WINDOW = 300.0
"""Seconds a registration statement's ``time`` may differ from the server's clock."""
MAX_REGISTERED_ADDRESSES = 16


class Decisions(Protocol):
    """This validator's way to the cluster (``handlers.replica.DecisionLog``)."""

    async def commit(self, decision: Decision, *, checked: bool = False) -> Any:
        """The outcome (``.accepted``, ``.code``...) of ``decision`` once executed."""
        ...

    def now_ms(self) -> int: ...


class DnsService:
    """Answers the ``dns.*`` ops.

    :param decisions: how a registration gets to every validator (a ``register``
        decision); None: this node cannot submit (an observer of the cluster).
    :param doq_stats: the DoQ transport's counters (``dns.health``); the transport is
        not a handler's business, so the wiring passes a function.
    """

    def __init__(self, *, zones: TrustChainZones, answers: DnsAnswers,
                 forwarder: Forwarder | None, decisions: Decisions | None = None,
                 enable_cert_validation: bool = True,
                 doq_stats: Callable[[], dict[str, Any]] = dict,
                 clock: Callable[[], float] = time.time) -> None:
        self.zones = zones
        self.answers = answers
        self.forwarder = forwarder
        self.decisions = decisions
        self.enable_cert_validation = enable_cert_validation
        self.doq_stats = doq_stats
        self.clock = clock

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
        resolution = await self.answers.lookup(qname, qtype, args.dnssec)
        zone = self.zones.zone_for(qname)
        dnssec = self._dnssec_status(zone, resolution, args.dnssec)
        rcode = resolution.rcode  # a validated compact denial is NXDOMAIN (RFC 9824 §4)
        if dnssec == "secure" and denies_name(resolution.authority, qname):
            rcode = dns.rcode.NXDOMAIN
        result: dict[str, Any] = {
            "name": qname.to_text(),
            "type": dns.rdatatype.to_text(qtype),
            "rcode": dns.rcode.to_text(dns.rcode.Rcode.make(rcode)),
            "authoritative": resolution.authoritative,
            "source": resolution.source,
            "answer": _records_out(resolution.answer),
            "authority": _records_out(resolution.authority),
            "dnssec": dnssec,
            "tlsa": None,
        }
        if zone is not None and self.enable_cert_validation:
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
            check_ksk(zone.origin, dnskeys, zone.rrsig(dnskeys),
                      self.zones.ds_records(zone.origin), self.clock())
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
        holders = self.zones.state.holders(text, self.clock())
        record = max(holders, key=newest_first) if holders else None
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
        for origin in self.zones.origins:
            zone = self.zones.zones[origin]
            zones.append({
                "name": origin.to_text(),
                "serial": zone.serial,
                "rrsets": len(zone.rrsets),
                "signature_expiry": zone.signature_expiry,
                "keys": [{"tag": k.tag, "role": k.role, "state": k.state(now),
                          "algorithm": int(k.dnskey.algorithm)}
                         for k in self.zones.keyring.published(now)],
                "ds": self.zones.ds_records(origin),
            })
        degraded = (any(u["reachable"] is False for u in upstreams)
                    or any(z.signature_expiry <= now for z in self.zones.zones.values()))
        return {
            "status": "degraded" if degraded else "ok",
            "upstreams": upstreams,
            "cache": {"size": len(cache) if cache else 0,
                      "capacity": cache.capacity if cache else 0,
                      "hits": cache.hits if cache else 0,
                      "misses": cache.misses if cache else 0,
                      "hit_rate": round(cache.hits / looked, 4) if cache and looked else 0.0},
            "zones": zones,
            "doq": self.doq_stats(),
        }

    # --- dns.register --------------------------------------------------------------------

    async def register_records(self, args: ops.RegisterArgs,
                               ctx: RequestContext) -> dict[str, Any]:
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
        record = self.zones.state.get(serial)
        if record is None:
            raise NotFound(f"no certificate with serial {serial}", field="serial")
        if record.revoked_at is not None or record.not_after <= now:
            raise Unauthorized(f"certificate {serial} is revoked or expired", field="serial")
        if name not in record.names or is_address(name) or name.startswith("*."):
            raise Unauthorized(f"certificate {serial} does not carry the DNS name {name!r}",
                               field="name")
        if abs(now - args.time) > REGISTER_WINDOW:
            raise Unauthorized(f"the registration statement's time is more than "
                               f"{int(REGISTER_WINDOW)} s from the server's clock", field="time")
        previous = self.zones.registration(name)
        if previous is not None and previous.spki_sha256 == record.spki_sha256 \
                and args.time <= previous.time:
            raise Unauthorized("a registration at this time or later is already recorded "
                               "(replayed statement?)", field="time")
        statement = ops.registration_statement(serial, name, addresses, args.time)
        key = x509.load_der_x509_certificate(record.der).public_key()
        if not verify_signature(key, args.signature, statement):
            raise Unauthorized("the signature does not prove possession of the "
                               "certificate's key", field="signature")
        if self.decisions is None:
            raise Unavailable("this node follows the cluster without a validator key; "
                              "register through a validator")
        outcome = await self.decisions.commit(Register(
            serial=serial, name=name, addresses=tuple(addresses), time=args.time,
            signature=args.signature, at_ms=self.decisions.now_ms()), checked=True)
        if not outcome.accepted:
            raise error_from_wire({**outcome.details, "code": outcome.code,
                                   "message": outcome.message})
        self.zones.flush()
        current = self.zones.current_certificate(name, now)
        zone = self.zones.zone_for(absolute(name))
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
