"""Validator clusters of real processes on [::1]: one certificate authority whose every
validator executes every block (issue anywhere, answer everywhere, lose one, catch
up), byzantine shortcuts refused, a crashed and restarted validator, and a cluster
that loses its quorum.

The byzantine 7-validator case is tests/integration/test_production.py; the
algorithm's corner cases (locks, round skips, partitions, drops) are exercised
in simulation by tests/unit/test_bft_sim.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.dnssec
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

import stoq
from handlers.consensus.bft import Block, Commit, Validator, ValidatorSet
from protocol import Unauthorized, decode_item, revocation_statement
from protocol import ct_merkle as merkle
from store import DataDirectory, SoftwareKeyStore, verify_log
from tests.cluster import ENV, Cluster, running_cluster
from tests.helpers import CddlChecker, Requester
from trustchain._cli_consensus import check_commit, commit_document

FAST = {"block_interval": '"500ms"', "timeout_propose": '"500ms"',
        "timeout_prevote": '"300ms"', "timeout_precommit": '"300ms"'}
CHEAP_WORK = {"minimum_work_difficulty": "8"}
"""For many issuances: the requester's pure-Python work proof (16 bits by default in a
development cluster) would otherwise be what the test measures."""
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


async def test_one_ca_any_validator_answers_and_losing_one_loses_nothing(
        tmp_path: Path, prover: stoq.Prover, cddl: CddlChecker) -> None:
    """Issue through node-1; nodes 2-4 answer for it from their replicated state; kill
    node-1, revoke through node-2, restart node-1: it catches up to the same state.

    The cluster is made by the production ceremony: no node holds the root key."""
    with running_cluster(tmp_path / "c4", 4, checker=cddl, ceremony=True, **FAST) as cluster:
        everyone = list(range(4))
        for i in everyone:
            keys = {p.name for p in (tmp_path / "c4" / f"node-{i + 1}" / "data" / "keys")
                    .iterdir()}
            assert "validator.pem" in keys and "root.pem" not in keys, keys
        await cluster.wait_until(everyone, _keys_announced(4), 90, "every validator's keys")
        key = ec.generate_private_key(ec.SECP256R1())
        async with await cluster.client(0) as client:
            result = await Requester(client, prover).issue(stoq.build_csr(
                key, ["one.trust"], ["2001:db8::1"]))
        assert result["admission"] == "consensus"
        height = result["block_height"]
        # The commit certificate the client got: precommits of more than 2/3 of the set.
        signers = {s["validator"] for s in result["signatures"]}
        assert signers <= {cluster.id(i) for i in everyone} and len(signers) >= 3
        stored = (await cluster.blocks(3, height, 1))[0]
        block = Block.from_wire(decode_item(stored["block"]))
        assert block.id == result["block_hash"]
        status = await cluster.ask(3, "consensus.status")
        assert status is not None
        keys = [bytes.fromhex(n["public_key"]) for n in cluster.nodes]
        Commit.from_wire(decode_item(stored["commit"])).verify(
            status["chain_id"], ValidatorSet(tuple(Validator(k) for k in keys)))
        await _executed(cluster, everyone, height)
        anchors = await _cluster_ds(cluster, 0)
        assert len(anchors) == 4  # one KSK per validator (RFC 8901 multi-signer)
        for i in (1, 2, 3):
            await _answers_for(cluster, i, result, anchors, "valid")
        await _checkpoint_cosigned(cluster, status["chain_id"])

        cluster.kill(0)  # SIGKILL the entry node: nothing it issued is lost
        # nor its audit of it: a block's records are written and flushed together
        # before the answer
        audit_log = DataDirectory(tmp_path / "c4" / "node-1" / "data").audit_path
        report = verify_log(audit_log)
        assert report.ok, report.problems
        issued = [json.loads(line)["data"] for line in audit_log.read_text().splitlines()
                  if '"kind":"ca.issued"' in line]
        assert [(d["serial"], d["block_height"]) for d in issued
                if d["serial"] == result["serial"]] == [(result["serial"], height)]
        live = [1, 2, 3]
        for i in live:
            await _answers_for(cluster, i, result, anchors, "valid")
        now = int(time.time())
        statement = revocation_statement(result["serial"], "key_compromise", now)
        async with await cluster.client(1) as client:
            revoked = await Requester(client, prover).revoke({
                "serial": result["serial"], "reason": "key_compromise", "time": now,
                "signature": key.sign(statement, ec.ECDSA(hashes.SHA256()))})
        assert revoked["reason"] == "key_compromise" and not revoked["already_revoked"]
        await _executed(cluster, live, revoked["block_height"])
        for i in (2, 3):
            answer = await cluster.ask(i, "ca.validate", {"serial": result["serial"]})
            assert answer is not None and answer["status"] == "revoked", (i, answer)
            tlsa = await _doq(cluster, i, "_443._quic.one.trust", "TLSA")
            assert not [r for r in tlsa.answer if r.rdtype == dns.rdatatype.TLSA]

        cluster.start(0)
        await cluster.wait_until(everyone, _heights_at_least(height + 4), 90,
                                 "the restarted validator catches up")
        await _same_state(cluster, everyone)
        answer = await cluster.ask(0, "ca.validate", {"serial": result["serial"]})
        assert answer is not None and answer["status"] == "revoked"

        # node-3 loses its data directory (its keys, in its token, survive): the signed
        # intermediate is installed again and everything else is rebuilt from the blocks
        cluster.kill(2)
        node = tmp_path / "c4" / "node-3"
        for child in (node / "data").iterdir():
            if child.name != "keys":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        installed = subprocess.run(
            [sys.executable, "-m", "trustchain", "ceremony", "install", "--config",
             str(node / "config.toml"), "--certificate", str(node / "intermediate.pem"),
             "--root", str(tmp_path / "c4" / "root.pem")],
            capture_output=True, text=True, env=ENV, timeout=60)
        assert installed.returncode == 0, installed.stderr
        cluster.start(2)
        now = (await cluster.statuses([1]))[1]
        assert now is not None
        await cluster.wait_until([2], lambda s: s["state"]["height"] >= now["state"]["height"],
                                 120, "the rebuilt validator replays every block")
        await _same_state(cluster, everyone)
        answer = await cluster.ask(2, "ca.validate", {"serial": result["serial"]})
        assert answer is not None and answer["status"] == "revoked"
        verified = await cluster.ask(2, "fp.verify", {"fingerprint": result["fingerprint"]})
        assert verified is not None and verified["sct_valid"] and verified["included"], verified


async def _checkpoint_cosigned(cluster: Cluster, chain_id: str) -> None:
    """Node-1's CT checkpoint is committed with C2SP cosignatures of more than 2/3 of
    the validators."""
    sth = await cluster.ask(0, "ct.get-sth")
    assert sth is not None and sth["tree_size"] >= 1
    origin = sth["checkpoint"].split("\n", 1)[0]
    keys = {cluster.id(i): bytes.fromhex(cluster.nodes[i]["public_key"])
            for i in range(cluster.size)}
    answer = None
    for _ in range(120):
        answer = await cluster.ask(1, "consensus.checkpoint", {"origin": origin})
        if answer is not None and answer["checkpoints"][0]["size"] >= sth["tree_size"]:
            break
        await asyncio.sleep(0.25)
    assert answer is not None, "no cosigned checkpoint committed"
    cosigned = answer["checkpoints"][0]
    assert len(cosigned["cosigners"]) >= 3
    assert _c2sp_cosigners(cosigned["checkpoint"], chain_id, keys) == set(cosigned["cosigners"])


async def _executed(cluster: Cluster, nodes: list[int], height: int) -> None:
    """Wait until every node in ``nodes`` has executed the block at ``height`` (the client
    was answered once its entry validator had; the others follow within moments)."""
    await cluster.wait_until(nodes, lambda s: s["state"]["height"] >= height, 30,
                             f"block {height} executed")


def _keys_announced(count: int) -> Any:
    """A status predicate: the state holds ``count`` validators' announced keys (their
    DNSSEC keys among them), and this validator has not diverged."""
    return lambda s: (s["state"]["validators"] >= count and s["diverged"] is None)


async def _same_state(cluster: Cluster, nodes: list[int], attempts: int = 40) -> bytes:
    """Poll until every node reports the same executed height; then the hashes agree."""
    for _ in range(attempts):
        statuses = await cluster.statuses(nodes)
        states = {i: (s["state"]["height"], s["state"]["hash"])
                  for i, s in statuses.items() if s is not None}
        assert all(s is not None and s["diverged"] is None and s["state"]["corrupt"] is None
                   for s in statuses.values()), statuses
        if len(states) == len(nodes) and len({h for h, _ in states.values()}) == 1:
            assert len(set(states.values())) == 1, f"state hashes differ: {states}"
            return next(iter(states.values()))[1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"the nodes never reported one height together: {states}")


async def _doq(cluster: Cluster, index: int, name: str, rdtype: str) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, want_dnssec=True)
    return await dns.asyncquery.quic(query, "::1", port=cluster.port(index), verify=False,
                                     timeout=10)


async def _cluster_ds(cluster: Cluster, index: int) -> set[Any]:
    """The DS set of ``trust.`` as node ``index`` exports it for the parent zone."""
    health = await cluster.ask(index, "dns.health")
    assert health is not None
    lines = next(z["ds"] for z in health["zones"] if z["name"] == "trust.")
    return {dns.rrset.from_text("trust.", 3600, "IN", "DS", line.split(" DS ", 1)[1])[0]
            for line in lines}


async def _trusted_keys(cluster: Cluster, index: int, anchors: set[Any]) -> dns.rrset.RRset:
    """Node ``index``'s DNSKEY set for ``trust.``, validated under the cluster's DS set."""
    origin = dns.name.from_text("trust.")
    response = await _doq(cluster, index, "trust.", "DNSKEY")
    dnskeys = response.find_rrset(response.answer, origin, dns.rdataclass.IN,
                                  dns.rdatatype.DNSKEY)
    sig = response.find_rrset(response.answer, origin, dns.rdataclass.IN, dns.rdatatype.RRSIG,
                              dns.rdatatype.DNSKEY)
    ksks = [k for k in dnskeys if dns.dnssec.make_ds(origin, k, "SHA256") in anchors]
    assert ksks, f"node {index}: no DNSKEY matches the cluster's DS set"
    dns.dnssec.validate(dnskeys, sig, {origin: dns.rrset.from_rdata_list(origin, 3600, ksks)})
    return dnskeys


def _validated(response: dns.message.Message, dnskeys: dns.rrset.RRset,
               rdtype: int) -> list[str]:
    """The ``rdtype`` records of the answer, each RRset checked against its RRSIG."""
    keys = {dns.name.from_text("trust."): dnskeys}
    found = []
    for rrset in response.answer:
        if rrset.rdtype == rdtype:
            sig = response.find_rrset(response.answer, rrset.name, dns.rdataclass.IN,
                                      dns.rdatatype.RRSIG, rdtype)
            dns.dnssec.validate(rrset, sig, keys)
            found += [r.to_text() for r in rrset]
    return found


async def _answers_for(cluster: Cluster, index: int, result: dict[str, Any],
                       anchors: set[Any], status: str) -> None:
    """Node ``index`` answers for the certificate ``result`` from its own state: its
    status, its AAAA and TLSA records under the cluster's DNSSEC identity, its
    fingerprint (SCT and inclusion) and its CT inclusion proof."""
    answer = await cluster.ask(index, "ca.validate", {"serial": result["serial"]})
    assert answer is not None and answer["status"] == status, (index, answer)
    # the certificate this validator assembled from the committed precertificate, SCT
    # list and signature is the one the entry answered, byte for byte, and it verifies
    assert answer["certificate"] == result["certificate"], index
    assert answer["fingerprint"] == hashlib.sha256(result["certificate"]).hexdigest()
    _openssl_verifies(cluster, answer["certificate"], answer["chain"])
    dnskeys = await _trusted_keys(cluster, index, anchors)
    aaaa = await _doq(cluster, index, "one.trust", "AAAA")
    assert _validated(aaaa, dnskeys, dns.rdatatype.AAAA) == ["2001:db8::1"]
    tlsa = await _doq(cluster, index, "_443._quic.one.trust", "TLSA")
    spki = hashlib.sha256(x509.load_der_x509_certificate(result["certificate"]).public_key()
                          .public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    assert _validated(tlsa, dnskeys, dns.rdatatype.TLSA) == [f"3 1 1 {spki.hexdigest()}"]
    verified = await cluster.ask(index, "fp.verify", {"fingerprint": result["fingerprint"]})
    assert verified is not None and verified["valid"] and verified["sct_valid"], verified
    merkle.verify_inclusion(verified["leaf_index"], verified["tree_size"],
                            verified["leaf_hash"], verified["audit_path"],
                            verified["sha256_root_hash"])
    proof = await cluster.ask(index, "ct.get-proof-by-hash", {
        "hash": verified["leaf_hash"], "tree_size": verified["tree_size"], "shard":
        verified["shard"]})
    assert proof is not None and proof["leaf_index"] == verified["leaf_index"]


def _openssl_verifies(cluster: Cluster, der: bytes, chain: list[bytes]) -> None:
    """``openssl verify -x509_strict`` accepts ``der`` through ``chain`` (the issuing
    intermediate, then the root) to the cluster's root."""
    directory = cluster.directory / "openssl-check"
    directory.mkdir(exist_ok=True)

    def pem(name: str, *certificates: bytes) -> str:
        path = directory / name
        path.write_bytes(b"".join(x509.load_der_x509_certificate(c).public_bytes(
            serialization.Encoding.PEM) for c in certificates))
        return str(path)
    verified = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", pem("root.pem", chain[-1]),
         "-untrusted", pem("chain.pem", *chain[:-1]), pem("leaf.pem", der)],
        capture_output=True, text=True, timeout=30)
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_many_issuances_one_state_and_byzantine_shortcuts_refused(
        tmp_path: Path, prover: stoq.Prover, cddl: CddlChecker) -> None:
    """Five validators, node-5 byzantine: it proposes proof-free issuances (refused by
    every honest one) and then signs a certificate without a decision, which reaches a
    validator through ct.add-chain (evidence: it is isolated, also after a restart).
    Meanwhile 1,000 issuances spread over nodes 1-4 leave one state."""
    forger = 4
    with running_cluster(tmp_path / "c5", 5, forgers=(forger,), checker=cddl,
                         **FAST, **CHEAP_WORK) as cluster:
        honest = [0, 1, 2, 3]
        await cluster.wait_until(honest, _keys_announced(5), 90, "every validator's keys")
        results = await _issue_many(cluster, prover, honest, ISSUANCES)
        assert len({r["serial"] for r in results}) == ISSUANCES
        await _same_state(cluster, honest)
        # every honest validator refused the forger's proof-free decisions ...
        statuses = await cluster.wait_until(
            honest, lambda s: s["refused"].get(cluster.id(forger), 0) >= 1, 60,
            "the proof-free decisions refused")
        for status in statuses.values():
            assert set(status["refused"]) == {cluster.id(forger)}
        # ... and none was ever committed: no certificate for its name exists anywhere.
        for i in honest:
            found = await cluster.ask(i, "fp.get", {"name": "forged.trust"})
            assert found is None, found
        forged = cluster.log(forger).read_text()
        assert '"forged": "proof-free"' in forged and '"not committed"' in forged

        # A certificate signed by the forger's intermediate without a decision is
        # self-proving evidence: any validator that sees it submits it; it is isolated.
        sample = results[0]
        issuer = await cluster.ask(forger, "ca.chain")
        assert issuer is not None
        rogue = _sign_outside_consensus(tmp_path / "c5" / f"node-{forger + 1}" / "data",
                                        x509.load_der_x509_certificate(sample["certificate"]),
                                        x509.load_der_x509_certificate(issuer["chain"][0]))
        logged = await cluster.ask(2, "ct.add-chain", {"chain": [rogue, issuer["chain"][0]]})
        assert logged is not None and logged["shard"] == 0
        await cluster.wait_until(honest, lambda s: cluster.id(forger) in s["isolated"], 60,
                                 "the misissuing validator isolated")
        caught = await cluster.ask(0, "consensus.check-certificate", {"certificate": rogue})
        assert caught is not None and caught["committed"] is False and caught["reason"]
        # ... and the isolation is durable: it survives a restart.
        cluster.kill(1)
        cluster.start(1)
        await cluster.wait_until([1], lambda s: cluster.id(forger) in s["isolated"], 60,
                                 "isolation after a restart")
        # The honest four go on as one CA.
        async with await cluster.client(3) as client:
            last = await Requester(client, prover).issue(stoq.build_csr(
                ec.generate_private_key(ec.SECP256R1()), ["after.trust"], []))
        await _executed(cluster, honest, last["block_height"])
        for i in honest:
            answer = await cluster.ask(i, "ca.validate", {"serial": last["serial"]})
            assert answer is not None and answer["status"] == "valid"
        await _same_state(cluster, honest)
        # A client checks each commit against the set of its own height: the forger
        # voted with power 1 before its isolation, and counts for nothing after it.
        for result, forger_power in ((sample, 1), (last, 0)):
            for i in honest:
                deciding = await cluster.ask(i, "consensus.validators",
                                             {"height": result["block_height"]})
                assert deciding is not None
                powers = {v["id"]: v["power"] for v in deciding["validators"]}
                assert powers[cluster.id(forger)] == forger_power
                document = commit_document(result)
                assert document is not None
                checked = check_commit(document, deciding)
                assert checked.total_power == 4 + forger_power


ISSUANCES = 1000
IN_FLIGHT = 64


async def _issue_many(cluster: Cluster, prover: stoq.Prover, nodes: list[int],
                      count: int) -> list[dict[str, Any]]:
    """``count`` issuances, round-robin over ``nodes``, ``IN_FLIGHT`` at a time."""
    clients = [await cluster.client(i, timeout=60.0) for i in nodes]
    try:
        requesters = [Requester(c, prover) for c in clients]
        for requester in requesters:
            await requester._stake()
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def one(n: int) -> dict[str, Any]:
            async with slots:
                csr = stoq.build_csr(ec.generate_private_key(ec.SECP256R1()),
                                     [f"n{n}.many.trust"], [])
                return await requesters[n % len(requesters)].issue(csr)

        started = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(count))), 600)
        print(f"{count} issuances over {len(nodes)} validators in "
              f"{time.monotonic() - started:.1f} s")
        return list(results)
    finally:
        for client in clients:
            await client.close()


async def test_forged_batch_seals_refused_and_counted_against_their_sender(
        tmp_path: Path, prover: stoq.Prover, cddl: CddlChecker) -> None:
    """Four validators, node-4 forging seals (tests/byzantine.py --forge bad-seal): a
    body with a path that does not lead to the root it signed, and a body under another
    validator's entry and signature. Every honest validator refuses both and counts
    them against the forger, never against the validator whose seal was borrowed, and
    refuses the forger's decision groups signed over their bodies in another order;
    meanwhile concurrent issuances are sealed in batches, cross the links as decision
    groups and are committed."""
    forger = 3
    with running_cluster(tmp_path / "c4", 4, forgers=(forger,), forge="bad-seal",
                         checker=cddl, **FAST, **CHEAP_WORK) as cluster:
        honest = [0, 1, 2]
        await cluster.wait_until(honest, _keys_announced(4), 90, "every validator's keys")
        results = await _issue_many(cluster, prover, honest, 48)
        statuses = await cluster.wait_until(
            honest, lambda s: s["refused"].get(cluster.id(forger), 0) >= 4, 60,
            "the forged seals refused")
        for status in statuses.values():
            assert set(status["refused"]) == {cluster.id(forger)}, status["refused"]
        forged = cluster.log(forger).read_text()
        assert '"variant": "forged-path"' in forged and '"variant": "foreign-root"' in forged
        assert '"variant": "forged-group"' in forged
        for i in honest:
            log = cluster.log(i).read_text()
            assert "batch root does not verify" in log, f"node-{i + 1} refused nothing"
            assert "sent a decision group that does not open" in log, f"node-{i + 1}"
        # honest decisions were sealed in batches, and committed
        height = max(r["block_height"] for r in results)
        await _executed(cluster, honest, height)
        kinds: dict[str, int] = {}
        for entry in await cluster.blocks(0, 1, 256):
            for raw in Block.from_wire(decode_item(entry["block"])).decisions:
                item = decode_item(raw)
                form = "batch" if "batch" in item else "plain"
                kinds[form] = kinds.get(form, 0) + 1
        assert kinds.get("batch", 0) > 0, kinds
        print(f"decisions committed by form: {kinds}")
        # whole batches crossed the links as decision groups; every honest one opened,
        # and the forger's (signed in another order) were refused and counted against it
        statuses = await cluster.wait_until(list(range(4)), lambda s: True, 10, "statuses")
        groups = {i: s["decision_groups"] for i, s in statuses.items()}
        print(f"decision groups by node: {groups}")
        assert sum(groups[i]["sent"] for i in honest) >= 1, groups
        assert sum(groups[i]["received"] for i in honest) >= 2, groups
        assert groups[forger]["received"] >= 1 and groups[forger]["refused"] == 0, groups
        for i in honest:
            assert groups[i]["refused"] >= 1 and statuses[i]["misbehaviour"] >= 1, groups
        await _same_state(cluster, honest)


def _sign_outside_consensus(data_dir: Path, model: x509.Certificate,
                            issuer: x509.Certificate) -> bytes:
    """A copy of ``model`` with a fresh serial, signed directly with the issuer's key."""
    keystore = SoftwareKeyStore(data_dir / "keys")
    try:
        signer = next(s for s in (keystore.get(n) for n in keystore.names()) if s is not None
                      and s.public_key() == issuer.public_key())
        builder = (x509.CertificateBuilder().subject_name(model.subject)
                   .issuer_name(issuer.subject).public_key(model.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(model.not_valid_before_utc)
                   .not_valid_after(model.not_valid_after_utc))
        skip = (x509.AuthorityKeyIdentifier, x509.PrecertificateSignedCertificateTimestamps)
        for extension in model.extensions:
            if not isinstance(extension.value, skip):
                builder = builder.add_extension(extension.value, extension.critical)
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
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
        # 3 of 4 are a quorum: the others go on deciding ...
        await cluster.wait_until(live, _heights_at_least(before["height"] + 3), 60,
                                 "3 of 4 validators decide")
        # ... and refuse an impostor that took node-4's address (a node with its own key)
        missing = cluster.id(3)
        with _impostor(cluster, 3, tmp_path / "impostor"):
            statuses = await cluster.wait_until(
                live, lambda s: missing in s["links"], 60, "the impostor refused")
            reasons = {i: s["links"][missing] for i, s in statuses.items()}
            assert all("not answer as a validator" in r for r in reasons.values()), reasons
        # an outsider cannot pass for a validator either
        async with await cluster.client(0) as client:
            with pytest.raises(Unauthorized, match="not a validator link"):
                await client.request("consensus.gossip", {"messages": [],
                                                          "sender": cluster.id(1)})
            with pytest.raises(Unauthorized, match="link statement does not verify"):
                await client.request("consensus.gossip", {"messages": [],
                                                          "sender": cluster.id(1),
                                                          "link": b"\x00" * 64})
            # nothing is inflated before the sender is known (spec §18.3)
            with pytest.raises(Unauthorized, match="link statement does not verify"):
                await client.request("consensus.gossip", {"packed": b"\x78\x9c" + bytes(64),
                                                          "sender": cluster.id(1),
                                                          "link": b"\x00" * 64})
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
        # the real node-4 is back: every link to it authenticates again (on each one's
        # next send, after its back-off)
        await cluster.wait_until(everyone, lambda s: missing not in s["links"], 30,
                                 "node-4's links accepted again")


@contextlib.contextmanager
def _impostor(cluster: Cluster, index: int, directory: Path) -> Iterator[None]:
    """A development node with its own keys serving on node ``index``'s endpoint."""
    directory.mkdir()
    text = cluster.config(index).read_text()
    original = tomllib.loads(text)["node"]["data_dir"]
    config = directory / "config.toml"
    config.write_text(text.replace(original, str(directory / "data")))
    with (directory / "test.log").open("ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "trustchain", "serve", "--config",
                                    str(config)], stdout=out, stderr=out, env=ENV)
    try:
        yield
    finally:
        process.kill()
        process.wait(10)


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
