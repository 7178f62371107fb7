"""The DNS service without sockets: zones built from real certificates in the real
replicated state (SQLite, written block by block as the CA's state machine does),
signed with keys from a real keystore (software or SoftHSM2), every answer taken
from the DoQ wire path and validated with dnspython; registrations committed
through a real state machine."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import random
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.dnssec
import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from handlers import RequestContext
from handlers.ca import CertificateIssued, CertificateRevoked, Publishers
from handlers.dns import (
    DnsAnswers,
    DnsService,
    DnsSettings,
    KeyRing,
    RenderedAnswers,
    TrustChainZones,
    ZoneSettings,
)
from protocol import InvalidRequest, NotFound, Peer, Unauthorized, Unavailable
from protocol.doq import PADDING_BLOCK, QueryReceived, parse_query
from protocol.ops import dns as ops
from store import CertificateRecord, DataDirectory, SoftwareKeyStore, open_keystore

from ..compact_denial import NXNAME, compact_nsec, effective_rcode
from ..softhsm import SoftHsmToken
from ..state_fixtures import (
    DAY,
    SoleValidator,
    add_certificate,
    make_record,
    revoke_certificate,
)

DOMAINS = ("trust", "hypermesh")
START = 1_767_225_600.0
PEER = Peer(address="::1", port=5353, alpn="doq")
CTX = RequestContext(peer=PEER, op="dns.register", received_at=START)


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Env:
    """One node's DNS service over the replicated state in ``tmp``: the zones, the
    answers, the ops, and a state machine that commits its registrations."""

    def __init__(self, tmp: Path, keystore: Any = None, algorithm: str = "ed25519",
                 clock: Clock | None = None, key_prefix: str = "dns") -> None:
        self.tmp = tmp
        self.clock = clock or Clock()
        self.data = DataDirectory(tmp)
        self.state = self.data.state()
        self.keystore = keystore or SoftwareKeyStore(tmp / "keys")
        self.algorithm = algorithm
        self.key_prefix = key_prefix
        self.service = self.new_service()

    def new_service(self) -> DnsService:
        """The zones, answers and ops of a (re)started node: ``self.zones``,
        ``self.answers``, ``self.decisions`` and the returned service."""
        keyring = KeyRing(keystore=self.keystore, schedule=self.data.dns_key_schedule(),
                          algorithm=self.algorithm, zsk_lifetime=30 * DAY, prepublish=DAY,
                          key_prefix=self.key_prefix)
        rendered = self.rendered = RenderedAnswers()
        self.zones = TrustChainZones(
            settings=DnsSettings(domains=DOMAINS,
                                 nameserver_addresses=("2001:db8::53",),
                                 zone=ZoneSettings(record_ttl=300, negative_ttl=60)),
            state=self.state, keyring=keyring, rendered=rendered, clock=self.clock)
        self.zones.start()
        self.answers = DnsAnswers(zones=self.zones, forwarder=None, rendered=rendered)
        self.decisions = SoleValidator(state=self.state, data=self.data,
                                       publishers=Publishers([("dns", self.zones)]),
                                       clock=self.clock, domains=DOMAINS)
        return DnsService(zones=self.zones, answers=self.answers, forwarder=None,
                          decisions=self.decisions, clock=self.clock)

    def issue(self, names: list[str], **kwargs: Any) -> tuple[CertificateRecord, Any]:
        """Commit a certificate for ``names`` to the state and publish it, as the state
        machine does after the block; the record as stored, and its key."""
        kwargs.setdefault("issued_at", self.clock.now)
        record, key = make_record(names, **kwargs)
        stored = add_certificate(self.state, record)
        self.zones.certificate_issued(CertificateIssued(record=stored, logged=None))
        return stored, key

    def revoke(self, record: CertificateRecord, *, publish: bool = True) -> CertificateRecord:
        """Commit the revocation of ``record`` now; tell the zones unless ``publish`` is
        False (a node that was down: only its state knows)."""
        revoked = revoke_certificate(self.state, record.serial, self.clock.now)
        if publish:
            self.zones.certificate_revoked(CertificateRevoked(record=revoked))
        return revoked

    def ask(self, name: str, rdtype: str = "AAAA", *, dnssec: bool = True,
            raw: bool = False, **kwargs: Any) -> Any:
        query = dns.message.make_query(name, rdtype, want_dnssec=dnssec, **kwargs)
        query.id = 0
        wire = query.to_wire()
        answer = self.answers.answer_doq(QueryReceived(0, wire, parse_query(wire)), PEER)
        assert isinstance(answer, bytes)
        return answer if raw else dns.message.from_wire(answer)

    def ds(self, zone: str = "trust.") -> set[Any]:
        lines = self.zones.ds_records(dns.name.from_text(zone))
        return {dns.rrset.from_text(zone, 3600, "IN", "DS", line.split(" DS ", 1)[1])[0]
                for line in lines}

    def validate(self, response: dns.message.Message, zone: str = "trust.") -> int:
        """Validate every RRset of answer and authority like a resolver with the DS
        as its trust anchor; returns how many RRsets were checked."""
        origin = dns.name.from_text(zone)
        keys_msg = self.ask(zone, "DNSKEY")
        dnskeys = keys_msg.find_rrset(keys_msg.answer, origin, dns.rdataclass.IN,
                                      dns.rdatatype.DNSKEY)
        dnskey_sig = keys_msg.find_rrset(keys_msg.answer, origin, dns.rdataclass.IN,
                                         dns.rdatatype.RRSIG, dns.rdatatype.DNSKEY)
        anchors = [k for k in dnskeys if dns.dnssec.make_ds(origin, k, "SHA256") in self.ds(zone)]
        assert anchors, "no DNSKEY matches the DS"
        dns.dnssec.validate(dnskeys, dnskey_sig,
                            {origin: dns.rrset.from_rdata_list(origin, 3600, anchors)},
                            now=self.clock.now)
        checked = 0
        for section in (response.answer, response.authority):
            sigs = {(r.name, r.covers): r for r in section if r.rdtype == dns.rdatatype.RRSIG}
            for rrset in section:
                if rrset.rdtype == dns.rdatatype.RRSIG:
                    continue
                dns.dnssec.validate(rrset, sigs[(rrset.name, rrset.rdtype)],
                                    {origin: dnskeys}, now=self.clock.now)
                checked += 1
        return checked


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.state.close()


def rdatas(response: dns.message.Message, rdtype: int) -> list[str]:
    return sorted(rd.to_text() for r in response.answer if r.rdtype == rdtype for rd in r)


def tlsa_of(record: CertificateRecord) -> str:
    return f"3 1 1 {record.spki_sha256}"


def test_certificate_records_are_published_signed_and_validate(env: Env) -> None:
    record, _ = env.issue(["www.trust", "api.hypermesh", "2001:db8::7", "2001:db8::8"])
    r = env.ask("www.trust", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert rdatas(r, dns.rdatatype.AAAA) == ["2001:db8::7", "2001:db8::8"]
    assert env.validate(r) == 1
    t = env.ask("_443._quic.www.trust", "TLSA")
    assert rdatas(t, dns.rdatatype.TLSA) == [tlsa_of(record)]
    assert env.validate(t) == 1
    h = env.ask("_443._quic.api.hypermesh", "TLSA")
    assert rdatas(h, dns.rdatatype.TLSA) == [tlsa_of(record)]
    assert env.validate(h, "hypermesh.") == 1
    ns = env.ask("trust", "NS")
    assert rdatas(ns, dns.rdatatype.NS) == ["ns1.trust."]
    assert [rd.to_text() for r in ns.additional if r.rdtype == dns.rdatatype.AAAA
            for rd in r] == ["2001:db8::53"]
    assert env.validate(ns) == 1
    assert env.validate(env.ask("trust", "SOA")) == 1


def test_denials_are_compact_and_validate(env: Env) -> None:
    """RFC 9824: one NSEC at the query name, next name ``\\000.QNAME``, its bitmap the
    types at the name (NODATA), RRSIG and NSEC only (empty non-terminal), or RRSIG, NSEC
    and NXNAME (no such name, answered NOERROR with DO, NXDOMAIN without)."""
    env.issue(["www.trust", "2001:db8::7"])
    nodata = env.ask("www.trust", "A")  # IPv6 only: never an A record
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    soa = next(r for r in nodata.authority if r.rdtype == dns.rdatatype.SOA)
    assert soa.ttl == 60  # min(SOA TTL, minimum), RFC 2308
    assert env.validate(nodata) == 2  # SOA and NSEC, each under the zone's DNSKEY
    www = dns.name.from_text("www.trust.")
    assert compact_nsec(nodata, www) == {dns.rdatatype.AAAA, dns.rdatatype.RRSIG,
                                         dns.rdatatype.NSEC}
    assert effective_rcode(nodata) == dns.rcode.NOERROR
    nx = env.ask("nothing.trust", "AAAA")
    assert nx.rcode() == dns.rcode.NOERROR and not nx.answer
    assert env.validate(nx) == 2
    assert compact_nsec(nx, dns.name.from_text("nothing.trust.")) == {
        dns.rdatatype.RRSIG, dns.rdatatype.NSEC, NXNAME}
    assert effective_rcode(nx) == dns.rcode.NXDOMAIN
    ent = env.ask("_quic.www.trust", "TXT")  # an empty non-terminal: NODATA
    assert ent.rcode() == dns.rcode.NOERROR and not ent.answer
    assert env.validate(ent) == 2
    assert compact_nsec(ent, dns.name.from_text("_quic.www.trust.")) == {
        dns.rdatatype.RRSIG, dns.rdatatype.NSEC}
    unknown = env.ask("www.trust", "TYPE65280")
    assert unknown.rcode() == dns.rcode.NOERROR and not unknown.answer
    assert env.validate(unknown) == 2
    asked = env.ask("www.trust", "NSEC")  # the NSEC at a name is its answer
    assert [r.rdtype for r in asked.answer] == [dns.rdatatype.NSEC, dns.rdatatype.RRSIG]
    assert env.validate(asked) == 1
    no_dnssec = env.ask("nothing.trust", dnssec=False)
    assert no_dnssec.rcode() == dns.rcode.NXDOMAIN
    assert [r.rdtype for r in no_dnssec.authority] == [dns.rdatatype.SOA]
    # the longest names have no room for a \000 label: the next name is the first
    # label's last octet plus one, which covers no other name either
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 55]) + ".trust"  # 255 octets
    far = env.ask(longest, "AAAA")
    nsec = next(r for r in far.authority if r.rdtype == dns.rdatatype.NSEC)
    assert nsec[0].next.labels[0] == b"a" * 62 + b"b" and env.validate(far) == 2


def test_revocation_expiry_and_renewal(env: Env) -> None:
    first, _ = env.issue(["www.trust", "2001:db8::7"], lifetime=DAY)
    serial_before = env.zones.zones[dns.name.from_text("trust.")].serial
    env.clock.now += 60
    second, _ = env.issue(["www.trust", "2001:db8::9"], lifetime=2 * DAY)  # a renewal
    r = env.ask("www.trust")
    assert rdatas(r, dns.rdatatype.AAAA) == ["2001:db8::9"]  # replaced, not added
    assert rdatas(env.ask("_443._quic.www.trust", "TLSA"),
                  dns.rdatatype.TLSA) == [tlsa_of(second)]
    assert env.zones.zones[dns.name.from_text("trust.")].serial > serial_before
    env.revoke(second)
    # the earlier certificate is still valid, so it is published again
    assert rdatas(env.ask("www.trust"), dns.rdatatype.AAAA) == ["2001:db8::7"]
    env.clock.now = first.not_after + 1
    assert env.zones.maintain() == ["expired 1"]
    gone = env.ask("www.trust")
    assert effective_rcode(gone) == dns.rcode.NXDOMAIN and env.validate(gone) == 2
    assert effective_rcode(env.ask("_443._quic.www.trust", "TLSA")) == dns.rcode.NXDOMAIN


def test_restart_publishes_the_stored_certificates(env: Env) -> None:
    record, _ = env.issue(["api.trust", "2001:db8::1"])
    revoked, _ = env.issue(["old.trust"])
    # the state is the source of truth after a restart: a revocation this node's zones
    # never heard of, an issuance still waiting for its certificate, an expired one
    env.revoke(revoked, publish=False)
    assert rdatas(env.ask("_443._quic.old.trust", "TLSA"),
                  dns.rdatatype.TLSA) == [tlsa_of(revoked)]
    waiting, _ = make_record(["pending.trust"], issued_at=env.clock.now)
    assert add_certificate(env.state, dataclasses.replace(
        waiting, der=b"", fingerprint="", precertificate=b"precertificate")).pending
    add_certificate(env.state, make_record(["gone.trust"], issued_at=env.clock.now - 2 * DAY,
                                           lifetime=DAY)[0])
    env.service = env.new_service()
    assert rdatas(env.ask("_443._quic.api.trust", "TLSA"),
                  dns.rdatatype.TLSA) == [tlsa_of(record)]
    assert rdatas(env.ask("api.trust"), dns.rdatatype.AAAA) == ["2001:db8::1"]
    for gone in ("old.trust", "pending.trust", "gone.trust"):
        assert effective_rcode(env.ask(f"_443._quic.{gone}", "TLSA")) == dns.rcode.NXDOMAIN, gone


def test_signatures_are_refreshed_before_they_expire(env: Env) -> None:
    env.issue(["www.trust", "2001:db8::7"], lifetime=30 * DAY)
    zone = env.zones.zones[dns.name.from_text("trust.")]

    def expiration() -> int:
        answer = env.ask("www.trust")
        return int(next(r for r in answer.answer if r.rdtype == dns.rdatatype.RRSIG)[0]
                   .expiration)

    first = expiration()
    assert first == int(START + 7 * DAY) == zone.signature_expiry
    env.clock.now += 3 * DAY
    assert env.zones.maintain() == []  # 4 days left: more than the 3-day refresh
    assert expiration() == first  # the rendered answer, still good
    env.clock.now += DAY + 1
    assert env.zones.maintain() == ["signatures"]  # dropped, rendered answers too
    assert expiration() == int(env.clock.now + 7 * DAY) > first
    assert zone.signature_expiry == int(env.clock.now + 7 * DAY)
    env.validate(env.ask("www.trust"))


def test_zsk_rolls_by_prepublication(env: Env) -> None:
    env.issue(["www.trust", "2001:db8::7"], lifetime=90 * DAY)
    ring = env.zones.keyring
    first = ring.signing_zsk(env.clock.now)

    def dnskey_tags() -> set[int]:
        r = env.ask("trust", "DNSKEY")
        return {dns.dnssec.key_id(k) for rr in r.answer if rr.rdtype == dns.rdatatype.DNSKEY
                for k in rr}

    def signing_tag() -> int:
        r = env.ask("www.trust")
        return next(rr[0].key_tag for rr in r.answer if rr.rdtype == dns.rdatatype.RRSIG)

    assert signing_tag() == first.tag and len(dnskey_tags()) == 2  # KSK + ZSK
    env.clock.now = START + 29 * DAY  # one day before the ZSK retires: publish the next
    assert "keys" in env.zones.maintain()
    successor = ring.zsks[-1]
    assert successor is not first and dnskey_tags() == {ring.ksk.tag, first.tag,  # type: ignore[union-attr]
                                                        successor.tag}
    assert signing_tag() == first.tag  # published, not signing yet
    env.validate(env.ask("www.trust"))
    env.clock.now = START + 30 * DAY
    assert "keys" in env.zones.maintain()
    assert signing_tag() == successor.tag
    assert first.tag in dnskey_tags()  # the retired ZSK stays published a while
    env.validate(env.ask("www.trust"))
    env.clock.now = START + 31 * DAY
    env.zones.maintain()
    assert first.tag not in dnskey_tags() and successor.tag in dnskey_tags()
    env.validate(env.ask("www.trust"))
    # the DS (of the KSK) never changed, and the schedule survives a restart
    ds_before = env.ds()
    env.service = env.new_service()
    assert env.ds() == ds_before and env.zones.keyring.signing_zsk(env.clock.now).tag == \
        successor.tag


def test_dnssec_keys_in_a_pkcs11_token(tmp_path: Path, softhsm_token: SoftHsmToken) -> None:
    keystore = open_keystore(provider="softhsm2", data_dir=tmp_path,
                             module_path=softhsm_token.module_path,
                             token_label=softhsm_token.token_label, pin=softhsm_token.pin)
    try:
        # the session's token is shared with other tests: keys of our own
        prefix = f"dnstest-{secrets.token_hex(3)}"
        e = Env(tmp_path, keystore=keystore, algorithm="ecdsa-p256-sha256", key_prefix=prefix)
        assert {f"{prefix}-ksk", f"{prefix}-zsk-1"} <= set(keystore.names())
        e.issue(["hsm.trust", "2001:db8::1"])
        r = e.ask("hsm.trust")
        assert next(rr for rr in r.answer if rr.rdtype == dns.rdatatype.RRSIG)[0].algorithm == 13
        assert e.validate(r) == 1
        e.state.close()
    finally:
        keystore.close()


def test_precomputed_answer_keeps_the_question_as_asked(env: Env) -> None:
    env.issue(["www.trust", "2001:db8::7"])
    first = env.ask("www.trust", raw=True)
    rebuilds = env.zones.rebuilds
    again = env.ask("WWW.Trust", raw=True)  # served from the wire cache
    assert env.zones.rebuilds == rebuilds
    assert len(first) == len(again) and len(first) % PADDING_BLOCK == 0
    assert again[12:22] == b"\x03WWW\x05Trust" and first[12:22] == b"\x03www\x05trust"
    parsed = dns.message.from_wire(again)
    assert rdatas(parsed, dns.rdatatype.AAAA) == ["2001:db8::7"]
    no_edns = env.ask("www.trust", dnssec=False, raw=True, use_edns=False)
    assert dns.message.from_wire(no_edns).edns == -1  # no OPT, so no padding


@pytest.mark.parametrize(("make", "rcode"), [
    (lambda: _set(dns.message.make_query("www.trust", "AAAA"), opcode=dns.opcode.NOTIFY),
     dns.rcode.NOTIMP),
    (lambda: dns.message.make_query("version.bind", "TXT", rdclass="CH"), dns.rcode.REFUSED),
    (lambda: dns.message.make_query("trust", "AXFR"), dns.rcode.REFUSED),
    (lambda: dns.message.make_query("www.trust", "AAAA", use_edns=1), dns.rcode.BADVERS),
    (lambda: dns.message.make_query("example.org", "AAAA"), dns.rcode.REFUSED),  # no upstreams
    (lambda: _signed(dns.message.make_query("www.trust", "AAAA")), dns.rcode.NOTAUTH),
    (lambda: dns.message.make_query("www.trust", "TKEY"), dns.rcode.FORMERR),
    # NXNAME only marks a compact denial's NSEC: never asked for (RFC 9824 §3.5)
    (lambda: dns.message.make_query("www.trust", "TYPE128"), dns.rcode.FORMERR),
    (lambda: dns.message.make_query("www.trust", "MAILA"), dns.rcode.NOTIMP),
])
def test_refusals(env: Env, make: Any, rcode: int) -> None:
    query = make()
    query.id = 0
    wire = query.to_wire()
    answer = env.answers.answer_doq(QueryReceived(0, wire, parse_query(wire)), PEER)
    assert isinstance(answer, bytes)
    assert dns.message.from_wire(answer).rcode() == rcode


def _signed(query: dns.message.Message) -> dns.message.Message:
    import dns.tsigkeyring
    query.use_tsig(dns.tsigkeyring.from_text({"key.": "c2VjcmV0c2VjcmV0c2VjcmV0"}))
    return query


def _set(query: dns.message.Message, opcode: int) -> dns.message.Message:
    query.set_opcode(opcode)  # type: ignore[arg-type]
    return query


def test_unreadable_query_gets_formerr(env: Env) -> None:
    wire = b"\x00\x00\x01\x00\x00\x02" + b"\x00" * 6
    answer = env.answers.answer_doq(QueryReceived(0, wire, None, None), PEER)
    assert isinstance(answer, bytes) and answer[3] & 0xF == dns.rcode.FORMERR


def sign(key: Any, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return bytes(key.sign(data, ec.ECDSA(hashes.SHA256())))


def _register_args(record: CertificateRecord, key: Any, name: str, addresses: list[str],
                   at: int) -> ops.RegisterArgs:
    """``dns.register``'s arguments, signed with ``key``."""
    normalised = []
    for address in addresses:
        try:
            normalised.append(ipaddress.IPv6Address(address).compressed)
        except ValueError:
            normalised.append(address)
    statement = ops.registration_statement(record.serial, name, normalised, at)
    return ops.RegisterArgs(serial=record.serial, name=name, addresses=addresses, time=at,
                            signature=sign(key, statement))


def register(env: Env, record: CertificateRecord, key: Any, name: str, addresses: list[str],
             at: float | None = None, signer: Any = None) -> dict[str, Any]:
    """``dns.register`` through the node's service: checked there, committed in a block."""
    args = _register_args(record, signer or key, name, addresses,
                          int(env.clock.now if at is None else at))
    return asyncio.run(env.service.register_records(args, CTX))


def test_register_publishes_extra_addresses_for_the_certificate_holder(env: Env) -> None:
    record, key = env.issue(["www.trust", "2001:db8::7"], key=ec.generate_private_key(
        ec.SECP256R1()))
    result = register(env, record, key, "www.trust", ["2001:db8::100", "2001:DB8::101"])
    assert result["published"] and result["addresses"] == ["2001:db8::100", "2001:db8::101"]
    r = env.ask("www.trust")
    assert rdatas(r, dns.rdatatype.AAAA) == ["2001:db8::100", "2001:db8::101", "2001:db8::7"]
    env.validate(r)
    with pytest.raises(Unauthorized, match="replayed"):
        register(env, record, key, "www.trust", ["2001:db8::100"])
    with pytest.raises(Unauthorized, match="signature"):
        register(env, record, key, "www.trust", ["2001:db8::1"], at=START + 1,
                 signer=ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(Unauthorized, match="time"):
        register(env, record, key, "www.trust", [], at=START + 1000)
    with pytest.raises(Unauthorized, match="does not carry"):
        register(env, record, key, "other.trust", ["2001:db8::1"], at=START + 2)
    with pytest.raises(InvalidRequest, match="IPv6"):
        register(env, record, key, "www.trust", ["192.0.2.1"], at=START + 2)
    with pytest.raises(InvalidRequest, match="cannot identify"):
        register(env, record, key, "www.trust", ["ff02::1"], at=START + 2)
    with pytest.raises(NotFound):
        asyncio.run(env.service.register_records(ops.RegisterArgs(
            serial="abcdef", name="www.trust", addresses=[], time=int(START),
            signature=b"x"), CTX))
    # the replicated state holds it, as the register decision's block left it
    assert env.state.registrations() == {"www.trust": (
        record.spki_sha256, record.serial, ["2001:db8::100", "2001:db8::101"], int(START))}
    # a node without a validator key (an observer) checks the statement, submits nothing
    height = env.state.height()
    observer = DnsService(zones=env.zones, answers=env.answers, forwarder=None,
                          clock=env.clock)
    with pytest.raises(Unavailable):
        asyncio.run(observer.register_records(_register_args(
            record, key, "www.trust", ["2001:db8::1"], int(START) + 1), CTX))
    assert env.state.height() == height
    # ownership follows the certificate: a new key's certificate hides them,
    env.clock.now += 10
    newer, _ = env.issue(["www.trust", "2001:db8::9"])
    assert rdatas(env.ask("www.trust"), dns.rdatatype.AAAA) == ["2001:db8::9"]
    # a restart keeps the registration (it is in the state): hidden while the newer
    # certificate holds the name, published again once it is revoked
    env.service = env.new_service()
    assert rdatas(env.ask("www.trust"), dns.rdatatype.AAAA) == ["2001:db8::9"]
    registration = env.zones.registration("www.trust")
    assert registration is not None and registration.time == int(START)
    env.revoke(newer)
    assert rdatas(env.ask("www.trust"), dns.rdatatype.AAAA) == [
        "2001:db8::100", "2001:db8::101", "2001:db8::7"]
    # an empty list withdraws it
    withdrawn = register(env, record, key, "www.trust", [], at=START + 20)
    assert withdrawn["addresses"] == [] and withdrawn["published"]
    assert rdatas(env.ask("www.trust"), dns.rdatatype.AAAA) == ["2001:db8::7"]
    assert env.state.registrations() == {} and env.zones.registration("www.trust") is None


def test_racing_registrations_are_decided_by_the_committed_state(env: Env) -> None:
    record, key = env.issue(["www.trust", "2001:db8::7"])

    async def both() -> list[Any]:
        # both pass the node's checks before either is committed; the block order decides
        return await asyncio.gather(*(
            env.service.register_records(_register_args(
                record, key, "www.trust", [address], int(START)), CTX)
            for address in ("2001:db8::1", "2001:db8::2")), return_exceptions=True)

    first, second = asyncio.run(both())
    assert first["addresses"] == ["2001:db8::1"] and first["published"]
    assert isinstance(second, Unauthorized) and "replayed" in second.message
    assert env.state.registrations()["www.trust"][2] == ["2001:db8::1"]
    assert rdatas(env.ask("www.trust"), dns.rdatatype.AAAA) == ["2001:db8::1", "2001:db8::7"]


def test_resolve_op_reports_validation_and_tlsa_binding(env: Env) -> None:
    record, _ = env.issue(["www.trust", "2001:db8::7"])
    ctx = RequestContext(peer=PEER, op="dns.resolve", received_at=START)
    result = asyncio.run(env.service.resolve(ops.ResolveArgs(name="www.trust"), ctx))
    assert result["rcode"] == "NOERROR" and result["authoritative"]
    assert result["dnssec"] == "secure"
    assert result["tlsa"] == {"name": "_443._quic.www.trust.", "serial": record.serial,
                              "fingerprint": record.fingerprint, "status": "match"}
    assert {"name": "www.trust.", "type": "AAAA", "ttl": 300,
            "data": "2001:db8::7"} in result["answer"]
    # the CA's database, not the zone, is the reference: a newer certificate the zone
    # did not hear about shows as a mismatch
    newer = add_certificate(env.state, make_record(["www.trust"], issued_at=START + 1)[0])
    drift = asyncio.run(env.service.resolve(ops.ResolveArgs(name="_443._quic.www.trust",
                                                            type="TLSA"), ctx))
    assert drift["tlsa"]["status"] == "mismatch" and drift["tlsa"]["serial"] == newer.serial
    missing = asyncio.run(env.service.resolve(ops.ResolveArgs(name="none.trust"), ctx))
    # a compact denial (NOERROR, NSEC with NXNAME) validated: restored to NXDOMAIN
    assert missing["rcode"] == "NXDOMAIN" and missing["dnssec"] == "secure"
    assert any(r["type"] == "NSEC" and "NXNAME" in r["data"] for r in missing["authority"])
    assert missing["tlsa"]["status"] == "no_certificate"
    for bad in (ops.ResolveArgs(name="www.trust", type="BOGUS"),
                ops.ResolveArgs(name="www.trust", type="AXFR"),
                ops.ResolveArgs(name="a" * 64 + ".trust")):
        with pytest.raises(InvalidRequest):
            asyncio.run(env.service.resolve(bad, ctx))


def test_health_reports_zones_and_ds(env: Env) -> None:
    result = env.service.health(ops.HealthArgs(), RequestContext(PEER, "dns.health", START))
    names = [z["name"] for z in result["zones"]]
    assert names == ["trust.", "hypermesh."] and result["status"] == "ok"
    trust = result["zones"][0]
    assert trust["signature_expiry"] == int(START + 7 * DAY)
    assert {k["role"] for k in trust["keys"]} == {"ksk", "zsk"}
    assert trust["ds"][0].startswith("trust. 3600 IN DS ")


def _padding_option(length: int) -> dns.edns.Option:
    return dns.edns.GenericOption(dns.edns.OptionType.PADDING, b"\x00" * length)


FAST_PATH_QUERIES = [
    ("www.trust", "AAAA"),
    ("www.trust", "A"),  # NODATA: the zones hold no A records
    ("_443._quic.www.trust", "TLSA"),
    ("trust", "DNSKEY"),
    ("www.trust", "NSEC"),
    ("nothing.trust", "AAAA"),  # compact denial (NOERROR with DO, NXDOMAIN without)
    ("trust", "NS"),
]
POSITIVE = {("www.trust", "AAAA"), ("_443._quic.www.trust", "TLSA"), ("trust", "DNSKEY"),
            ("trust", "NS")}
FAST_PATH_VARIANTS: list[dict[str, Any]] = [
    {"want_dnssec": True},
    {"want_dnssec": False, "use_edns": 0},  # EDNS without DO
    {"want_dnssec": False, "use_edns": False},  # no EDNS: no padding
    {"want_dnssec": True, "options": [_padding_option(0)]},
    {"want_dnssec": True, "options": [_padding_option(200)]},
    {"want_dnssec": False, "options": [_padding_option(31)]},
    {"want_dnssec": True, "flags": dns.flags.RD | dns.flags.CD},
]


def _fast_path_queries(name: str, rdtype: str, kwargs: dict[str, Any]) -> list[bytes]:
    """The query as asked first, then others that the same cached answer serves (the
    question spliced in): with another padding option, and in capitals when the answer
    has data (a denial's synthesized NSEC names keep the case first asked: as before)."""
    def wire(qname: str, **extra: Any) -> bytes:
        query = dns.message.make_query(qname, rdtype, **{**kwargs, **extra})
        query.id = 0
        return query.to_wire()
    asked = [wire(name)]
    if kwargs.get("use_edns") is not False:
        asked.append(wire(name, options=[_padding_option(9)]))
    if (name, rdtype) in POSITIVE:
        asked.append(wire(name.upper()))
    return asked


def test_fast_path_answers_are_the_slow_paths_byte_for_byte(env: Env) -> None:
    """An answer from the wire caches (by key with the question spliced in, or whole by
    query message) is exactly what dnspython renders for that query with no cache:
    RRSIGs, padding, EDNS flags, AA/TC/CD and rcode. Rendering shuffles the records of
    an RRset with ``random``: every render is seeded alike so the bytes can be compared."""
    env.issue(["www.trust", "2001:db8::7", "2001:db8::8"])
    answers = env.answers
    compared = 0
    for name, rdtype in FAST_PATH_QUERIES:
        for kwargs in FAST_PATH_VARIANTS:
            for number, wire in enumerate(_fast_path_queries(name, rdtype, kwargs)):
                request = dns.message.from_wire(wire)
                question = request.question[0]
                resolution = answers.lookup_now(question.name, question.rdtype,
                                                bool(request.ednsflags & dns.flags.DO))
                assert resolution is not None
                random.seed(0)
                slow = answers.render(request, resolution)
                if number == 0:
                    env.rendered.clear()  # the first query is rendered anew
                    random.seed(0)
                else:  # served by the first query's answer, its question spliced in
                    assert env.rendered.zone_answer_to(wire) is None
                first = answers.answer_doq(QueryReceived(0, wire, parse_query(wire)), PEER)
                assert env.rendered.zone_answer_to(wire) == first  # kept whole
                again = answers.answer_doq(QueryReceived(0, wire, parse_query(wire)), PEER)
                assert first == slow, (name, rdtype, kwargs, number)
                assert again == slow, (name, rdtype, kwargs, number)
                assert (len(slow) % PADDING_BLOCK == 0) == (request.edns >= 0)
                compared += 1
    assert compared == 7 * 7 + 7 * 6 + 4 * 7  # first; another padding option; capitals


def test_a_zone_change_reaches_answers_kept_by_message(env: Env) -> None:
    """Issuance, revocation and registration each change the next answer to the very
    same query bytes (the answer kept whole under them is dropped)."""
    record, _ = env.issue(["www.trust", "2001:db8::7"])
    for _ in range(2):  # the second is served from the caches
        assert rdatas(env.ask("www.trust"), dns.rdatatype.AAAA) == ["2001:db8::7"]
    nothing = env.ask("new.trust", raw=True)
    assert env.ask("new.trust", raw=True) == nothing
    env.issue(["new.trust", "2001:db8::9"])  # issuance: a name that had no records
    assert rdatas(env.ask("new.trust"), dns.rdatatype.AAAA) == ["2001:db8::9"]
    env.revoke(record)
    assert env.ask("www.trust").answer == []
    assert rdatas(env.ask("new.trust"), dns.rdatatype.AAAA) == ["2001:db8::9"]
