"""One TrustChain zone: its records, lookups, and the RRSIGs made when first asked for.

:func:`build_zone` turns the zone's records into a :class:`Zone` that answers
every lookup from memory (at start, after a key change). Between builds,
:meth:`Zone.apply` updates a zone in place with the new data of a few owner
names (an issuance, a revocation, a registration): their RRsets are
replaced and the serial changes, nothing is signed and no RRset is made: the
zone keeps the new data as wire forms (:class:`ZoneRRsets`) and makes an RRset
when an answer first reads it. Besides that its cost is a count per ancestor
(:attr:`Zone.descendants`) of an added or removed name, and the result equals
what :func:`build_zone` makes of the same records (tests/unit/test_dns_incremental.py
checks it).

Signing is lazy: an answer to a query with the DO bit signs each RRset it
carries the first time it is asked for, with this validator's key, and keeps
the RRSIG in a bounded :class:`SignatureCache` (least recently used first
out) beside the RRset it signed; a changed RRset, another key, or a signature
within ``signature_refresh`` of its expiration is signed again on use. Every
validator of a cluster executes every issuance, so what the zone does at an
issuance is paid once per validator; what it does at a query, only by the
validator asked.

Denial of existence is compact (RFC 9824), so there is no NSEC chain: a
negative answer carries one NSEC at the query name whose next name is
``\\000.QNAME``, its type bitmap the types at the name (NODATA), nothing but
RRSIG and NSEC (an empty non-terminal), or RRSIG, NSEC and NXNAME (a name that
does not exist), signed on the fly like any RRset. The zone has no
delegations, no wildcards and no CNAMEs.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.NSEC
import dns.rdtypes.ANY.SOA
import dns.rrset

from ._keys import KeyRing, ZoneKey
from ._names import above, folded
from ._rdatas import WireRdatas
from ._rrsets import ZoneRRsets
from ._rrsig import rrsig

IN = dns.rdataclass.IN
SOA = dns.rdatatype.SOA
NS = dns.rdatatype.NS
AAAA = dns.rdatatype.AAAA
NSEC = dns.rdatatype.NSEC
RRSIG = dns.rdatatype.RRSIG
DNSKEY = dns.rdatatype.DNSKEY
ANY = dns.rdatatype.ANY
NXNAME = 128
"""The meta-type that marks a compact denial's NSEC as "this name does not exist" (RFC 9824 §2)."""

DNSKEY_TTL = 3600
INCEPTION_SKEW = 3600
"""RRSIGs start this many seconds before they are made (validators with slow clocks)."""
SIGNATURE_CACHE_LIMIT = 20_000
"""RRSIGs kept per zone at most (with the RRsets they sign, about 1.7 kB each: a flood
of queries for random names fills it with denials), the least recently used first out."""

_SOA: Any = dns.rdtypes.ANY.SOA.SOA  # rdata classes are untyped
_NSEC: Any = dns.rdtypes.ANY.NSEC.NSEC

Rdatas = Sequence[dns.rdata.Rdata] | WireRdatas
"""The rdatas of an RRset: made, or their wire forms (made when the RRset is read)."""
Records = dict[dns.name.Name, dict[int, tuple[int, Rdatas]]]
"""owner -> rdtype -> (ttl, rdatas): what a zone holds besides SOA and DNSKEY."""
Changes = Mapping[dns.name.Name, Mapping[int, tuple[int, Rdatas]]]
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
    """RRSIGs made on first use: (owner, rdtype, TTL) -> (the RRset signed, key tag, RRSIG
    RRset), least recently used first; kept across rebuilds of the zone. (The TTL is part
    of the key: the SOA of negative answers has a shorter one than the SOA RRset.)"""

    limit: int = SIGNATURE_CACHE_LIMIT
    entries: OrderedDict[tuple[dns.name.Name, int, int],
                         tuple[dns.rrset.RRset, int, dns.rrset.RRset]
                         ] = field(default_factory=OrderedDict)
    signed: int = 0
    """Signatures made so far (for tests and statistics)."""
    hits: int = 0
    """Signatures served from the cache."""
    earliest: int | None = None
    """The earliest expiration of any signature handed out since :meth:`refresh` (an
    evicted one may still sit in a rendered answer)."""

    def get(self, rrset: dns.rrset.RRset, key: ZoneKey, now: float,
            settings: ZoneSettings) -> dns.rrset.RRset | None:
        """The cached RRSIG of exactly ``rrset`` by ``key``, if not due for refresh."""
        where = (rrset.name, rrset.rdtype, rrset.ttl)
        entry = self.entries.get(where)
        if entry is None:
            return None
        signed, tag, sig = entry
        if signed is not rrset and signed != rrset:
            return None
        if tag != key.tag or sig[0].expiration - now <= settings.signature_refresh:
            return None
        self.entries.move_to_end(where)
        self.hits += 1
        return sig

    def put(self, rrset: dns.rrset.RRset, tag: int, sig: dns.rrset.RRset) -> None:
        where = (rrset.name, rrset.rdtype, rrset.ttl)
        self.entries[where] = (rrset, tag, sig)
        self.entries.move_to_end(where)
        while len(self.entries) > self.limit:
            self.entries.popitem(last=False)
        expiration = int(sig[0].expiration)
        if self.earliest is None or expiration < self.earliest:
            self.earliest = expiration
        self.signed += 1

    def forget(self, name: dns.name.Name, rdtype: int, ttl: int) -> None:
        """Forget the signature of the RRset ``name``/``rdtype`` with ``ttl`` (replaced or
        removed)."""
        self.entries.pop((name, rdtype, ttl), None)

    def refresh(self, now: float, settings: ZoneSettings) -> None:
        """Forget the signatures due for refresh at ``now`` (the caller drops every rendered
        answer, which may carry them); :attr:`earliest` is then that of those left."""
        due = [k for k, (_, _, sig) in self.entries.items()
               if sig[0].expiration - now <= settings.signature_refresh]
        for key in due:
            del self.entries[key]
        self.earliest = min((int(sig[0].expiration) for _, _, sig in self.entries.values()),
                            default=None)


@dataclass
class Lookup:
    """The sections of an authoritative answer."""

    rcode: int
    answer: list[dns.rrset.RRset]
    authority: list[dns.rrset.RRset]
    additional: list[dns.rrset.RRset]


@dataclass
class Zone:
    """A zone, ready to answer; it signs what its answers carry when first asked for."""

    origin: dns.name.Name
    serial: int
    rrsets: ZoneRRsets
    descendants: dict[tuple[bytes, ...], int]
    """name (its lower-cased labels: cheaper to hash than a ``Name``) -> how many owner
    names with data are below it, for the names that have any (so a name that is here
    but not in ``types`` is an empty non-terminal)."""
    types: dict[dns.name.Name, list[int]]
    negative_soa: dns.rrset.RRset
    ksk: ZoneKey
    """Signs the DNSKEY RRset."""
    zsk: ZoneKey
    """Signs every other RRset (the ZSK signing when the zone was built: a key change
    builds the zone again)."""
    settings: ZoneSettings
    signatures: SignatureCache
    clock: Callable[[], float] = time.time
    soa_serial: int = -1
    """The serial the SOA RRsets (``rrsets``' and :attr:`negative_soa`) carry: made again
    from :attr:`serial` when first needed after a change (:meth:`soa`)."""
    origin_labels: tuple[bytes, ...] = field(init=False)
    """:attr:`origin`'s labels, lower-cased (which names are in the zone)."""

    def __post_init__(self) -> None:
        self.origin_labels = folded(self.origin)

    def contains(self, name: dns.name.Name) -> bool:
        return name.is_subdomain(self.origin)

    def rrset(self, name: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
        if rdtype == SOA:
            self.soa()
        found: dns.rrset.RRset | None = self.rrsets.get((name, rdtype))
        return found

    def soa(self) -> dns.rrset.RRset:
        """The SOA RRset, with :attr:`negative_soa` brought up to :attr:`serial` first: an
        issuance changes the serial only, the RRsets (whose rdata dnspython hashes as it
        builds them) are made when an answer needs them."""
        if self.soa_serial != self.serial:
            soa = _soa_rdata(self.origin, self.serial, self.settings)
            self.rrsets[(self.origin, SOA)] = dns.rrset.from_rdata(
                self.origin, self.settings.record_ttl, soa)
            self.negative_soa = _negative_soa(self.origin, soa, self.settings)
            self.soa_serial = self.serial
        return self.rrsets[(self.origin, SOA)]

    @property
    def signature_expiry(self) -> int:
        """The earliest expiration of the RRSIGs this zone handed out since they were last
        refreshed (with none yet, that of one made now)."""
        earliest = self.signatures.earliest
        if earliest is None:
            return int(self.clock() + self.settings.signature_validity)
        return earliest

    def rrsig(self, rrset: dns.rrset.RRset) -> dns.rrset.RRset:
        """The RRSIG RRset of ``rrset``: from the cache, or signed now (and cached).

        :raises Exception: whatever the key store raises when it cannot sign.
        """
        key = self.ksk if rrset.rdtype == DNSKEY else self.zsk
        now = self.clock()
        settings = self.settings
        sig = self.signatures.get(rrset, key, now, settings)
        if sig is not None:
            return sig
        signature = rrsig(rrset.name, rrset.rdtype, rrset.ttl,
                          [rd.to_digestable(self.origin) for rd in rrset], signer=key.signer,
                          algorithm=key.dnskey.algorithm, key_tag=key.tag, zone=self.origin,
                          inception=int(now - INCEPTION_SKEW),
                          expiration=int(now + settings.signature_validity))
        sig = dns.rrset.from_rdata(rrset.name, rrset.ttl, signature)
        self.signatures.put(rrset, key.tag, sig)
        return sig

    def _with_sigs(self, rrsets: Iterable[dns.rrset.RRset], dnssec: bool
                   ) -> list[dns.rrset.RRset]:
        out = []
        for rrset in rrsets:
            out.append(rrset)
            if dnssec:
                out.append(self.rrsig(rrset))
        return out

    def _exists(self, name: dns.name.Name) -> bool:
        """A name with data, or an empty non-terminal (a name with descendants)."""
        if name in self.types:
            return True
        return folded(name) in self.descendants

    def compact_nsec(self, qname: dns.name.Name, kinds: Iterable[int]) -> dns.rrset.RRset:
        """The NSEC of a compact answer at ``qname`` (RFC 9824 §3): the next name is
        ``\\000.QNAME``, the immediate successor of ``qname`` in canonical order, so the
        record covers no other name; ``kinds`` and RRSIG, NSEC in the type bitmap."""
        rdtypes: Any = sorted({*kinds, NSEC, RRSIG})
        bitmap = dns.rdtypes.ANY.NSEC.Bitmap.from_rdtypes(rdtypes)
        return dns.rrset.from_rdata(qname, self.settings.negative_ttl,
                                    _NSEC(IN, NSEC, _successor(qname), bitmap))

    def lookup(self, qname: dns.name.Name, qtype: int, dnssec: bool) -> Lookup:
        """Answer ``qname``/``qtype`` (``qname`` must be in the zone).

        Without the DO bit a name that does not exist is NXDOMAIN; with it, the compact
        answer is NOERROR with the NXNAME NSEC (RFC 9824 §3.1: an NXDOMAIN whose NSEC
        matches the name would be bogus to a validator that does not know NXNAME).
        """
        if qname == self.origin and self.soa_serial != self.serial:
            self.soa()  # the apex's RRsets include the SOA
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
            return self._denial(qname, qtype, types, dnssec, dns.rcode.NOERROR)
        if self._exists(qname):  # an empty non-terminal: NODATA
            return self._denial(qname, qtype, (), dnssec, dns.rcode.NOERROR)
        return self._denial(qname, qtype, (NXNAME,), dnssec,
                            dns.rcode.NOERROR if dnssec else dns.rcode.NXDOMAIN)

    def _denial(self, qname: dns.name.Name, qtype: int, kinds: Iterable[int], dnssec: bool,
                rcode: int) -> Lookup:
        """NODATA (or NXDOMAIN without DO): the SOA and, with DO, the compact NSEC at
        ``qname``; a query for NSEC itself gets that NSEC as its answer."""
        if self.soa_serial != self.serial:
            self.soa()
        if not dnssec:
            return Lookup(rcode, [], [self.negative_soa], [])
        nsec = self.compact_nsec(qname, kinds)
        if qtype == NSEC:
            return Lookup(rcode, self._with_sigs([nsec], True), [], [])
        return Lookup(rcode, [], self._with_sigs([self.negative_soa, nsec], True), [])

    # --- updates -------------------------------------------------------------------------

    def apply(self, changes: Changes, *, serial: int) -> set[dns.name.Name]:
        """Give the owners in ``changes`` their new data, in place; nothing is signed.

        ``changes`` maps an owner to all of its data (rdtype -> (ttl, rdatas)); types
        it does not name are removed, and an owner left without data leaves the zone.
        Owners outside the zone, and the types the zone makes itself (SOA, DNSKEY,
        NSEC, RRSIG; NS at the apex), are ignored. The zone takes ``serial`` when
        anything changed (its SOA RRsets are made when next needed: :meth:`soa`). The
        cached signatures of replaced RRsets are dropped (they would not be served
        anyway: the cache compares the RRset). Rdatas given as :class:`WireRdatas` are
        compared and kept as wire forms, the RRset made when first read; an RRset given
        the very rdata objects it holds, in the same order, is recognised as unchanged
        without being made again.

        :returns: the owner names whose RRsets changed, the apex included (its SOA);
            empty when the data was already as given (the zone, serial included, is
            then unchanged).
        """
        touched: set[dns.name.Name] = set()
        rrsets, types, signatures = self.rrsets, self.types, self.signatures
        origin_labels = self.origin_labels
        apex = len(origin_labels)
        for owner, sets in changes.items():
            labels = folded(owner)
            depth = len(labels)
            if depth < apex or labels[depth - apex:] != origin_labels:  # (not within)
                continue
            own = _APEX_OWN_TYPES if depth == apex else _OWN_TYPES
            old_types = types.pop(owner, None)  # (put back below if it keeps any data)
            kinds: list[int] = []  # the types it has after the change
            changed = False
            if old_types is not None:
                for rdtype in old_types:
                    if rdtype in own:
                        kinds.append(rdtype)
                    elif rdtype not in sets or not sets[rdtype][1]:
                        read_ttl = rrsets.remove((owner, rdtype))
                        if read_ttl is not None:
                            signatures.forget(owner, rdtype, read_ttl)
                        changed = True
            for rdtype, (ttl, rdatas) in sets.items():
                if rdtype in own or not rdatas:
                    continue
                kinds.append(rdtype)
                replaced, read_ttl = rrsets.replace((owner, rdtype), ttl, rdatas)
                if replaced:
                    if read_ttl is not None:
                        signatures.forget(owner, rdtype, read_ttl)
                    changed = True
            if not changed:
                if old_types is not None:
                    types[owner] = old_types
                continue
            touched.add(owner)
            if not kinds:  # no data left: the name leaves the zone
                _count_below(self.descendants, above(owner)[:depth - apex], -1)
                continue
            if old_types is None:
                _count_below(self.descendants, above(owner)[:depth - apex], 1)
            kinds.sort()
            types[owner] = kinds
        if not touched:
            return touched
        self.serial = serial
        touched.add(self.origin)
        return touched


def _count_below(descendants: dict[tuple[bytes, ...], int],
                 ancestors: tuple[tuple[bytes, ...], ...], step: int) -> None:
    """Add ``step`` to the count of each of ``ancestors`` (lower-cased labels: a name's,
    from its parent down to the origin, :func:`above`)."""
    get = descendants.get
    for ancestor in ancestors:
        count = get(ancestor, 0) + step
        if count:
            descendants[ancestor] = count
        else:
            del descendants[ancestor]


def denies_name(authority: Iterable[dns.rrset.RRset], qname: dns.name.Name) -> bool:
    """Whether ``authority`` holds a compact denial that ``qname`` does not exist: an NSEC
    at ``qname`` with NXNAME in its type bitmap (RFC 9824 §4)."""
    for rrset in authority:
        if rrset.rdtype == NSEC and rrset.name == qname:
            for window, bitmap in rrset[0].windows:
                if window == 0 and len(bitmap) > NXNAME // 8 and \
                        bitmap[NXNAME // 8] & (0x80 >> NXNAME % 8):
                    return True
    return False


def _successor(name: dns.name.Name) -> dns.name.Name:
    """The immediate successor of ``name`` in canonical order (RFC 4471 §3.1.2): the name
    with a ``\\000`` label in front or, when that is too long, the name whose first label
    has its last octet (lower-cased) increased: no name lies between them here, since a
    name of the maximum length has no descendants."""
    try:
        return dns.name.Name((b"\x00", *name.labels))
    except dns.name.NameTooLong:
        first = name.labels[0].lower()
        if not first or first[-1] == 0xFF:
            raise
        return dns.name.Name((first[:-1] + bytes([first[-1] + 1]), *name.labels[1:]))


def _soa_rdata(origin: dns.name.Name, serial: int, settings: ZoneSettings) -> Any:
    return _SOA(IN, SOA, dns.name.Name((b"ns1", *origin.labels)),
                dns.name.Name((b"hostmaster", *origin.labels)),
                serial, 3600, 600, 14 * 86400, settings.negative_ttl)


def _negative_soa(origin: dns.name.Name, soa: Any, settings: ZoneSettings) -> dns.rrset.RRset:
    """The SOA of negative answers: TTL min(SOA TTL, minimum) (RFC 2308 §3)."""
    return dns.rrset.from_rdata(origin, min(settings.record_ttl, settings.negative_ttl), soa)


def build_zone(origin: dns.name.Name, records: Records, *, serial: int, keyring: KeyRing,
               now: float, settings: ZoneSettings, cache: SignatureCache,
               cosigners: Sequence[Any] = (), clock: Callable[[], float] = time.time) -> Zone:
    """The zone ``origin`` of ``records``, to be signed with ``keyring``'s keys at ``now``.

    SOA, NS (``ns1.ORIGIN``) and DNSKEY are added at the apex; records outside
    the zone are ignored. ``cosigners`` are the other signers' DNSKEYs, published
    beside ours. Only the DNSKEY RRset is signed here (so that a key that cannot
    sign shows at once); the rest is signed when first asked for, at ``clock()``.
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
    rrsets = ZoneRRsets()
    types: dict[dns.name.Name, list[int]] = {}
    for name, sets in data.items():
        kinds = [t for t in sorted(sets) if t not in (NSEC, RRSIG) and sets[t][1]]
        if not kinds:
            continue
        types[name] = kinds
        for rdtype in kinds:
            ttl, rdatas = sets[rdtype]
            rrsets.replace((name, rdtype), ttl, rdatas)
    assert keyring.ksk is not None
    descendants: dict[tuple[bytes, ...], int] = {}
    for name in types:
        if name != origin:
            _count_below(descendants, above(name)[:len(name) - len(origin)], 1)
    zone = Zone(origin=origin, serial=serial, rrsets=rrsets, descendants=descendants,
                types=types,
                negative_soa=_negative_soa(origin, soa, settings), ksk=keyring.ksk,
                zsk=keyring.signing_zsk(now), settings=settings, signatures=cache,
                clock=clock, soa_serial=serial)
    zone.rrsig(rrsets[(origin, DNSKEY)])
    return zone
