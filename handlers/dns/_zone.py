"""One signed TrustChain zone: its records, the NSEC chain, the RRSIGs, and lookups.

:func:`build_zone` turns the zone's records into a :class:`Zone` that answers
every lookup from memory (at start, after a key roll, to refresh signatures).
Signatures are kept across builds in a :class:`SignatureCache`: an RRset whose
content, signing key and remaining validity are unchanged keeps its RRSIG.

Between builds, :meth:`Zone.apply` updates a zone in place with the new data
of a few owner names (an issuance, a revocation, a registration): only their
RRsets, the NSEC records of added or removed names and of their canonical
predecessors, and the SOA are replaced and signed. Besides those signatures
its cost is a binary search in :attr:`Zone.names` (and a list insertion) per
added or removed name, and the result equals what :func:`build_zone` makes of
the same records (tests/unit/test_dns_incremental.py checks it).

The zone has no delegations, no wildcards and no CNAMEs, so a lookup is one
of: an answer (with its RRSIGs when the DO bit is set); NODATA (the SOA and
the NSEC of the name, or for an empty non-terminal the NSEC that covers it);
or NXDOMAIN (the SOA, the NSEC that covers the name and the one that covers
the wildcard at its closest encloser, RFC 4035 §3.1.3).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.dnssec
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.NSEC
import dns.rdtypes.ANY.SOA
import dns.rrset

from ._keys import KeyRing, ZoneKey
from ._rrsig import rrsig

IN = dns.rdataclass.IN
SOA = dns.rdatatype.SOA
NS = dns.rdatatype.NS
AAAA = dns.rdatatype.AAAA
NSEC = dns.rdatatype.NSEC
RRSIG = dns.rdatatype.RRSIG
DNSKEY = dns.rdatatype.DNSKEY
ANY = dns.rdatatype.ANY

DNSKEY_TTL = 3600
INCEPTION_SKEW = 3600
"""RRSIGs start this many seconds before they are made (validators with slow clocks)."""

_SOA: Any = dns.rdtypes.ANY.SOA.SOA  # rdata classes are untyped
_NSEC: Any = dns.rdtypes.ANY.NSEC.NSEC

Records = dict[dns.name.Name, dict[int, tuple[int, list[dns.rdata.Rdata]]]]
"""owner -> rdtype -> (ttl, rdatas): what a zone holds besides SOA, DNSKEY and NSEC."""
Changes = Mapping[dns.name.Name, Mapping[int, tuple[int, Sequence[dns.rdata.Rdata]]]]
"""owner -> its new data (rdtype -> (ttl, rdatas)), for :meth:`Zone.apply`; an owner
whose mapping is empty has no data any more."""

_OWN_TYPES = frozenset({SOA, DNSKEY, NSEC, RRSIG})
"""The types a zone makes itself (at the apex NS too): not taken from :data:`Changes`."""
_APEX_OWN_TYPES = _OWN_TYPES | {NS}


def next_serial(previous: int | None, now: float) -> int:
    """The SOA serial of a zone changed at ``now``: the time, or ``previous`` + 1 when
    the time is not an RFC 1982 increase of ``previous``."""
    serial = int(now) & 0xFFFFFFFF
    if previous is not None and not previous < serial < previous + (1 << 31):
        serial = (previous + 1) & 0xFFFFFFFF
    return serial


@dataclass(frozen=True, kw_only=True)
class ZoneSettings:
    """What shapes a zone besides its records (from the ``dns.*`` configuration)."""

    record_ttl: int = 300
    negative_ttl: int = 60
    signature_validity: float = 7 * 86400.0
    signature_refresh: float = 3 * 86400.0


@dataclass
class SignatureCache:
    """RRSIGs kept across rebuilds: (owner, rdtype) -> (content, key tag, RRSIG RRset)."""

    entries: dict[tuple[dns.name.Name, int], tuple[Any, int, dns.rrset.RRset]] = field(
        default_factory=dict)
    signed: int = 0
    """Signatures made so far (for tests and statistics)."""


@dataclass
class Lookup:
    """The sections of an authoritative answer."""

    rcode: int
    answer: list[dns.rrset.RRset]
    authority: list[dns.rrset.RRset]
    additional: list[dns.rrset.RRset]


@dataclass
class Zone:
    """A signed zone, ready to answer."""

    origin: dns.name.Name
    serial: int
    rrsets: dict[tuple[dns.name.Name, int], dns.rrset.RRset]
    sigs: dict[tuple[dns.name.Name, int], dns.rrset.RRset]
    names: list[dns.name.Name]
    """Owner names with data, in canonical order (RFC 4034 §6.1)."""
    types: dict[dns.name.Name, list[int]]
    signature_expiry: int
    """The earliest expiration of any RRSIG in the zone."""
    negative_soa: dns.rrset.RRset

    def contains(self, name: dns.name.Name) -> bool:
        return name.is_subdomain(self.origin)

    def rrset(self, name: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
        return self.rrsets.get((name, rdtype))

    def _with_sigs(self, rrsets: Iterable[dns.rrset.RRset], dnssec: bool
                   ) -> list[dns.rrset.RRset]:
        out = []
        for rrset in rrsets:
            out.append(rrset)
            if dnssec:
                sig = self.sigs.get((rrset.name, rrset.rdtype))
                if sig is not None:
                    out.append(sig)
        return out

    def _covering(self, name: dns.name.Name) -> dns.rrset.RRset:
        """The NSEC RRset whose owner is the last name before ``name`` (canonical order)."""
        index = bisect.bisect_left(self.names, name) - 1
        return self.rrsets[(self.names[index], NSEC)]

    def _exists(self, name: dns.name.Name) -> bool:
        """A name with data, or an empty non-terminal (a name with descendants)."""
        if name in self.types:
            return True
        index = bisect.bisect_right(self.names, name)
        return index < len(self.names) and self.names[index].is_subdomain(name)

    def lookup(self, qname: dns.name.Name, qtype: int, dnssec: bool) -> Lookup:
        """Answer ``qname``/``qtype`` (``qname`` must be in the zone)."""
        soa = self.rrsets[(self.origin, SOA)]
        types = self.types.get(qname)
        if types is not None:
            if qtype == ANY:
                sets = [self.rrsets[(qname, t)] for t in types]
                return Lookup(dns.rcode.NOERROR, self._with_sigs(sets, dnssec), [], [])
            rrset = self.rrsets.get((qname, qtype))
            if rrset is not None:
                additional = []
                if qtype == NS:
                    additional = [a for a in (self.rrsets.get((rd.target, AAAA))
                                              for rd in rrset) if a is not None]
                return Lookup(dns.rcode.NOERROR, self._with_sigs([rrset], dnssec), [],
                              self._with_sigs(additional, dnssec))
            proof = [self.rrsets[(qname, NSEC)]] if dnssec else []
            return Lookup(dns.rcode.NOERROR, [], self._negative(soa, proof, dnssec), [])
        if self._exists(qname):  # an empty non-terminal: NODATA
            proof = [self._covering(qname)] if dnssec else []
            return Lookup(dns.rcode.NOERROR, [], self._negative(soa, proof, dnssec), [])
        proof = []
        if dnssec:
            encloser = qname.parent()
            while not self._exists(encloser):
                encloser = encloser.parent()
            proof = [self._covering(qname)]
            wildcard = self._covering(dns.name.Name((b"*", *encloser.labels)))
            if wildcard.name != proof[0].name:
                proof.append(wildcard)
        return Lookup(dns.rcode.NXDOMAIN, [], self._negative(soa, proof, dnssec), [])

    def _negative(self, soa: dns.rrset.RRset, proof: list[dns.rrset.RRset],
                  dnssec: bool) -> list[dns.rrset.RRset]:
        out = [self.negative_soa]
        if dnssec:
            out.append(self.sigs[(self.origin, SOA)])
            out += self._with_sigs(proof, True)
        return out

    # --- updates -------------------------------------------------------------------------

    def apply(self, changes: Changes, *, serial: int, keyring: KeyRing, now: float,
              settings: ZoneSettings, cache: SignatureCache) -> set[dns.name.Name]:
        """Give the owners in ``changes`` their new data and sign what changed, in place.

        ``changes`` maps an owner to all of its data (rdtype -> (ttl, rdatas)); types
        it does not name are removed, and an owner left without data leaves the zone
        and the NSEC chain. Owners outside the zone, and the types the zone makes
        itself (SOA, DNSKEY, NSEC, RRSIG; NS at the apex), are ignored. Replaced are
        the RRsets that differ, the NSEC of every owner whose types changed, of every
        added or removed owner and of its canonical predecessor, and the SOA, which
        takes ``serial``; those are signed with ``keyring``'s signing ZSK at ``now``
        (the DNSKEY set is left as it is: a key change needs :func:`build_zone`).

        :returns: the owner names whose RRsets changed, the apex included (its SOA);
            empty when the data was already as given (the zone, serial included, is
            then unchanged).
        """
        zsk = keyring.signing_zsk(now)
        touched: set[dns.name.Name] = set()
        moved: list[dns.name.Name] = []  # owners added to or removed from the NSEC chain
        expiry = self.signature_expiry
        saved: dict[tuple[dns.name.Name, int], tuple[Any, Any]] = {}
        saved_types: dict[dns.name.Name, list[int] | None] = {}

        def keep(key: tuple[dns.name.Name, int]) -> None:
            if key not in saved:
                saved[key] = (self.rrsets.get(key), self.sigs.get(key))

        def put(rrset: dns.rrset.RRset) -> None:
            nonlocal expiry
            key = (rrset.name, rrset.rdtype)
            sig = _sign(rrset, zsk, self.origin, now, settings, cache)
            keep(key)
            self.rrsets[key] = rrset
            self.sigs[key] = sig
            expiry = min(expiry, int(sig[0].expiration))

        def drop(owner: dns.name.Name, rdtype: int) -> None:
            keep((owner, rdtype))
            self.rrsets.pop((owner, rdtype), None)
            self.sigs.pop((owner, rdtype), None)
            cache.entries.pop((owner, rdtype), None)

        try:
            for owner, sets in changes.items():
                if not owner.is_subdomain(self.origin):
                    continue
                own = _APEX_OWN_TYPES if owner == self.origin else _OWN_TYPES
                old_types = self.types.get(owner, [])
                wanted = {t: v for t, v in sets.items() if t not in own and v[1]}
                changed = False
                for rdtype in old_types:
                    if rdtype not in own and rdtype not in wanted:
                        drop(owner, rdtype)
                        changed = True
                for rdtype, (ttl, rdatas) in wanted.items():
                    rrset = dns.rrset.from_rdata_list(owner, ttl, rdatas)
                    old = self.rrsets.get((owner, rdtype))
                    if old is None or old.ttl != rrset.ttl or old != rrset:
                        put(rrset)
                        changed = True
                if not changed:
                    continue
                touched.add(owner)
                saved_types.setdefault(owner, self.types.get(owner))
                kinds = {t for t in old_types if t != NSEC and (owner, t) in self.rrsets}
                kinds.update(wanted)
                if not kinds:  # no data left: the name leaves the zone
                    drop(owner, NSEC)
                    del self.types[owner]
                    del self.names[bisect.bisect_left(self.names, owner)]
                    moved.append(owner)
                    continue
                if owner not in self.types:
                    bisect.insort(self.names, owner)
                    moved.append(owner)
                self.types[owner] = sorted({*kinds, NSEC})
            if not touched:
                return touched
            names = self.names
            nsec_owners = {owner for owner in touched if owner in self.types}
            for owner in moved:  # the predecessor's NSEC now points to (or past) it
                nsec_owners.add(names[bisect.bisect_left(names, owner) - 1])
            for owner in nsec_owners:
                following = names[(bisect.bisect_left(names, owner) + 1) % len(names)]
                nsec = _nsec_rrset(owner, following, self.types[owner], settings)
                old = self.rrsets.get((owner, NSEC))
                if old is None or old != nsec or old.ttl != nsec.ttl:
                    put(nsec)
                    touched.add(owner)
            soa = _soa_rdata(self.origin, serial, settings)
            put(dns.rrset.from_rdata_list(self.origin, settings.record_ttl, [soa]))
        except BaseException:  # a signature failed (a key store error): undo it all
            self._undo(saved, saved_types, moved)
            raise
        self.negative_soa = _negative_soa(self.origin, soa, settings)
        self.serial = serial
        self.signature_expiry = expiry
        touched.add(self.origin)
        return touched

    def _undo(self, saved: dict[tuple[dns.name.Name, int], tuple[Any, Any]],
              saved_types: dict[dns.name.Name, list[int] | None],
              moved: list[dns.name.Name]) -> None:
        """Put back what :meth:`apply` changed before it failed."""
        for key, (rrset, sig) in saved.items():
            for table, value in ((self.rrsets, rrset), (self.sigs, sig)):
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value
        for owner, kinds in saved_types.items():
            if kinds is None:
                self.types.pop(owner, None)
            else:
                self.types[owner] = kinds
        for owner in moved:
            index = bisect.bisect_left(self.names, owner)
            if index < len(self.names) and self.names[index] == owner:
                del self.names[index]
            else:
                self.names.insert(index, owner)


def _content(ttl: int, rdatas: Iterable[dns.rdata.Rdata], origin: dns.name.Name) -> Any:
    return ttl, tuple(sorted(rd.to_digestable(origin) for rd in rdatas))


def _sign(rrset: dns.rrset.RRset, key: ZoneKey, origin: dns.name.Name, now: float,
          settings: ZoneSettings, cache: SignatureCache) -> dns.rrset.RRset:
    content = _content(rrset.ttl, rrset, origin)
    entry = cache.entries.get((rrset.name, rrset.rdtype))
    if entry is not None:
        old_content, tag, sig = entry
        if (old_content == content and tag == key.tag
                and sig[0].expiration - now > settings.signature_refresh):
            return sig
    signature = rrsig(rrset.name, rrset.rdtype, rrset.ttl, content[1], signer=key.signer,
                      algorithm=key.dnskey.algorithm, key_tag=key.tag, zone=origin,
                      inception=int(now - INCEPTION_SKEW),
                      expiration=int(now + settings.signature_validity))
    sig = dns.rrset.from_rdata(rrset.name, rrset.ttl, signature)
    cache.entries[(rrset.name, rrset.rdtype)] = (content, key.tag, sig)
    cache.signed += 1
    return sig


def _soa_rdata(origin: dns.name.Name, serial: int, settings: ZoneSettings) -> Any:
    return _SOA(IN, SOA, dns.name.Name((b"ns1", *origin.labels)),
                dns.name.Name((b"hostmaster", *origin.labels)),
                serial, 3600, 600, 14 * 86400, settings.negative_ttl)


def _negative_soa(origin: dns.name.Name, soa: Any, settings: ZoneSettings) -> dns.rrset.RRset:
    """The SOA of negative answers: TTL min(SOA TTL, minimum) (RFC 2308 §3)."""
    return dns.rrset.from_rdata(origin, min(settings.record_ttl, settings.negative_ttl), soa)


def _nsec_rrset(owner: dns.name.Name, following: dns.name.Name, types: Iterable[int],
                settings: ZoneSettings) -> dns.rrset.RRset:
    kinds = sorted({*types, NSEC, RRSIG})
    bitmap = dns.rdtypes.ANY.NSEC.Bitmap.from_rdtypes(kinds)  # type: ignore[arg-type]
    return dns.rrset.from_rdata(owner, settings.negative_ttl,
                                _NSEC(IN, NSEC, following, bitmap))


def build_zone(origin: dns.name.Name, records: Records, *, serial: int, keyring: KeyRing,
               now: float, settings: ZoneSettings, cache: SignatureCache,
               cosigners: Sequence[Any] = ()) -> Zone:
    """Sign ``records`` as the zone ``origin`` with ``keyring``'s keys at ``now``.

    SOA, NS (``ns1.ORIGIN``) and DNSKEY are added at the apex, and the NSEC
    chain over every owner name. Records outside the zone are ignored.
    ``cosigners`` are the other signers' DNSKEYs, published beside ours.
    """
    ns_name = dns.name.Name((b"ns1", *origin.labels))
    soa = _soa_rdata(origin, serial, settings)
    data: Records = {name: dict(sets) for name, sets in records.items()
                     if name.is_subdomain(origin)}
    apex = data.setdefault(origin, {})
    apex[SOA] = (settings.record_ttl, [soa])
    apex.setdefault(NS, (settings.record_ttl, [
        dns.rdata.from_text(IN, NS, ns_name.to_text())]))
    published = keyring.published(now)
    apex[DNSKEY] = (DNSKEY_TTL, [k.dnskey for k in published] + list(cosigners))
    names = sorted(data)
    for index, name in enumerate(names):
        nsec = _nsec_rrset(name, names[(index + 1) % len(names)], data[name], settings)
        data[name][NSEC] = (nsec.ttl, list(nsec))
    zsk = keyring.signing_zsk(now)
    assert keyring.ksk is not None
    rrsets: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
    sigs: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
    types: dict[dns.name.Name, list[int]] = {}
    for name in names:
        types[name] = sorted(data[name])
        for rdtype, (ttl, rdatas) in sorted(data[name].items()):
            rrset = dns.rrset.from_rdata_list(name, ttl, rdatas)
            rrsets[(name, rdtype)] = rrset
            key = keyring.ksk if rdtype == DNSKEY else zsk
            sigs[(name, rdtype)] = _sign(rrset, key, origin, now, settings, cache)
    live = set(rrsets)
    for stale in [k for k in cache.entries if k[0].is_subdomain(origin) and k not in live]:
        del cache.entries[stale]
    expiry = min(int(s[0].expiration) for s in sigs.values())
    negative_soa = _negative_soa(origin, soa, settings)
    return Zone(origin=origin, serial=serial, rrsets=rrsets, sigs=sigs, names=names,
                types=types, signature_expiry=expiry, negative_soa=negative_soa)
