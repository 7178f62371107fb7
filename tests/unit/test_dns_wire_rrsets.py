"""RRsets kept as wire forms until read (``handlers.dns._rrsets``, ``_rdatas.WireRdatas``),
owner names hashed without dnspython's loop, the key names worked out once per span of
the key schedule, and ``is_address``'s C fast path: each must give what the slow way
gives, and a changed RRset must never be answered with its old data or old RRSIG."""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path
from typing import Any

import dns.dnssec
import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from handlers.ca import is_address
from handlers.dns import KeyRing, SignatureCache, build_zone
from handlers.dns._names import absolute, prefixed
from handlers.dns._rdatas import RdataCache, WireRdatas
from handlers.dns._rrsets import ZoneRRsets
from store import DataDirectory, SoftwareKeyStore

from ..state_fixtures import DAY
from .test_dns_zone import Env

IN = dns.rdataclass.IN
AAAA = dns.rdatatype.AAAA
TLSA = dns.rdatatype.TLSA
DNSKEY = dns.rdatatype.DNSKEY
SPKI = "ab" * 32
OWNER = dns.name.from_text("www.trust.")


@pytest.fixture
def env(tmp_path: Path) -> Any:
    e = Env(tmp_path)
    yield e
    e.state.close()


def _rrset(*addresses: str) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(OWNER, 300, "IN", "AAAA", list(addresses))


def test_wire_forms_are_dnspythons() -> None:
    cache = RdataCache()
    aaaa = cache.aaaa_set(["2001:db8::10", "2001:DB8::9", "2001:db8:0::9"])
    made = aaaa.make()
    assert aaaa.wires == tuple(rd.to_digestable() for rd in made) and len(aaaa) == 2
    assert [rd.to_text() for rd in made] == ["2001:db8::9", "2001:db8::10"]
    tlsa = cache.tlsa_set(SPKI)
    assert tlsa.wires == (dns.rdata.from_text(IN, TLSA, f"3 1 1 {SPKI}").to_digestable(),)
    assert tlsa.make() == [cache.tlsa(SPKI)]
    with pytest.raises(dns.exception.SyntaxError):
        cache.aaaa_set(["192.0.2.1"])
    with pytest.raises(ValueError):
        cache.tlsa_set("ab" * 31)  # not a SHA-256
    with pytest.raises(ValueError):
        cache.tlsa_set("not hex")


def test_an_rrset_is_made_when_first_read_and_kept_until_replaced() -> None:
    cache = RdataCache()
    made: list[int] = []

    def counted(addresses: list[str]) -> WireRdatas:
        wire = cache.aaaa_set(addresses)
        return WireRdatas(wire.wires, lambda: made.append(1) or wire.make())

    rrsets = ZoneRRsets()
    key = (OWNER, AAAA)
    assert rrsets.replace(key, 300, counted(["2001:db8::1"])) == (True, None)
    assert key in rrsets and len(rrsets) == 1 and not made  # nothing made yet
    first = rrsets[key]
    assert made == [1] and first == _rrset("2001:db8::1") and first.ttl == 300
    assert rrsets.get(key) is first and rrsets[key] is first and made == [1]
    # the same data again (other objects, other spelling): unchanged, still that RRset
    assert rrsets.replace(key, 300, counted(["2001:DB8:0::1"])) == (False, None)
    assert rrsets[key] is first
    # other data, or another TTL: replaced; the new RRset is made when read
    assert rrsets.replace(key, 300, counted(["2001:db8::2"])) == (True, 300)
    assert rrsets[key] == _rrset("2001:db8::2") and rrsets[key] is not first
    assert rrsets.replace(key, 60, counted(["2001:db8::2"])) == (True, 300)
    assert rrsets[key].ttl == 60
    assert rrsets.remove(key) == 60 and key not in rrsets and rrsets.remove(key) is None
    assert rrsets.get(key) is None


def test_wire_forms_and_rdatas_compare_with_each_other() -> None:
    """A zone built from rdatas and updated with wire forms (or the other way round) sees
    equal data as unchanged and other data as a change."""
    cache = RdataCache()
    rrsets = ZoneRRsets()
    key = (OWNER, AAAA)
    rrsets.replace(key, 300, [dns.rdata.from_text(IN, AAAA, "2001:db8::1")])
    given = rrsets[key]
    assert rrsets.replace(key, 300, cache.aaaa_set(["2001:db8::1"])) == (False, None)
    assert rrsets[key] is given
    assert rrsets.replace(key, 300, cache.aaaa_set(["2001:db8::3"])) == (True, 300)
    assert rrsets.replace(key, 300, [dns.rdata.from_text(IN, AAAA, "2001:db8::3")]) == \
        (False, None)
    assert rrsets.replace(key, 300, [dns.rdata.from_text(IN, AAAA, "2001:db8::4")]) == \
        (True, 300)
    assert rrsets[key] == _rrset("2001:db8::4")


def test_a_zone_answers_changed_wire_data_with_the_new_rrset_and_a_new_rrsig(
        env: Env) -> None:
    """``Zone.apply`` with wire forms: the lookup after a change carries the new data, and
    its RRSIG is made for it (never the cached one of the old data), and validates."""
    service = env.zones
    origin = dns.name.from_text("trust.")
    cache = RdataCache()
    zone = build_zone(origin, {OWNER: {AAAA: (300, cache.aaaa_set(["2001:db8::1"]))}},
                      serial=1, keyring=service.keyring, now=env.clock.now,
                      settings=service.settings.zone, cache=SignatureCache(),
                      clock=env.clock)
    keys = {origin: zone.rrsets[(origin, DNSKEY)]}
    before = zone.lookup(OWNER, AAAA, True).answer
    assert before[0] == _rrset("2001:db8::1")
    dns.dnssec.validate(before[0], before[1], keys, now=env.clock.now)
    assert zone.apply({OWNER: {AAAA: (300, cache.aaaa_set(["2001:db8::1"]))}},
                      serial=2) == set() and zone.serial == 1
    assert zone.lookup(OWNER, AAAA, True).answer[1] is before[1]  # the cached RRSIG
    assert zone.apply({OWNER: {AAAA: (300, cache.aaaa_set(["2001:db8::2"]))}},
                      serial=2) == {OWNER, origin}
    after = zone.lookup(OWNER, AAAA, True).answer
    assert after[0] == _rrset("2001:db8::2") and after[1] != before[1]
    dns.dnssec.validate(after[0], after[1], keys, now=env.clock.now)
    with pytest.raises(dns.dnssec.ValidationFailure):
        dns.dnssec.validate(after[0], before[1], keys, now=env.clock.now)
    assert zone.apply({OWNER: {}}, serial=3) == {OWNER, origin}
    assert not zone.lookup(OWNER, AAAA, True).answer and OWNER not in zone.types


def test_owner_names_hash_as_dnspythons_at_every_length() -> None:
    """dnspython's hash is an integer of 9 to the power of the name's length: Python
    keeps it as is below 2**63 and hashes it above; both sides of that line, and
    prefixed names, hash alike."""
    rng = random.Random(4)
    for length in range(1, 120):
        text = "".join(rng.choice("abcXYZ019-_") for _ in range(length))
        text = ".".join(text[i:i + 40] for i in range(0, length, 40))
        expected = dns.name.from_text(text + ".")
        name = absolute(text)
        assert hash(name) == hash(expected) and name == expected, text
        tlsa = prefixed((b"_443", b"_QUIC"), name)
        other = dns.name.Name((b"_443", b"_quic", *expected.labels))
        assert hash(tlsa) == hash(other) and tlsa == other and other == tlsa
        assert name != tlsa and tlsa != expected


def test_key_names_are_worked_out_again_at_each_schedule_time(tmp_path: Path) -> None:
    data = DataDirectory(tmp_path)
    ring = KeyRing(keystore=SoftwareKeyStore(tmp_path / "keys"),
                   schedule=data.dns_key_schedule(), zsk_lifetime=30 * DAY, prepublish=DAY)
    start = 1_767_225_600.0
    ring.load(start)

    def slow(now: float) -> tuple[tuple[str, ...], str]:
        return tuple(k.name for k in ring.published(now)), ring.signing_zsk(now).name

    first = ring.names_at(start)
    assert first == slow(start) == (("dns-ksk", "dns-zsk-1"), "dns-zsk-1")
    assert ring.names_at(start + 10) is first  # the same span: not worked out again
    ring.roll(start + 29 * DAY)  # the successor is published a day before it signs
    for now in (start + 29 * DAY, start + 30 * DAY - 1, start + 30 * DAY,
                start + 31 * DAY - 1, start + 31 * DAY, start + 29 * DAY, start):
        assert ring.names_at(now) == slow(now), now
    assert ring.names_at(start + 30 * DAY)[1] == "dns-zsk-2"
    assert ring.names_at(start + 31 * DAY) == (("dns-ksk", "dns-zsk-2"), "dns-zsk-2")


def test_is_address_fast_path_agrees_with_ipaddress() -> None:
    def slow(name: str) -> bool:
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return False
        return ":" in name

    rng = random.Random(9)
    names = ["2001:db8::1", "::", "::1", "1::", "::ffff:192.0.2.1", "fe80::1%eth0",
             "2001:DB8::A", "0001:0002:0003:0004:0005:0006:0007:0008", ":::", "1:::2",
             "1::2::3", "12345::", "g::1", "www.trust", "a:b", "2001:db8::1.2.3.04"]
    for _ in range(20_000):
        groups = [rng.choice(["", "0", "1", "ab", "fff", "ffff", "fffff", "Ab12"])
                  for _ in range(rng.randint(1, 10))]
        names.append(":".join(groups).replace(":", rng.choice([":", "::"]), 1))
    for name in names:
        assert is_address(name) == slow(name), name
