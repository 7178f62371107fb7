"""A publisher that fails never turns a durable issuance into an error.

A real CA of one validator (software keys, the replicated state in SQLite, the
consensus chain of one, the audit log, in a temporary directory) with two
publishers: one that raises, one that records. The state machine tells them of
each certificate once its block is committed. The certificate is issued, stored
and returned; the good publisher still hears of it; the failure is logged and
counted, and :meth:`Publishers.healthy` (``node.health``'s ``publishing``)
turns false until a later event goes through.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from handlers.ca import CertificateIssued, CertificateRevoked, Publishers, node_csr
from handlers.replica import ReplicaService
from store import MultisetHash

from ..ca_fixtures import Clock, open_validator


class Recording:
    def __init__(self) -> None:
        self.issued: list[CertificateIssued] = []
        self.revoked: list[CertificateRevoked] = []
        self.registrations: list[str] = []

    def certificate_issued(self, event: CertificateIssued) -> None:
        self.issued.append(event)

    def certificate_revoked(self, event: CertificateRevoked) -> None:
        self.revoked.append(event)

    def registration_changed(self, name: str) -> None:
        self.registrations.append(name)


class Failing:
    def __init__(self) -> None:
        self.fail = True
        self.calls = 0

    def certificate_issued(self, event: CertificateIssued) -> None:
        self.calls += 1
        if self.fail:
            raise RuntimeError("the zone cannot be signed")

    def certificate_revoked(self, event: CertificateRevoked) -> None:
        pass

    def registration_changed(self, name: str) -> None:
        pass


def _node_csr() -> bytes:
    return node_csr(ec.generate_private_key(ec.SECP256R1()), ["node.trust"], ["::1"])


async def test_a_failing_publisher_is_counted_and_the_issuance_stands(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recording, failing = Recording(), Failing()
    publishers = Publishers([("dns", failing), ("fingerprints", recording)])
    async with open_validator(tmp_path, Clock(1_800_000_000.0),
                              publishers=publishers) as node:
        assert publishers.healthy()
        with caplog.at_level(logging.ERROR, logger="trustchain.ca"):
            result = await node.ca.issue_node_certificate(_node_csr())
        # the client has its certificate; it is in the replicated state, and audited
        stored = node.state.get(result["serial"])
        assert stored is not None and stored.der == result["certificate"]
        assert result["serial"] in (tmp_path / "audit" / "audit.log").read_text()
        assert node.ca.counts.issued == 1 and node.ca.counts.rejected == 0
        assert result["block_height"] == node.machine.height
        # the state the failure did not touch is exactly the file's
        assert MultisetHash.of(node.state.rows()) == node.machine.rows
        # the publisher was called: its failure is logged, counted and shown
        assert failing.calls == 1
        assert any(result["serial"] in r.getMessage() and "dns" in r.getMessage()
                   for r in caplog.records)
        assert publishers.status["dns"].failures == 1
        assert "cannot be signed" in (publishers.status["dns"].last_error or "")
        assert not publishers.healthy()
        # the other publisher heard of it, with the committed record
        assert [e.record.serial for e in recording.issued] == [result["serial"]]
        assert recording.issued[0].record.der == result["certificate"]
        assert recording.issued[0].logged is not None
        # the consensus went on: the failing publisher did not stop the chain
        assert node.chain.failure is None
        assert ReplicaService(machine=node.machine, decisions=None).status()["state"][
            "corrupt"] is None
        # the publisher recovers: health follows its latest event
        failing.fail = False
        again = await node.ca.issue_node_certificate(_node_csr())
        assert failing.calls == 2
        assert publishers.healthy() and publishers.status["dns"].failures == 1
        assert [e.record.serial for e in recording.issued] == [result["serial"],
                                                               again["serial"]]
    log = (tmp_path / "audit" / "audit.log").read_text()
    assert result["serial"] in log and again["serial"] in log
