"""Rotation with an injected clock: the intermediate and the node certificate,
against a real SQLite store, audit log and software keystore in a temp dir."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from handlers.ca import (
    CertificateAuthority,
    Hierarchy,
    HierarchyConfig,
    LocalAdmission,
    NamingPolicy,
    Rotator,
)
from store import (
    AuditLog,
    CertificateStore,
    DataDirectory,
    credential_paths,
    open_keystore,
    verify_log,
)

DOMAINS = ("hypermesh", "trust")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def build(tmp: Path, clock: Clock) -> tuple[Hierarchy, CertificateAuthority, Rotator,
                                            list[int], AuditLog]:
    keystore = open_keystore(provider="software", data_dir=tmp)
    certs = CertificateStore(tmp / "certs.sqlite3")
    audit = AuditLog(tmp / "audit.log", signer=keystore.get_or_create("audit"), clock=clock)
    data = DataDirectory(tmp)
    hierarchy = Hierarchy(keystore=keystore, certs=certs, root_file=data.root_certificate(),
                          admin=data.admin_credential(),
                          config=HierarchyConfig(ca_id="test", domains=DOMAINS,
                                                 intermediate_lifetime=30 * 86400.0),
                          clock=clock, audit=audit.append)
    hierarchy.ensure()
    ca = CertificateAuthority(hierarchy=hierarchy, certs=certs,
                              policy=NamingPolicy(domains=DOMAINS),
                              admission=LocalAdmission(), audit=audit.append_async,
                              clock=clock)
    installs: list[int] = []
    rotator = Rotator(hierarchy=hierarchy,
                      issue=lambda csr: ca.issue_csr(csr, None, requester="node",
                                                     internal=True),
                      tls=credential_paths(tmp), names=["node.trust"], addresses=["::1"],
                      installed=lambda: installs.append(1), clock=clock)
    return hierarchy, ca, rotator, installs, audit


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


def test_ensure_is_idempotent(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    hierarchy, *_ = build(tmp_path, clock)
    root = hierarchy.root_der
    assert hierarchy.ensure() is False
    assert hierarchy.root_der == root
    assert (tmp_path / "root.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE")


async def test_node_certificate_renewed_at_two_thirds(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    hierarchy, _ca, rotator, installs, audit = build(tmp_path, clock)
    first = await rotator.check()
    assert [d["what"] for d in first] == ["server_certificate"]
    key_before = (tmp_path / "tls" / "server.key").read_bytes()
    serial = rotator.status()["server_certificate"]["serial"]
    renew_at = rotator.status()["server_certificate"]["renew_at"]
    start = rotator.server_certificate["not_before"]  # type: ignore[index]
    end = rotator.server_certificate["not_after"]  # type: ignore[index]
    assert renew_at == int(start + (end - start) * 2 / 3)
    clock.now = renew_at - 60
    assert await rotator.check() == []
    clock.now = renew_at + 1
    done = await rotator.check()
    assert [d["what"] for d in done] == ["server_certificate"]
    assert rotator.status()["server_certificate"]["serial"] != serial
    assert (tmp_path / "tls" / "server.key").read_bytes() != key_before  # re-keyed
    assert installs == [1, 1]
    # the files on disk are the new certificate, chained to the root
    pem = x509.load_pem_x509_certificates((tmp_path / "tls" / "server.pem").read_bytes())
    assert format(pem[0].serial_number, "x") == rotator.status()["server_certificate"]["serial"]
    assert chain_verifies(pem[0].public_bytes(serialization.Encoding.DER),
                          [c.public_bytes(serialization.Encoding.DER) for c in pem[1:]],
                          hierarchy.root_der, clock.now)
    audit.close()


async def test_intermediate_rotates_with_overlap(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    hierarchy, ca, rotator, _, audit = build(tmp_path, clock)
    await rotator.check()
    assert hierarchy.issuer is not None and hierarchy.issuer.name == "intermediate-1"
    leaf = await ca.issue_csr(_csr(), None, requester="test")
    clock.now = hierarchy.intermediate_renew_at() + 1
    done = await rotator.check()
    assert [d["what"] for d in done] == ["intermediate", "server_certificate"]
    assert hierarchy.issuer.name == "intermediate-2"
    names = [(a.name, a.active) for a in hierarchy.intermediates()]
    assert names == [("intermediate-1", False), ("intermediate-2", True)]
    # the old leaf still verifies through the old intermediate, which is still valid
    assert chain_verifies(leaf["certificate"], leaf["chain"][:-1], hierarchy.root_der,
                          leaf["not_before"] + 3600)
    # new leaves come from the new intermediate
    fresh = await ca.issue_csr(_csr(), None, requester="test")
    assert fresh["chain"][0] == hierarchy.issuer.der
    assert chain_verifies(fresh["certificate"], fresh["chain"][:-1], hierarchy.root_der,
                          clock.now + 60)
    audit.close()
    log = (tmp_path / "audit.log").read_text()
    assert '"ca.intermediate-rotated"' in log
    assert verify_log(tmp_path / "audit.log").ok


def _csr() -> bytes:
    import secrets

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    name = f"h{secrets.token_hex(4)}.hypermesh"
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
