"""Incremental zone updates (``Zone.apply`` through ``TrustChainZones``) against full builds.

After random issuances, renewals, revocations, registrations and expiries, in
several zones and in batches coalesced on one event-loop turn, every zone of
the service must hold what :func:`build_zone` makes of the same certificates:
the same names and RRsets, every RRSIG (made when asked for) valid; and every
answer the DoQ path serves (possibly from its wire cache) must be the one a
fresh lookup renders. An issuance signs nothing; the first answer that needs
an RRSIG signs it, later ones take it from the signature cache."""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.dnssec
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TLSA
import dns.rdtypes.IN.AAAA
import pytest

from handlers.dns import TLSA_PREFIX, SignatureCache, _zone, build_zone
from handlers.dns._zone import Records
from handlers.dns._zones import newest_first
from protocol.doq import QueryReceived, parse_query
from store import CertificateRecord

from ..state_fixtures import DAY
from .test_dns_zone import PEER, Env, rdatas, register

IN = dns.rdataclass.IN
AAAA = dns.rdatatype.AAAA
TLSA = dns.rdatatype.TLSA
DNSKEY = dns.rdatatype.DNSKEY
_AAAA: Any = dns.rdtypes.IN.AAAA.AAAA
_TLSA: Any = dns.rdtypes.ANY.TLSA.TLSA

# "-" sorts before every other name of a zone and "~" after: the NSEC chain wraps there.
# a.b.c.trust makes empty non-terminals of b.c.trust and c.trust (until c.trust is issued).
NAMES = ["trust", "-.trust", "0.trust", "a.trust", "www.trust", "a.b.c.trust", "c.trust",
         "ns1.trust", "zz.trust", "~.trust", "*.www.trust",
         "hypermesh", "-.hypermesh", "api.hypermesh", "x.y.hypermesh", "y.hypermesh",
         "ns1.hypermesh", "~.hypermesh", "other.example"]
ADDRESSES = [f"2001:db8::{i}" for i in range(1, 7)]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.state.close()


def _is_address(name: str) -> bool:
    try:
        ipaddress.IPv6Address(name)
    except ValueError:
        return False
    return True


def _content(wire: bytes) -> Any:
    """A response's header and sections, whatever the order of the records (rendering
    shuffles the records of an RRset)."""
    message = dns.message.from_wire(wire)
    return (message.flags, message.rcode(), [
        sorted((r.name, r.rdtype, r.covers, r.ttl, sorted(rd.to_text() for rd in r))
               for r in section)
        for section in (message.answer, message.authority, message.additional)])


class Model:
    """What the zones should hold: the valid certificates (in the order the service
    learnt them) and the registrations, turned into records the way the service
    did before publication became incremental (one pass over every certificate)."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.valid: dict[str, CertificateRecord] = {}
        self.keys: dict[str, Any] = {}
        self.registrations: dict[str, tuple[str, list[str]]] = {}

    def records(self) -> Records:
        now = self.env.clock.now
        current: dict[str, CertificateRecord] = {}
        for record in self.valid.values():
            if record.not_after <= now:
                continue
            for name in record.names:
                if _is_address(name) or name.startswith("*."):
                    continue
                held = current.get(name)
                if held is None or newest_first(record) > newest_first(held):
                    current[name] = record
        ttl = 300
        records: Records = {}
        for name, record in current.items():
            owner = dns.name.from_text(name + ".")
            addresses = [a for a in record.names if _is_address(a)]
            registered = self.registrations.get(name)
            if registered is not None and registered[0] == record.spki_sha256:
                addresses += [a for a in registered[1] if a not in addresses]
            if addresses:
                records.setdefault(owner, {})[AAAA] = (ttl, [_AAAA(IN, AAAA, a)
                                                              for a in addresses])
            tlsa_owner = dns.name.Name((*TLSA_PREFIX, *owner.labels))
            records.setdefault(tlsa_owner, {})[TLSA] = (ttl, [
                _TLSA(IN, TLSA, 3, 1, 1, bytes.fromhex(record.spki_sha256))])
        for origin in ("trust.", "hypermesh."):
            sets = records.setdefault(dns.name.from_text("ns1." + origin), {})
            have = [rd.to_text() for rd in sets[AAAA][1]] if AAAA in sets else []
            sets[AAAA] = (ttl, [_AAAA(IN, AAAA, a)
                                for a in [*have, *(a for a in ["2001:db8::53"] if a not in have)]])
        return records

    def check(self) -> None:
        """Every zone equals a full build of the model's records, and verifies."""
        service = self.env.zones
        records = self.records()
        now = self.env.clock.now
        for origin, zone in service.zones.items():
            subset = {name: {t: (ttl, sorted(rds, key=lambda r: r.to_digestable()))
                             for t, (ttl, rds) in sets.items()}
                      for name, sets in records.items() if name.is_subdomain(origin)}
            expected = build_zone(origin, subset, serial=zone.serial, keyring=service.keyring,
                                  now=now, settings=service.settings.zone,
                                  cache=SignatureCache(), clock=self.env.clock)
            zone.soa()  # made from the serial when first needed
            assert zone.descendants == expected.descendants
            assert zone.types == expected.types
            assert zone.rrsets.keys() == expected.rrsets.keys()
            for key, rrset in expected.rrsets.items():
                got = zone.rrsets[key]
                assert got == rrset and got.ttl == rrset.ttl, key
            assert zone.negative_soa == expected.negative_soa
            assert zone.negative_soa.ttl == expected.negative_soa.ttl
            keys = {origin: zone.rrsets[(origin, DNSKEY)]}
            for rrset in zone.rrsets.values():
                dns.dnssec.validate(rrset, zone.rrsig(rrset), keys, now=now)
            assert now < zone.signature_expiry <= min(
                int(sig[0].expiration) for _, _, sig in zone.signatures.entries.values())

    def check_answers(self, rng: random.Random) -> None:
        """What the DoQ path serves (from the wire cache when it can) is what a fresh
        lookup renders: the cache dropped every answer the last changes touched."""
        service = self.env.answers
        names = [*rng.sample(NAMES[:-1], 5), "_443._quic." + rng.choice(NAMES[:-1]),
                 "nothing.c.trust", "b.c.trust"]
        for name in names:
            for rdtype in rng.sample(["AAAA", "TLSA", "NSEC", "ANY", "SOA", "NS", "TXT"], 3):
                query = dns.message.make_query(name.replace("*", "q"), rdtype,
                                               want_dnssec=rng.random() < 0.8)
                query.id = 0
                wire = query.to_wire()
                served = service.answer_doq(QueryReceived(0, wire, parse_query(wire)), PEER)
                request = dns.message.from_wire(wire)
                question = request.question[0]
                resolution = service.lookup_now(question.name, question.rdtype,
                                                bool(request.ednsflags & dns.flags.DO))
                assert resolution is not None
                fresh = service.render(request, resolution)
                assert isinstance(served, bytes)
                assert _content(served) == _content(fresh), (name, rdtype)

    # --- operations ----------------------------------------------------------------------

    def issue(self, rng: random.Random, names: list[str] | None = None,
              key: Any = None, issued_at: float | None = None) -> None:
        if names is None:
            names = rng.sample(NAMES, rng.randint(1, 3)) + rng.sample(ADDRESSES,
                                                                       rng.randint(0, 2))
        if issued_at is None:
            issued_at = self.env.clock.now - rng.choice([0, 0, 0, 30, 3600])
        record, key = self.env.issue(names, issued_at=issued_at, key=key,
                                     lifetime=rng.choice([2 * 3600, 6 * 3600, DAY]))
        self.valid[record.serial] = record
        self.keys[record.serial] = key

    def renew(self, rng: random.Random) -> None:
        if self.valid:
            old = rng.choice(list(self.valid.values()))
            same_key = self.keys[old.serial] if rng.random() < 0.5 else None
            self.issue(rng, list(old.names), key=same_key)

    def revoke(self, rng: random.Random) -> None:
        if self.valid:
            record = self.valid.pop(rng.choice(list(self.valid)))
            self.env.revoke(record)

    def register(self, rng: random.Random) -> None:
        candidates = [(r, n) for r in self.valid.values() for n in r.names
                      if not _is_address(n) and not n.startswith("*.")]
        if not candidates:
            return
        record, name = rng.choice(candidates)
        addresses = rng.sample(ADDRESSES, rng.randint(0, 2))
        register(self.env, record, self.keys[record.serial], name, addresses)
        if addresses:
            self.registrations[name] = (record.spki_sha256, addresses)
        else:
            self.registrations.pop(name, None)

    def expire(self, rng: random.Random) -> None:
        self.env.clock.now += rng.choice([600, 3600, 4 * 3600])
        self.env.zones.maintain()
        now = self.env.clock.now
        self.valid = {s: r for s, r in self.valid.items() if r.not_after > now}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_incremental_zones_equal_full_builds(env: Env, seed: int) -> None:
    rng = random.Random(seed)
    model = Model(env)
    operations: list[tuple[Callable[[random.Random], None], int]] = [
        (model.issue, 8), (model.renew, 3), (model.revoke, 4), (model.register, 2),
        (model.expire, 1)]
    functions, weights = zip(*operations, strict=True)
    rebuilds = env.zones.rebuilds
    for _step in range(60):
        env.clock.now += rng.choice([0, 1, 1, 7])
        if rng.random() < 0.3:  # a burst, applied on one loop turn
            batch = [rng.choices([model.issue, model.renew, model.revoke], [4, 2, 2])[0]
                     for _ in range(rng.randint(2, 6))]

            async def burst(batch: list[Callable[[random.Random], None]] = batch) -> None:
                for operation in batch:
                    operation(rng)
                await asyncio.sleep(0)

            updates = env.zones.updates
            asyncio.run(burst())
            assert env.zones.updates - updates <= 1
        else:
            rng.choices(functions, weights)[0](rng)
        model.check()
        model.check_answers(rng)
    # two days at most went by: nothing needed a full build (no key roll, no refresh)
    assert env.zones.rebuilds == rebuilds and env.zones.updates > 0


def _signature(response: dns.message.Message) -> Any:
    return next(r for r in response.answer if r.rdtype == dns.rdatatype.RRSIG)[0]


def test_an_issuance_signs_nothing_and_answers_sign_once(env: Env) -> None:
    rng = random.Random(7)
    model = Model(env)
    for i in range(40):
        model.issue(rng, [f"host{i}.trust", f"host{i}.hypermesh", ADDRESSES[i % 6]],
                    issued_at=env.clock.now)
    trust = env.zones.zones[dns.name.from_text("trust.")]
    hypermesh = env.zones.zones[dns.name.from_text("hypermesh.")]
    cache = trust.signatures
    serials = trust.serial, hypermesh.serial
    signed, rebuilds = cache.signed, env.zones.rebuilds
    env.clock.now += 1
    model.issue(rng, ["new.trust", "2001:db8::9"], issued_at=env.clock.now)
    assert cache.signed == signed  # the records changed, nothing was signed
    assert env.zones.rebuilds == rebuilds
    assert env.zones.zones[dns.name.from_text("trust.")] is trust  # updated in place
    assert trust.serial != serials[0] and hypermesh.serial == serials[1]
    # the first DO query signs the AAAA set; the same query again is the rendered
    # answer; another form of it (no RD) renders again with the cached RRSIG
    first = env.ask("new.trust", "AAAA")
    assert cache.signed == signed + 1 and env.validate(first) == 1
    hits = cache.hits
    again = env.ask("new.trust", "AAAA")
    assert cache.signed == signed + 1 and cache.hits == hits
    assert _signature(again) == _signature(first)
    other = env.ask("new.trust", "AAAA", flags=0)
    assert cache.signed == signed + 1 and cache.hits == hits + 1
    assert _signature(other) == _signature(first)
    tlsa = env.ask("_443._quic.new.trust", "TLSA")
    assert cache.signed == signed + 2 and env.validate(tlsa) == 1
    model.check()
    # a renewal with a new key and no address: the AAAA set goes, the TLSA changes;
    # nothing is signed until asked for, then the new TLSA set gets a fresh RRSIG
    env.clock.now += 1
    signed = cache.signed
    model.issue(rng, ["new.trust"], issued_at=env.clock.now)
    assert cache.signed == signed
    assert (dns.name.from_text("new.trust."), AAAA) not in trust.rrsets
    renewed = env.ask("_443._quic.new.trust", "TLSA")
    assert cache.signed == signed + 1 and env.validate(renewed) == 1
    assert _signature(renewed).signature != _signature(tlsa).signature
    assert [r for r in renewed.answer if r.rdtype == TLSA] != \
        [r for r in tlsa.answer if r.rdtype == TLSA]
    gone = env.ask("new.trust", "AAAA")  # NODATA now: SOA and the compact NSEC
    assert not gone.answer and env.validate(gone) == 2
    model.check()
    # an older certificate for a published name changes nothing: same serial
    env.clock.now += 1
    serial = trust.serial
    model.issue(rng, ["host3.trust"], issued_at=env.clock.now - 100)
    assert trust.serial == serial
    model.check()


def test_many_issuances_cost_no_signature(env: Env) -> None:
    """Issuances and revocations in bursts, as blocks bring them: no RRSIG is made."""
    rng = random.Random(11)
    model = Model(env)
    signed = {origin: zone.signatures.signed for origin, zone in env.zones.zones.items()}

    async def block(start: int) -> None:
        for i in range(start, start + 20):
            model.issue(rng, [f"b{i}.trust", f"b{i}.hypermesh", ADDRESSES[i % 6]],
                        issued_at=env.clock.now)
        await asyncio.sleep(0)

    for start in range(0, 100, 20):
        asyncio.run(block(start))
        model.revoke(rng)
    assert {o: z.signatures.signed for o, z in env.zones.zones.items()} == signed
    model.check()  # signs every RRset now, and checks it


def test_a_failed_signature_is_servfail_never_unsigned(env: Env,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The key store failing to sign makes the DO answers that need a new RRSIG SERVFAIL
    (not kept as rendered answers), shows in the health check, and does not stop
    publication; once it signs again, the same queries validate."""
    rng = random.Random(3)
    model = Model(env)
    for i in range(5):
        model.issue(rng, [f"h{i}.trust", ADDRESSES[i % 6]], issued_at=env.clock.now)
    real_rrsig = _zone.rrsig

    def failing_rrsig(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the key store is not answering")

    monkeypatch.setattr(_zone, "rrsig", failing_rrsig)
    env.clock.now += 1
    model.issue(rng, ["~.trust", "2001:db8::9"], issued_at=env.clock.now)  # published
    failed = env.ask("~.trust", "AAAA")
    assert failed.rcode() == dns.rcode.SERVFAIL and not failed.answer
    assert env.zones.problem() is not None and "not answering" in env.zones.problem()
    plain = env.ask("~.trust", "AAAA", dnssec=False)  # no signature needed
    assert [rd.to_text() for r in plain.answer for rd in r] == ["2001:db8::9"]
    monkeypatch.setattr(_zone, "rrsig", real_rrsig)
    signed = env.ask("~.trust", "AAAA")  # the SERVFAIL was not kept
    assert signed.rcode() == dns.rcode.NOERROR and env.validate(signed) == 1
    env.zones.maintain()
    assert env.zones.problem() is None
    model.check()


def test_the_signature_cache_is_bounded_and_signs_again_what_it_dropped(env: Env) -> None:
    """Least recently used first out: a flood of denials of random names keeps at most
    ``limit`` RRSIGs; an RRset whose RRSIG went is signed again when next asked for."""
    service = env.zones
    origin = dns.name.from_text("trust.")
    zone = build_zone(origin, {}, serial=1, keyring=service.keyring, now=env.clock.now,
                      settings=service.settings.zone, cache=SignatureCache(limit=4),
                      clock=env.clock)
    keys = {origin: zone.rrsets[(origin, DNSKEY)]}
    dnskey_sig = zone.rrsig(zone.rrsets[(origin, DNSKEY)])
    for i in range(10):
        found = zone.lookup(dns.name.from_text(f"r{i}.trust."), AAAA, True)
        for rrset, sig in zip(found.authority[::2], found.authority[1::2], strict=True):
            dns.dnssec.validate(rrset, sig, keys, now=env.clock.now)
        assert len(zone.signatures.entries) <= 4
    signed = zone.signatures.signed
    again = zone.rrsig(zone.rrsets[(origin, DNSKEY)])  # dropped long ago: signed again
    assert zone.signatures.signed == signed + 1 and again is not dnskey_sig
    dns.dnssec.validate(zone.rrsets[(origin, DNSKEY)], again, keys, now=env.clock.now)
    assert zone.rrsig(zone.rrsets[(origin, DNSKEY)]) is again  # and kept


def test_a_changed_rrset_is_never_answered_with_its_old_rrsig(env: Env) -> None:
    """An RRset made again of the same (cached) rdatas is the same RRset: its RRSIG is
    served from the cache and the serial stays. One whose data changed (a renewal's new
    address or key, a registration) is signed again when asked for, whatever the cache
    held for the owner, and validates; so does one back to its earlier data."""
    model = Model(env)
    rng = random.Random(5)
    trust = env.zones.zones[dns.name.from_text("trust.")]
    cache = trust.signatures
    model.issue(rng, ["www.trust", "2001:db8::7"], issued_at=env.clock.now)
    key = model.keys[next(iter(model.valid))]
    first = env.ask("www.trust", "AAAA")
    tlsa = env.ask("_443._quic.www.trust", "TLSA")
    assert env.validate(first) == 1 and env.validate(tlsa) == 1
    # a renewal with the same key and address: nothing changed, nothing signed again
    env.clock.now += 1
    serial, signed = trust.serial, cache.signed
    model.issue(rng, ["www.trust", "2001:db8::7"], key=key, issued_at=env.clock.now)
    assert trust.serial == serial
    same = env.ask("www.trust", "AAAA", flags=0)  # not the rendered answer: the cache's
    assert cache.signed == signed and _signature(same) == _signature(first)
    # the same key at a new address: the AAAA set is new and signed again, the TLSA is not
    env.clock.now += 1
    model.issue(rng, ["www.trust", "2001:db8::8"], key=key, issued_at=env.clock.now)
    assert trust.serial != serial
    moved = env.ask("www.trust", "AAAA")
    assert rdatas(moved, AAAA) == ["2001:db8::8"] and env.validate(moved) == 1
    assert cache.signed == signed + 1 and _signature(moved) != _signature(first)
    again = env.ask("_443._quic.www.trust", "TLSA", flags=0)
    assert cache.signed == signed + 1 and _signature(again) == _signature(tlsa)
    # a registration adds an address to the certificate's: signed again
    holder = next(r for r in model.valid.values() if "2001:db8::8" in r.names)
    register(env, holder, key, "www.trust", ["2001:db8::100"])
    model.registrations["www.trust"] = (holder.spki_sha256, ["2001:db8::100"])
    registered = env.ask("www.trust", "AAAA")
    assert rdatas(registered, AAAA) == ["2001:db8::100", "2001:db8::8"]
    assert env.validate(registered) == 1 and cache.signed == signed + 2
    # revoking both renewals brings the first certificate back (the same key: registered
    # addresses too): a valid RRSIG of that data
    env.clock.now += 1
    for record in [r for r in model.valid.values() if r.issued_at > env.clock.now - 3]:
        model.valid.pop(record.serial)
        env.revoke(record)
    back = env.ask("www.trust", "AAAA")
    assert rdatas(back, AAAA) == ["2001:db8::100", "2001:db8::7"]
    assert env.validate(back) == 1 and cache.signed == signed + 3
    model.check()


def test_zone_apply_keeps_an_rrset_given_again(env: Env) -> None:
    """``Zone.apply`` with the very rdatas an RRset holds, or with equal new ones, changes
    nothing (same RRset object, same serial, the RRSIG kept); other data replaces it and
    drops its RRSIG."""
    service = env.zones
    origin = dns.name.from_text("trust.")
    owner = dns.name.from_text("www.trust.")
    held = [_AAAA(IN, AAAA, "2001:db8::1"), _AAAA(IN, AAAA, "2001:db8::2")]
    zone = build_zone(origin, {owner: {AAAA: (300, held)}}, serial=1,
                      keyring=service.keyring, now=env.clock.now,
                      settings=service.settings.zone, cache=SignatureCache(), clock=env.clock)
    rrset = zone.rrsets[(owner, AAAA)]
    sig = zone.rrsig(rrset)
    assert zone.apply({owner: {AAAA: (300, held)}}, serial=2) == set()
    equal = [_AAAA(IN, AAAA, "2001:db8::2"), _AAAA(IN, AAAA, "2001:DB8::1")]
    assert zone.apply({owner: {AAAA: (300, equal)}}, serial=2) == set()
    assert zone.rrsets[(owner, AAAA)] is rrset and zone.serial == 1
    assert zone.rrsig(rrset) is sig
    assert zone.apply({owner: {AAAA: (60, held)}}, serial=2) == {owner, origin}  # the TTL
    assert zone.apply({owner: {AAAA: (60, held[:1])}}, serial=3) == {owner, origin}
    changed = zone.rrsets[(owner, AAAA)]
    assert [rd.to_text() for rd in changed] == ["2001:db8::1"] and zone.serial == 3
    signed = zone.signatures.signed
    new_sig = zone.rrsig(changed)
    assert zone.signatures.signed == signed + 1 and new_sig != sig
    dns.dnssec.validate(changed, new_sig, {origin: zone.rrsets[(origin, DNSKEY)]},
                        now=env.clock.now)
