"""A publisher that fails never turns a durable issuance into an error.

A real CA (software keys, SQLite, audit log in a temporary directory) with two
publishers: one that raises, one that records. The certificate is issued,
stored and returned; the good publisher still hears of it; the failure is
counted and :meth:`Publishers.healthy` (``node.health``'s ``publishing``)
turns false until a later event goes through.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from handlers.ca import (
    CertificateAuthority,
    CertificateIssued,
    CertificateRevoked,
    Hierarchy,
    HierarchyConfig,
    LocalAdmission,
    NamingPolicy,
    Publishers,
    node_csr,
)
from store import AuditLog, CertificateStore, DataDirectory, open_keystore

DOMAINS = ("trust", "hypermesh")


class Recording:
    def __init__(self) -> None:
        self.issued: list[CertificateIssued] = []
        self.revoked: list[CertificateRevoked] = []

    def certificate_issued(self, event: CertificateIssued) -> None:
        self.issued.append(event)

    def certificate_revoked(self, event: CertificateRevoked) -> None:
        self.revoked.append(event)


class Failing:
    def __init__(self) -> None:
        self.fail = True

    def certificate_issued(self, event: CertificateIssued) -> None:
        if self.fail:
            raise RuntimeError("the zone cannot be signed")

    def certificate_revoked(self, event: CertificateRevoked) -> None:
        pass


def _ca(tmp: Path, publishers: Publishers) -> tuple[CertificateAuthority, AuditLog]:
    keystore = open_keystore(provider="software", data_dir=tmp)
    certs = CertificateStore(tmp / "certs.sqlite3")
    audit = AuditLog(tmp / "audit.log", signer=keystore.get_or_create("audit"))
    data = DataDirectory(tmp)
    hierarchy = Hierarchy(keystore=keystore, certs=certs, root_file=data.root_certificate(),
                          admin=data.admin_credential(),
                          config=HierarchyConfig(ca_id="test", domains=DOMAINS),
                          clock=lambda: 1_800_000_000.0, audit=audit.append)
    hierarchy.ensure()
    ca = CertificateAuthority(hierarchy=hierarchy, certs=certs,
                              policy=NamingPolicy(domains=DOMAINS),
                              admission=LocalAdmission(), audit=audit.append_async,
                              publishers=publishers)
    return ca, audit


async def test_a_failing_publisher_is_counted_and_the_issuance_stands(tmp_path: Path) -> None:
    recording, failing = Recording(), Failing()
    publishers = Publishers([("dns", failing), ("fingerprints", recording)])
    ca, audit = _ca(tmp_path, publishers)
    assert publishers.healthy()
    csr = node_csr(ec.generate_private_key(ec.SECP256R1()), ["node.trust"], ["::1"])
    result = await ca.issue_node_certificate(csr)
    # the client has its certificate; it is stored and audited
    assert ca.certs.get(result["serial"]) is not None
    assert result["serial"] in (tmp_path / "audit.log").read_text()
    # the other publisher heard of it; the failure is counted and shown
    assert [e.record.serial for e in recording.issued] == [result["serial"]]
    assert publishers.status["dns"].failures == 1
    assert "cannot be signed" in (publishers.status["dns"].last_error or "")
    assert not publishers.healthy()
    # the publisher recovers: health follows its latest event
    failing.fail = False
    await ca.issue_node_certificate(
        node_csr(ec.generate_private_key(ec.SECP256R1()), ["node.trust"], ["::1"]))
    assert publishers.healthy() and publishers.status["dns"].failures == 1
    audit.close()
