"""Rotation with an injected clock: the intermediate and the node certificate, on a real
CA of one validator (replicated state in SQLite, the consensus chain of one, audit log,
software keystore) in a temp dir. Every certificate goes through the cluster: a new
intermediate is announced to it before anything is issued with it."""

from __future__ import annotations

import datetime
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

import stoq
from handlers.ca import Rotator
from store import credential_paths, verify_log

from ..ca_fixtures import Clock, ValidatorForTests, open_hierarchy, open_stores, open_validator

NAMES = ["node.trust"]
ADDRESSES = ["::1"]
START = 1_800_000_000.0
INTERMEDIATE_LIFETIME = 30 * 86400.0


def rotator(node: ValidatorForTests, tmp: Path, clock: Clock,
            installs: list[int]) -> Rotator:
    """The node's rotator, as ``trustchain._compose`` wires it."""
    return Rotator(hierarchy=node.hierarchy, issue=node.ca.issue_node_certificate,
                   tls=credential_paths(tmp), names=NAMES, addresses=ADDRESSES,
                   counts=node.ca.counts, installed=lambda: installs.append(1),
                   announce=node.keys.announce, clock=clock)


def chain_verifies(leaf_der: bytes, chain: list[bytes], root_der: bytes, at: float) -> bool:
    store = verification.Store([x509.load_der_x509_certificate(root_der)])
    verifier = (verification.PolicyBuilder().store(store)
                .time(datetime.datetime.fromtimestamp(at, datetime.UTC))
                .build_client_verifier())
    try:
        verifier.verify(x509.load_der_x509_certificate(leaf_der),
                        [x509.load_der_x509_certificate(d) for d in chain])
    except verification.VerificationError:
        return False
    return True


def _csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = f"h{secrets.token_hex(4)}.hypermesh"
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def test_ensure_is_idempotent(tmp_path: Path) -> None:
    clock = Clock(START)
    data, keystore, audit = open_stores(tmp_path, clock)
    hierarchy = open_hierarchy(data, keystore, audit, clock)
    root = hierarchy.root_der
    issuer = hierarchy.issuer
    assert issuer is not None
    assert hierarchy.ensure() is False
    assert hierarchy.root_der == root
    assert hierarchy.issuer is not None and hierarchy.issuer.der == issuer.der
    assert (tmp_path / "root.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE")
    hierarchy.authorities.close()
    audit.close()
    keystore.close()


async def test_node_certificate_renewed_at_two_thirds(tmp_path: Path) -> None:
    clock = Clock(START)
    installs: list[int] = []
    async with open_validator(tmp_path, clock) as node:
        rotation = rotator(node, tmp_path, clock, installs)
        first = await rotation.check()
        assert [d["what"] for d in first] == ["server_certificate"]
        key_before = (tmp_path / "tls" / "server.key").read_bytes()
        serial = rotation.status()["server_certificate"]["serial"]
        renew_at = rotation.status()["server_certificate"]["renew_at"]
        start = rotation.server_certificate["not_before"]  # type: ignore[index]
        end = rotation.server_certificate["not_after"]  # type: ignore[index]
        assert renew_at == int(start + (end - start) * 2 / 3)
        clock.now = renew_at - 60
        assert await rotation.check() == []
        clock.now = renew_at + 1
        done = await rotation.check()
        assert [d["what"] for d in done] == ["server_certificate"]
        assert rotation.status()["server_certificate"]["serial"] != serial
        assert (tmp_path / "tls" / "server.key").read_bytes() != key_before  # re-keyed
        assert installs == [1, 1]
        # both certificates went through the cluster: committed, in the replicated state
        new_serial = rotation.status()["server_certificate"]["serial"]
        for committed in (serial, new_serial):
            record = node.state.get(committed)
            assert record is not None and record.kind == "node"
        # the files on disk are the new certificate, chained to the root
        pem = x509.load_pem_x509_certificates((tmp_path / "tls" / "server.pem").read_bytes())
        assert format(pem[0].serial_number, "x") == new_serial
        assert chain_verifies(pem[0].public_bytes(serialization.Encoding.DER),
                              [c.public_bytes(serialization.Encoding.DER) for c in pem[1:]],
                              node.hierarchy.root_der, clock.now)


async def test_a_node_certificate_without_subject_is_replaced_after_a_restart(
        tmp_path: Path) -> None:
    """A certificate of the profile before GnuTLS clients were served (empty subject) is
    not adopted at start-up: the first check replaces it."""
    clock = Clock(START)
    async with open_validator(tmp_path, clock) as node:
        await rotator(node, tmp_path, clock, []).check()
        tls = credential_paths(tmp_path)
        current, intermediate = tls.read_chain()
        assert current.subject.rfc4514_string() == "CN=node.trust"
        restarted = rotator(node, tmp_path, clock, [])
        restarted.load_current()
        assert restarted.server_certificate is not None  # adopted: nothing to do
        assert await restarted.check() == []
        # the same certificate, but with an empty subject, signed by the intermediate
        old = (x509.CertificateBuilder().subject_name(x509.Name([]))
               .issuer_name(current.issuer).public_key(current.public_key())
               .serial_number(current.serial_number)
               .not_valid_before(current.not_valid_before_utc)
               .not_valid_after(current.not_valid_after_utc))
        for extension in current.extensions:
            old = old.add_extension(extension.value, critical=extension.critical)
        assert node.hierarchy.issuer is not None
        signed = old.sign(node.hierarchy.issuer.signer.private_key(), hashes.SHA256())
        tls.install(tls.keyfile.read_bytes(), b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (signed, intermediate)))
        restarted = rotator(node, tmp_path, clock, [])
        restarted.load_current()
        assert restarted.server_certificate is None
        assert [d["what"] for d in await restarted.check()] == ["server_certificate"]
        assert tls.read_chain()[0].subject.rfc4514_string() == "CN=node.trust"


async def test_rotation_interval_renews_the_node_certificate_sooner(tmp_path: Path) -> None:
    """ca.rotation_interval: a new key and certificate that long after notBefore, when it
    comes before two thirds of the lifetime (here 1 h, against about 16 h)."""
    clock = Clock(START)
    async with open_validator(tmp_path, clock) as node:
        rotation = Rotator(hierarchy=node.hierarchy, issue=node.ca.issue_node_certificate,
                           tls=credential_paths(tmp_path), names=NAMES, addresses=ADDRESSES,
                           rotation_interval=3600.0, counts=node.ca.counts,
                           announce=node.keys.announce, clock=clock)
        await rotation.check()
        status = rotation.status()["server_certificate"]
        assert status["renew_at"] == status["not_before"] + 3600
        clock.now = status["renew_at"] - 1
        assert await rotation.check() == []
        clock.now = status["renew_at"] + 1
        assert [d["what"] for d in await rotation.check()] == ["server_certificate"]
        assert rotation.status()["server_certificate"]["serial"] != status["serial"]
        # longer than two thirds of the lifetime: two thirds win
        slow = Rotator(hierarchy=node.hierarchy, issue=node.ca.issue_node_certificate,
                       tls=credential_paths(tmp_path), names=NAMES, addresses=ADDRESSES,
                       rotation_interval=7 * 86400.0, clock=clock)
        slow.load_current()
        current = slow.status()["server_certificate"]
        lifetime = current["not_after"] - current["not_before"]
        assert current["renew_at"] == int(current["not_before"] + lifetime * 2 / 3)


async def test_intermediate_rotates_with_overlap(tmp_path: Path, prover: stoq.Prover) -> None:
    clock = Clock(START)
    async with open_validator(tmp_path, clock, stake=[prover.key_id],
                              intermediate_lifetime=INTERMEDIATE_LIFETIME) as node:
        hierarchy = node.hierarchy
        rotation = rotator(node, tmp_path, clock, [])
        await rotation.check()
        assert hierarchy.issuer is not None and hierarchy.issuer.name == "intermediate-1"
        first = hierarchy.issuer.der
        leaf = await node.issue_csr(prover, _csr())
        assert leaf["chain"][0] == first
        clock.now = hierarchy.intermediate_renew_at() + 1
        done = await rotation.check()
        assert [d["what"] for d in done] == ["intermediate", "server_certificate"]
        assert hierarchy.issuer.name == "intermediate-2"
        names = [(a.name, a.active) for a in hierarchy.intermediates()]
        assert names == [("intermediate-1", False), ("intermediate-2", True)]
        # the cluster holds both intermediates, the new one active
        announced = node.machine.directory.of(node.validator.id)
        assert announced is not None
        assert [i.der for i in announced.intermediates] == [first, hierarchy.issuer.der]
        # the old leaf still verifies through the old intermediate, which is still valid
        assert chain_verifies(leaf["certificate"], leaf["chain"][:-1], hierarchy.root_der,
                              leaf["not_before"] + 3600)
        # new leaves come from the new intermediate
        fresh = await node.issue_csr(prover, _csr())
        assert fresh["chain"][0] == hierarchy.issuer.der != first
        assert chain_verifies(fresh["certificate"], fresh["chain"][:-1], hierarchy.root_der,
                              clock.now + 60)
        # ... and so does the node's own certificate, renewed at the rotation
        pem = x509.load_pem_x509_certificates((tmp_path / "tls" / "server.pem").read_bytes())
        assert pem[1].public_bytes(serialization.Encoding.DER) == hierarchy.issuer.der
    log = (tmp_path / "audit" / "audit.log").read_text()
    assert '"ca.intermediate-rotated"' in log
    assert verify_log(tmp_path / "audit" / "audit.log").ok
