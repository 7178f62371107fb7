"""Validator clusters of real processes on [::1]: issuance through committed blocks,
a crashed and restarted validator, and a cluster that loses its quorum.

The byzantine 7-validator case is tests/integration/test_production.py; the
algorithm's corner cases (locks, round skips, partitions, drops) are exercised
in simulation by tests/unit/test_bft_sim.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

import stoq
from handlers.consensus import matches_decision
from handlers.consensus.bft import Block, Commit, Validator, ValidatorSet
from protocol import decode_item
from store import SoftwareKeyStore
from tests.cluster import Cluster, running_cluster
from tests.helpers import CddlChecker, Requester

FAST = {"block_interval": '"500ms"', "timeout_propose": '"500ms"',
        "timeout_prevote": '"300ms"', "timeout_precommit": '"300ms"'}
VALIDITY = 86400.0
BACKDATE = 300.0


def _heights_at_least(height: int) -> Any:
    return lambda s: s["height"] >= height


async def _same_chain(cluster: Cluster, nodes: list[int], upto: int) -> list[dict[str, Any]]:
    """Every node in ``nodes`` holds the same blocks 1..upto (no fork); returns them."""
    chains = [await cluster.blocks(i, 1, upto) for i in nodes]
    assert all(len(c) >= upto for c in chains), [len(c) for c in chains]
    for chain in chains[1:]:
        assert [b["block"] for b in chain[:upto]] == [b["block"] for b in chains[0][:upto]]
    return chains[0][:upto]


async def test_issuance_only_through_committed_blocks(tmp_path: Path, prover: stoq.Prover,
                                                      cddl: CddlChecker) -> None:
    with running_cluster(tmp_path / "c4", 4, checker=cddl, **FAST) as cluster:
        everyone = list(range(4))
        await cluster.wait_until(everyone, _heights_at_least(3), 60, "4 validators decide")
        async with await cluster.client(1) as client:
            requester = Requester(client, prover)
            result = await requester.issue(stoq.build_csr(
                ec.generate_private_key(ec.SECP256R1()), ["cluster.trust"], []))
        assert result["admission"] == "consensus"
        height = result["block_height"]
        # The commit certificate the client got: precommits of more than 2/3 of the set.
        validators = [cluster.id(i) for i in everyone]
        signers = {s["validator"] for s in result["signatures"]}
        assert signers <= set(validators) and len(signers) >= 3
        # Every validator holds that block; any of them checks that the signer issued
        # exactly what the block fixed (serial, validity, key).
        await cluster.wait_until(everyone, _heights_at_least(height + 1), 30, "block stored")
        stored = (await cluster.blocks(3, height, 1))[0]
        block = Block.from_wire(decode_item(stored["block"]))
        commit = Commit.from_wire(decode_item(stored["commit"]))
        assert block.id == result["block_hash"]
        status = await cluster.ask(3, "consensus.status")
        assert status is not None
        keys = [bytes.fromhex(n["public_key"]) for n in cluster.nodes]
        commit.verify(status["chain_id"], ValidatorSet(tuple(Validator(k) for k in keys)))
        cert = x509.load_der_x509_certificate(result["certificate"])
        index = next(i for i in range(len(block.decisions))
                     if matches_decision(cert, block, i, validity=VALIDITY,
                                         backdate=BACKDATE) is None)
        assert index >= 0
        # ... and a certificate the block did not fix is caught.
        other = x509.load_der_x509_certificate(result["chain"][0])  # not the leaf
        assert matches_decision(other, block, index, validity=VALIDITY,
                                backdate=BACKDATE) is not None
        await _same_chain(cluster, everyone, height)
        # Any validator finds the committed decision behind the certificate ...
        found = await cluster.ask(3, "consensus.check-certificate",
                                  {"certificate": result["certificate"]})
        assert found is not None and found["committed"] is True
        assert (found["block_height"], found["block_hash"]) == (height, block.id)
        # ... and catches one its signer made without consensus (here: node-2's own
        # intermediate key, taken from its keystore, signing outside the CA).
        rogue = _sign_outside_consensus(tmp_path / "c4" / "node-2" / "data", cert,
                                        x509.load_der_x509_certificate(result["chain"][0]))
        before = await cluster.ask(3, "consensus.status")
        caught = await cluster.ask(3, "consensus.check-certificate", {"certificate": rogue})
        after = await cluster.ask(3, "consensus.status")
        assert caught is not None and caught["committed"] is False and caught["reason"]
        assert before is not None and after is not None
        assert after["misbehaviour"] == before["misbehaviour"] + 1
        # The entry node's CT log (which logged that certificate) has its checkpoint
        # committed with C2SP cosignatures of more than 2/3 of the validators.
        sth = await cluster.ask(1, "ct.get-sth")
        assert sth is not None and sth["tree_size"] >= 1
        origin = sth["checkpoint"].split("\n", 1)[0]
        keys = {cluster.id(i): bytes.fromhex(cluster.nodes[i]["public_key"]) for i in everyone}
        for _ in range(120):
            answer = await cluster.ask(0, "consensus.checkpoint", {"origin": origin})
            if answer is not None and answer["checkpoints"][0]["size"] >= sth["tree_size"]:
                break
            await asyncio.sleep(0.25)
        assert answer is not None, "no cosigned checkpoint committed"
        cosigned = answer["checkpoints"][0]
        assert len(cosigned["cosigners"]) >= 3
        assert _c2sp_cosigners(cosigned["checkpoint"], status["chain_id"], keys) \
            == set(cosigned["cosigners"])


def _sign_outside_consensus(data_dir: Path, model: x509.Certificate,
                            issuer: x509.Certificate) -> bytes:
    """A copy of ``model`` with a fresh serial, signed directly with the issuer's key."""
    keystore = SoftwareKeyStore(data_dir / "keys")
    try:
        signer = next(s for s in (keystore.get(n) for n in keystore.names()) if s is not None
                      and s.public_key() == issuer.public_key())
        builder = (x509.CertificateBuilder().subject_name(model.subject)
                   .issuer_name(model.issuer).public_key(model.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(model.not_valid_before_utc)
                   .not_valid_after(model.not_valid_after_utc))
        for extension in model.extensions:
            builder = builder.add_extension(extension.value, extension.critical)
        return builder.sign(signer.private_key(), hashes.SHA256()).public_bytes(
            serialization.Encoding.DER)
    finally:
        keystore.close()


def _c2sp_cosigners(note: str, chain_id: str, keys: dict[str, bytes]) -> set[str]:
    """The validators whose cosignature/v1 lines in ``note`` verify (c2sp.org/tlog-cosignature)."""
    body, signatures = note.split("\n\n", 1)
    body += "\n"
    verified = set()
    for line in signatures.splitlines():
        name, blob_text = line.removeprefix("\u2014 ").rsplit(" ", 1)
        validator = name.rsplit("/", 1)[-1]
        key = keys.get(validator)
        if key is None or name != f"{chain_id}/validator/{validator}":
            continue  # the log's own signature
        blob = base64.b64decode(blob_text)
        assert blob[:4] == hashlib.sha256(name.encode() + b"\n\x04" + key).digest()[:4]
        timestamp = int.from_bytes(blob[4:12], "big")
        message = f"cosignature/v1\ntime {timestamp}\n{body}".encode()
        Ed25519PublicKey.from_public_bytes(key).verify(blob[12:], message)
        verified.add(validator)
    return verified


async def test_killed_validator_restarts_without_double_signing(tmp_path: Path,
                                                               cddl: CddlChecker) -> None:
    with running_cluster(tmp_path / "c4", 4, checker=cddl, **FAST) as cluster:
        everyone = list(range(4))
        await cluster.wait_until(everyone, _heights_at_least(3), 60, "4 validators decide")
        cluster.kill(3)  # SIGKILL, mid-height
        live = [0, 1, 2]
        before = (await cluster.statuses(live))[0]
        assert before is not None
        # 3 of 4 are a quorum: the others go on deciding
        await cluster.wait_until(live, _heights_at_least(before["height"] + 3), 60,
                                 "3 of 4 validators decide")
        cluster.start(3)
        now = (await cluster.statuses([0]))[0]
        assert now is not None
        # it catches up (blocks with their commits) and votes again
        statuses = await cluster.wait_until(
            everyone, _heights_at_least(now["height"] + 2), 90, "the restarted one catches up")
        # nobody has evidence against it: it never signed two conflicting votes
        for status in statuses.values():
            assert status["evidence"] == [] and status["isolated"] == []
        upto = min(s["height"] for s in statuses.values()) - 1
        await _same_chain(cluster, everyone, upto)


async def test_no_quorum_no_commit_then_recovery(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "c4", 4, **FAST) as cluster:
        everyone = list(range(4))
        await cluster.wait_until(everyone, _heights_at_least(3), 60, "4 validators decide")
        cluster.kill(2)
        cluster.kill(3)
        await asyncio.sleep(1.0)  # anything already in flight lands
        stuck = await cluster.statuses([0, 1])
        heights = {i: s["height"] for i, s in stuck.items() if s is not None}
        await asyncio.sleep(4.0)  # several block intervals and round timeouts
        later = await cluster.statuses([0, 1])
        # 2 of 4 is no quorum: no block is decided (and without 2f+1 votes of any kind
        # the round cannot end either: the two wait in prevote, re-sending their votes)
        assert {i: s["height"] for i, s in later.items() if s is not None} == heights
        assert all(s is not None and s["step"] != "propose" for s in later.values())
        cluster.start(2)
        cluster.start(3)
        target = max(heights.values()) + 2
        statuses = await cluster.wait_until(everyone, _heights_at_least(target), 90,
                                            "decisions resume")
        upto = min(s["height"] for s in statuses.values()) - 1
        await _same_chain(cluster, everyone, upto)
