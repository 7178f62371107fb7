"""The TrustChain zones, kept up to date with the certificates the CA issued.

One zone per TrustChain domain, made from three sources: the certificates
the CA issued (for every DNS name of a valid certificate, AAAA records for
the certificate's IPv6 addresses and a TLSA ``3 1 1`` record, SHA-256 of its
SubjectPublicKeyInfo, at ``_443._quic.NAME``), the AAAA records certificate
holders registered with ``dns.register``, and the nameserver's own
``ns1.DOMAIN``. When several valid certificates carry a name, the newest one
is published (a renewal replaces its predecessor's records). Revocation and
expiry remove the records. The zones are signed with the keys of
:class:`KeyRing`.

Publication is incremental: for every name the zones keep the valid
certificates that carry it and the one published; an issuance, revocation,
expiry or registration marks its names, and at the end of the event-loop turn
(so that a burst of issuances is applied together) only the owner names of
the marked names are recomputed and given to :meth:`Zone.apply`, which
replaces what changed and signs nothing: the zones sign an RRset when an
answer first needs its RRSIG (:class:`SignatureCache`). What a publication
needs of a name (its owner names, the zones they are in) is worked out once
per name (:class:`Owner`), the names and addresses of a certificate once; the
AAAA and TLSA data go to the zone as wire forms (:class:`WireRdatas`), made
into rdatas (once per address and per key, :class:`RdataCache`) and RRsets
only when an answer reads them: every validator publishes every certificate,
only the one asked answers. The zones are built
whole (:func:`build_zone`) at start and when the DNSKEY set or the signing key
changes; the maintenance pass drops the signatures due for refresh. Every
change drops the rendered answers it made stale (:class:`RenderedAnswers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import dns.dnssec
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from store import CertificateRecord, StateDatabase

from ..ca import CertificateIssued, CertificateRevoked, is_address
from ._keys import FLAGS_KSK, KeyRing
from ._names import absolute, folded, prefixed, spelled, within
from ._rdatas import RdataCache
from ._rendered import RenderedAnswers
from ._zone import Rdatas, Records, SignatureCache, Zone, ZoneSettings, build_zone, next_serial

log = logging.getLogger("trustchain.dns")

IN = dns.rdataclass.IN
AAAA = dns.rdatatype.AAAA
TLSA = dns.rdatatype.TLSA
DNSKEY = dns.rdatatype.DNSKEY
TLSA_PREFIX = (b"_443", b"_quic")
"""TLSA records live at ``_443._quic.NAME``: port 443, transport QUIC (RFC 6698 §3)."""
CACHE_LIMIT = 65_536
"""Names whose owners are kept at most (the cache is emptied when full)."""


@dataclass(frozen=True, kw_only=True)
class DnsSettings:
    """The ``dns.*`` configuration the zones and the service use."""

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


class Owner(NamedTuple):
    """An owner name of the zones and what its records are made from, worked out once per
    certificate name (each has two: NAME and ``_443._quic.NAME``)."""

    name: dns.name.Name
    text: str
    """The name as certificates and registrations spell it (no final dot)."""
    origins: tuple[dns.name.Name, ...]
    """The zones it is in."""
    nameserver: bool
    """``ns1.ORIGIN``: the nameserver's addresses are published there too."""
    tlsa_host: str | None
    """For ``_443._quic.HOST``: HOST, whose certificate's key its TLSA record holds."""


def _split_names(record: CertificateRecord) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names of ``record`` that own records (no addresses, no wildcards), and its
    IPv6 addresses."""
    names: list[str] = []
    addresses: list[str] = []
    for name in record.names:
        if is_address(name):
            addresses.append(name)
        elif not name.startswith("*."):
            names.append(name)
    return tuple(names), tuple(addresses)


def newest_first(record: CertificateRecord) -> tuple[float, int, int]:
    """The order in which a name's holders supersede each other: issuance time, then the
    place in the chain (one block may issue a name to two keys at one time)."""
    return (record.issued_at, record.height, record.position)


def _digestable(rdata: Any) -> bytes:
    return bytes(rdata.to_digestable())


class TrustChainZones:
    """The signed zones of the TrustChain domains.

    :param state: the replicated state: the certificates and the registrations.
    :param keyring: the DNSSEC keys.
    :param rendered: the answers rendered from these zones, dropped as they go stale.
    :param cosigners: the DNSKEYs (RDATA wire) every validator announced, ours included:
        each validator signs with its own keys and publishes all of them, so one DS
        set validates answers from any validator (RFC 8901, model 2).
    :param clock: wall-clock seconds (certificate validity, signatures, key roll).
    """

    def __init__(self, *, settings: DnsSettings, state: StateDatabase, keyring: KeyRing,
                 rendered: RenderedAnswers, cosigners: Callable[[], list[bytes]] = list,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.state = state
        self.keyring = keyring
        self.cosigners = cosigners
        self.clock = clock
        self._rendered = rendered
        self.origins = [absolute(d) for d in settings.domains]
        self._origin_labels = [(o, folded(o)) for o in self.origins]
        self._ns_names: set[dns.name.Name] = {prefixed((b"ns1",), o) for o in self.origins}
        self._ns_owners = [self._owner(n, n.to_text(omit_final_dot=True))
                           for n in self._ns_names]
        self._owners: dict[str, tuple[Owner, Owner]] = {}
        """name -> its owners (NAME, ``_443._quic.NAME``), at most :data:`CACHE_LIMIT`."""
        self._rdatas = RdataCache()
        self._ttl = int(settings.zone.record_ttl)
        self.zones: dict[dns.name.Name, Zone] = {}
        self._signatures = {origin: SignatureCache() for origin in self.origins}
        """The RRSIGs of each zone, kept across its rebuilds."""
        self._valid: dict[str, CertificateRecord] = {}
        self._names: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        """serial -> the names and the addresses of the valid certificate (``_split_names``)."""
        self._holders: dict[str, dict[str, CertificateRecord]] = {}
        """name -> serial -> the valid certificates carrying it (in ``_valid``'s order)."""
        self._current: dict[str, CertificateRecord] = {}
        """name -> the certificate the zones publish for it (the newest of its holders)."""
        self._pending: set[str] = set()
        """Names whose holders or registration changed since the zones were updated."""
        self._expiries: list[tuple[float, str]] = []
        """A heap of (not_after, serial); entries of certificates gone are skipped."""
        self._key_state: tuple[tuple[tuple[str, ...], str], tuple[bytes, ...]] | None = None
        """The DNSKEY set and the signing ZSK the zones were built with."""
        self._registrations: dict[str, Registration] = {}
        self._scheduled = False
        self.failure: str | None = None
        """Why the latest zone update, maintenance or signature failed (a key store error,
        most likely); None once an update or maintenance succeeds."""
        self.rebuilds = 0
        """Zones built whole (start, key changes)."""
        self.updates = 0
        """Incremental updates (batches of issuances, revocations, registrations)."""

    # --- lifetime ------------------------------------------------------------------------

    def start(self) -> None:
        """Load the keys, the valid certificates and the registrations; build the zones."""
        now = self.clock()
        self.keyring.load(now)
        for record in self.state.valid_certificates(now):
            self._add(record)
        for name, (spki, serial, addresses, at) in self.state.registrations().items():
            self._registrations[name] = Registration(spki, serial, addresses, at)
        self._rebuild(now)

    async def run(self, interval: float = 60.0) -> None:
        """Call :meth:`maintain` every ``interval`` seconds, and when a certificate expires."""
        while True:
            now = self.clock()
            try:
                self.maintain(now)
            except Exception:
                log.exception("DNS maintenance failed; retrying")  # kept by maintain()
            expiry = self._next_expiry()
            wait = interval if expiry is None or expiry <= now else min(interval,
                                                                        expiry - now + 0.05)
            await asyncio.sleep(max(wait, 0.05))

    def maintain(self, now: float | None = None) -> list[str]:
        """Expire certificates, roll keys and refresh signatures due at ``now``."""
        with self._failures():
            return self._maintain(self.clock() if now is None else now)

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        """Keep why an update failed (``problem``) until one succeeds."""
        try:
            yield
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            raise
        self.failure = None

    def problem(self) -> str | None:
        """None if the zones are up to date and signed, else why not (the ``dns`` health
        check)."""
        if self.failure is None:
            return None
        return f"the zones could not be updated or signed: {self.failure}"

    def _maintain(self, now: float) -> list[str]:
        done = []
        expired = self._expire(now)
        if expired:
            done.append(f"expired {expired}")
        rolled = self.keyring.roll(now)
        if rolled:
            done.append("keys")
        if rolled or self._keys_now(now) != self._key_state:  # (or a build failed)
            self._rebuild(now)
        elif self._pending:
            self._publish(now)
        stale = [z for z in self.zones.values()
                 if z.signature_expiry - now <= self.settings.zone.signature_refresh]
        if stale:  # signed again when next asked for; rendered answers may carry them
            for zone in stale:
                zone.signatures.refresh(now, self.settings.zone)
            self._rendered.clear()
            done.append("signatures")
        return done

    # --- certificates ------------------------------------------------------------------

    def certificate_issued(self, event: CertificateIssued) -> None:
        """A publisher of the CA: publish the certificate's records."""
        record = event.record
        if record.revoked_at is None and record.not_after > self.clock():
            self._add(record)
            self._schedule()

    def certificate_revoked(self, event: CertificateRevoked) -> None:
        """A publisher of the CA: withdraw the certificate's records."""
        if self._remove(event.record.serial):
            self._schedule()

    def _add(self, record: CertificateRecord) -> None:
        if record.serial not in self._valid:
            heapq.heappush(self._expiries, (record.not_after, record.serial))
        self._valid[record.serial] = record
        names, _ = self._names[record.serial] = _split_names(record)
        for name in names:
            self._holders.setdefault(name, {})[record.serial] = record
            self._pending.add(name)

    def _remove(self, serial: str) -> bool:
        record = self._valid.pop(serial, None)
        if record is None:
            return False
        names, _ = self._names.pop(serial)
        for name in names:
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
        now = self.clock()
        with self._failures():
            if self._key_state is not None and self._keys_now(now) != self._key_state:
                self._rebuild(now)  # another validator's keys came or went
            elif self._pending:
                self._publish(now, keys_checked=True)

    def flush(self) -> None:
        """Publish what is pending now rather than at the end of the event-loop turn."""
        self._flush()

    def current_certificate(self, name: str, now: float | None = None
                            ) -> CertificateRecord | None:
        """The newest valid certificate that carries ``name``, as the zones publish it."""
        now = self.clock() if now is None else now
        if name in self._holders:
            candidates: Any = self._holders[name].values()
        else:  # an address or a wildcard: not indexed
            candidates = [r for r in self._valid.values() if name in r.names]
        holders = [r for r in candidates if r.not_after > now and r.revoked_at is None]
        return max(holders, key=newest_first) if holders else None

    # --- zones -----------------------------------------------------------------------

    def zone_for(self, name: dns.name.Name) -> Zone | None:
        best = None
        for origin, zone in self.zones.items():
            if name.is_subdomain(origin) and (best is None or len(origin) > len(best.origin)):
                best = zone
        return best

    def _owner(self, name: dns.name.Name, text: str, tlsa_host: str | None = None) -> Owner:
        """``name`` (spelled ``text``) as an :class:`Owner` (``tlsa_host`` when known)."""
        if tlsa_host is None and name.labels[:len(TLSA_PREFIX)] == TLSA_PREFIX:
            tlsa_host = dns.name.Name(name.labels[len(TLSA_PREFIX):]).to_text(
                omit_final_dot=True)
        labels = folded(name)
        return Owner(name, text, tuple([o for o, key in self._origin_labels
                                        if within(labels, key)]),
                     name in self._ns_names, tlsa_host)

    def _owners_of(self, name: str) -> tuple[Owner, Owner]:
        """The owners of ``name``'s records: NAME and ``_443._quic.NAME``."""
        found: tuple[Owner, Owner] | None = self._owners.get(name)
        if found is None:
            owner = absolute(name)
            text = spelled(owner, name)
            tlsa = prefixed(TLSA_PREFIX, owner)
            if len(self._owners) >= CACHE_LIMIT:
                self._owners.clear()
            found = self._owners[name] = (
                self._owner(owner, text),
                self._owner(tlsa, spelled(tlsa, "_443._quic." + text), tlsa_host=text))
        return found

    def _settle(self) -> list[Owner]:
        """Publish the newest holder of every pending name; the owners to recompute."""
        owners: list[Owner] = []
        for name in self._pending:
            holders = self._holders.get(name)
            if holders:
                self._current[name] = max(holders.values(), key=newest_first)
            else:
                self._current.pop(name, None)
            owners += self._owners_of(name)
        self._pending.clear()
        return owners

    def _owner_records(self, owner: Owner) -> dict[int, tuple[int, Rdatas]]:
        """All the records of ``owner`` (AAAA, TLSA), from the published certificates, as
        wire forms (their rdatas are made when an answer needs them)."""
        ttl = self._ttl
        sets: dict[int, tuple[int, Rdatas]] = {}
        record = self._current.get(owner.text)
        addresses: list[str] = []
        if record is not None:
            addresses = list(self._names[record.serial][1])
            registered = self._registrations.get(owner.text)
            if registered is not None and registered.spki_sha256 == record.spki_sha256:
                addresses += registered.addresses
        if owner.nameserver:
            addresses += self.settings.nameserver_addresses
        if addresses:
            sets[AAAA] = (ttl, self._rdatas.aaaa_set(addresses))
        if owner.tlsa_host is not None:
            held = self._current.get(owner.tlsa_host)
            if held is not None:
                sets[TLSA] = (ttl, self._rdatas.tlsa_set(held.spki_sha256))
        return sets

    def _records(self) -> dict[dns.name.Name, Records]:
        """Every record of each zone, from the published certificates."""
        self._settle()
        owners: dict[dns.name.Name, Owner] = {o.name: o for o in self._ns_owners}
        for name in self._current:
            for owner in self._owners_of(name):
                owners.setdefault(owner.name, owner)
        records: dict[dns.name.Name, Records] = {origin: {} for origin in self.origins}
        for owner in owners.values():
            sets = self._owner_records(owner)
            if sets:
                for origin in owner.origins:
                    records[origin][owner.name] = sets
        return records

    def _keys_now(self, now: float) -> tuple[tuple[tuple[str, ...], str], tuple[bytes, ...]]:
        """The DNSKEY set and the signing ZSK at ``now`` (their names, and the cosigners'
        DNSKEYs): a change builds the zones whole."""
        return self.keyring.names_at(now), tuple(sorted(self.cosigners()))

    def _cosigner_keys(self, now: float) -> list[Any]:
        """The other validators' DNSKEYs (ours are the keyring's)."""
        own = {_digestable(k.dnskey) for k in self.keyring.published(now)}
        return [dns.rdata.from_wire(IN, DNSKEY, wire, 0, len(wire))
                for wire in sorted(set(self.cosigners()) - own)]

    def _rebuild(self, now: float) -> None:
        """Build every zone whole (its DNSKEY set signed; the rest is signed on use)."""
        self._expire(now)
        records = self._records()
        cosigners = self._cosigner_keys(now)
        for origin in self.origins:
            previous = self.zones.get(origin)
            serial = next_serial(previous.serial if previous is not None else None, now)
            self.zones[origin] = build_zone(origin, records[origin], serial=serial,
                                            keyring=self.keyring, now=now,
                                            settings=self.settings.zone,
                                            cache=self._signatures[origin],
                                            cosigners=cosigners, clock=self.clock)
        self._key_state = self._keys_now(now)
        self._rendered.clear()
        self.rebuilds += 1

    def _publish(self, now: float, *, keys_checked: bool = False) -> None:
        """Bring the zones up to date with the pending names (and expiries) at ``now``
        (``keys_checked``: the caller found the DNSKEY set and signing key unchanged)."""
        if self._expiries and self._expiries[0][0] <= now:
            self._expire(now)
        if not self._pending or self._key_state is None:  # (not started: start() builds)
            return
        if not keys_checked and self._keys_now(now) != self._key_state:
            self._rebuild(now)  # the DNSKEY set or the signing key changed: build it all
            return
        changes: dict[dns.name.Name, dict[dns.name.Name, dict[int, tuple[int, Rdatas]]]] = {}
        for owner in self._settle():
            sets = self._owner_records(owner)
            for origin in owner.origins:
                subset = changes.get(origin)
                if subset is None:
                    subset = changes[origin] = {}
                subset[owner.name] = sets
        changed: set[dns.name.Name] = set()
        for origin in self.origins:
            subset = changes.get(origin)
            if subset:
                zone = self.zones[origin]
                changed |= zone.apply(subset, serial=next_serial(zone.serial, now))
        if changed:
            self._rendered.invalidate(changed)
        self.updates += 1

    def signing_failed(self, exc: Exception) -> None:
        """An answer could not be signed (it was SERVFAIL): the ``dns`` health check says
        why until the next update or maintenance succeeds."""
        self.failure = f"{type(exc).__name__}: {exc}"

    def ds_records(self, origin: dns.name.Name) -> list[str]:
        """The DS records of ``origin`` for its parent: SHA-256 of every validator's KSK
        (ours first), so that a resolver validates answers from any of them."""
        assert self.keyring.ksk is not None
        ksks = [self.keyring.ksk.dnskey] + [k for k in self._cosigner_keys(self.clock())
                                            if k.flags & FLAGS_KSK == FLAGS_KSK]
        return [f"{origin.to_text()} {3600} IN DS {dns.dnssec.make_ds(origin, k, 'SHA256')}"
                for k in ksks]

    # --- registrations -------------------------------------------------------------

    def registration(self, name: str) -> Registration | None:
        return self._registrations.get(name)

    def registration_changed(self, name: str) -> None:
        """A publisher of the CA: the state's registration for ``name`` changed."""
        found = self.state.registrations().get(name)
        if found is None:
            self._registrations.pop(name, None)
        else:
            self._registrations[name] = Registration(*found)
        self._pending.add(name)
        self._schedule()
