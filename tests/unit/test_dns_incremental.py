"""Incremental zone updates (``Zone.apply`` through ``TrustChainZones``) against full builds.

After random issuances, renewals, revocations, registrations and expiries, in
several zones and in batches coalesced on one event-loop turn, every zone of
the service must hold what :func:`build_zone` makes of the same certificates:
the same names, RRsets and NSEC chain, every RRSIG valid; and every answer the
DoQ path serves (possibly from its wire cache) must be the one a fresh lookup
renders."""

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

from ..state_fixtures import DAY, make_record
from .test_dns_zone import PEER, Env, register

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
                                  cache=SignatureCache())
            assert zone.names == expected.names
            assert zone.types == expected.types
            assert zone.rrsets.keys() == expected.rrsets.keys()
            for key, rrset in expected.rrsets.items():
                got = zone.rrsets[key]
                assert got == rrset and got.ttl == rrset.ttl, key
            assert zone.negative_soa == expected.negative_soa
            assert zone.negative_soa.ttl == expected.negative_soa.ttl
            assert zone.sigs.keys() == expected.sigs.keys()
            keys = {origin: zone.rrsets[(origin, DNSKEY)]}
            for key, rrset in zone.rrsets.items():
                dns.dnssec.validate(rrset, zone.sigs[key], keys, now=now)
            assert now < zone.signature_expiry <= min(int(s[0].expiration)
                                                      for s in zone.sigs.values())

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


def test_one_issuance_signs_only_what_changes(env: Env) -> None:
    rng = random.Random(7)
    model = Model(env)
    for i in range(40):
        model.issue(rng, [f"host{i}.trust", f"host{i}.hypermesh", ADDRESSES[i % 6]],
                    issued_at=env.clock.now)
    trust = env.zones.zones[dns.name.from_text("trust.")]
    hypermesh = env.zones.zones[dns.name.from_text("hypermesh.")]
    serials = trust.serial, hypermesh.serial
    signed, rebuilds = env.zones._signatures.signed, env.zones.rebuilds
    env.clock.now += 1
    model.issue(rng, ["new.trust", "2001:db8::9"], issued_at=env.clock.now)
    # AAAA and TLSA of the name, the NSEC of both owners and of the predecessor, the SOA
    assert env.zones._signatures.signed - signed == 6
    assert env.zones.rebuilds == rebuilds
    assert env.zones.zones[dns.name.from_text("trust.")] is trust  # updated in place
    assert trust.serial != serials[0] and hypermesh.serial == serials[1]
    model.check()
    # a renewal with a new key and no address: the AAAA set goes, the TLSA changes
    env.clock.now += 1
    signed = env.zones._signatures.signed
    model.issue(rng, ["new.trust"], issued_at=env.clock.now)
    assert env.zones._signatures.signed - signed == 3  # TLSA, NSEC of new.trust, SOA
    assert (dns.name.from_text("new.trust."), AAAA) not in trust.rrsets
    model.check()
    # an older certificate for a published name changes nothing: no signature, same serial
    env.clock.now += 1
    signed, serial = env.zones._signatures.signed, trust.serial
    model.issue(rng, ["host3.trust"], issued_at=env.clock.now - 100)
    assert env.zones._signatures.signed == signed and trust.serial == serial
    model.check()


@pytest.mark.parametrize("fail_after", [0, 1, 3, 5])
def test_a_failed_signature_leaves_the_zone_as_it_was(env: Env, fail_after: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(fail_after)
    model = Model(env)
    for i in range(10):
        model.issue(rng, [f"h{i}.trust", ADDRESSES[i % 6]], issued_at=env.clock.now)
    revoked = next(iter(model.valid.values()))
    zone = env.zones.zones[dns.name.from_text("trust.")]
    before = (list(zone.names), dict(zone.types), dict(zone.rrsets), dict(zone.sigs),
              zone.serial, zone.negative_soa, zone.signature_expiry)
    real_sign = _zone._sign
    calls = 0

    def failing_sign(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > fail_after:
            raise RuntimeError("the key store is not answering")
        return real_sign(*args, **kwargs)

    monkeypatch.setattr(_zone, "_sign", failing_sign)
    env.clock.now += 1

    # an issuance and a revocation, published together
    record, _ = make_record(["~.trust", "2001:db8::9"], issued_at=env.clock.now)
    env.zones._add(record)
    env.zones._remove(revoked.serial)
    model.valid[record.serial] = record
    model.valid.pop(revoked.serial)
    with pytest.raises(RuntimeError):
        env.zones._publish(env.clock.now)
    assert calls == fail_after + 1
    assert (zone.names, zone.types, zone.rrsets, zone.sigs, zone.serial, zone.negative_soa,
            zone.signature_expiry) == before
    assert env.zones.zones[dns.name.from_text("trust.")] is zone
    monkeypatch.setattr(_zone, "_sign", real_sign)
    env.zones.maintain()  # the next maintenance publishes what failed
    model.check()
