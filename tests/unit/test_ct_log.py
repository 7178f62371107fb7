"""The CT log without a socket: real keys (software keystore), the real replicated
state (SQLite) and tiles in a temporary directory, real certificate chains.

The log is block-driven: entries are appended per block (``CtLog.append``), the
tiles staged, the state transaction applied, then the batch published, the order
``CaStateMachine.execute`` uses (:class:`tests.state_fixtures_ct.CtNode`). Submissions
go through real blocks of a lone validator (:class:`tests.state_fixtures_ct.LoneValidator`).

SCTs, duplicates, precertificates (the CA's issuance flow and ``add-pre-chain``),
bad chains, proofs, restarts, crashes between the steps of a block, two writers,
every validator computing the same tree, shard rollover, tampered tiles, the
subscription's backfill, live follow, filters and slow-consumer resume.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import stoq
from handlers import RequestContext
from handlers.ca import _leaf_der, _x509, check_request, validity
from handlers.ct import CtService, Logged
from handlers.replica import (
    CompactCertificate,
    Issue,
    SignedCertificate,
    ValidatorKeys,
    raise_refused,
)
from protocol import ConsensusRejected, Event, InvalidRequest, NotFound, Peer, Unavailable
from protocol import ct_merkle as merkle
from protocol import ct_structs as ct
from protocol.ops import ct as ops
from protocol.ops.consensus import issue_digest
from store import MultisetHash, StateError, TileCorrupted, TileError

from ..ca_fixtures import CaForTests, make_ca
from ..state_fixtures_ct import (
    BACKDATE,
    EPOCH_LENGTH,
    LIFETIME,
    ORIGIN,
    PARAMS,
    POLICY,
    CtNode,
    LoneValidator,
    cluster_ca,
    now,
    now_ms,
)

DER = serialization.Encoding.DER
CTX = RequestContext(peer=Peer(address="::1", port=1, alpn="stoq/1"), op="test", received_at=0)


@pytest.fixture
def ca() -> CaForTests:
    return make_ca()


def sct_of(result: dict[str, Any]) -> ct.SignedCertificateTimestamp:
    """The SCT of a ``ct.add-chain`` answer."""
    return ct.SignedCertificateTimestamp(log_id=result["id"], timestamp=result["timestamp"],
                                         extensions=result["extensions"],
                                         signature=result["signature"])


def check_sct(sct: ct.SignedCertificateTimestamp, der: bytes, key: Any) -> None:
    """Raises ``SignatureError`` unless ``sct`` is ``key``'s log's SCT for certificate ``der``."""
    entry = ct.TimestampedEntry(timestamp=sct.timestamp, entry_type=ct.X509_ENTRY,
                                certificate=der, extensions=sct.extensions)
    ct.verify_sct(sct, key, ct.X509_ENTRY, entry.signed_entry())


def chains(ca: CaForTests, prefix: str, count: int) -> list[list[bytes]]:
    return [[ca.leaf(f"{prefix}{i}.trust"), ca.der] for i in range(count)]


def staged(node_dir: Path, shard: int = 0) -> list[str]:
    """The tile bundles waiting in a shard's staging area."""
    staging = node_dir / "ct" / str(shard) / "staging"
    return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# --- submissions through blocks (a lone validator) -----------------------------------------


async def test_add_chain_commits_through_blocks_scts_verify_and_survive_a_restart(
        tmp_path: Path, ca: CaForTests) -> None:
    v = await LoneValidator.start(tmp_path, ca)
    try:
        svc = v.service
        leaves = [ca.leaf(f"h{i}.trust") for i in range(40)]
        results = await asyncio.gather(*(svc.add_chain(ops.AddChainArgs(chain=[d, ca.der]), CTX)
                                         for d in leaves))
        key = v.log.active.signer.public_key()
        assert sorted(r["leaf_index"] for r in results) == list(range(40))
        for der, r in zip(leaves, results, strict=True):
            sct = sct_of(r)
            assert sct.leaf_index == r["leaf_index"] and r["sct_version"] == 0
            assert r["shard"] == 0 and r["id"] == v.log.active.log_id
            check_sct(sct, der, key)
        assert 1 <= v.blocks < 40  # submissions share blocks
        assert v.machine.height == v.blocks  # every committed block was executed
        sth = svc.get_sth(ops.GetSthArgs(), CTX)
        assert sth["tree_size"] == 40
        ct.verify_tree_head(key, sth["timestamp"], 40, sth["sha256_root_hash"],
                            sth["tree_head_signature"])
        ct.verify_checkpoint(sth["checkpoint"], f"{ORIGIN}/0", key)
        assert v.node.state.ct_shards() == [(0, 40, sth["sha256_root_hash"])]
        # A duplicate is answered from the state, with the very same SCT, without a block.
        await v.node.state.drain()
        height = v.blocks
        again = await svc.add_chain(ops.AddChainArgs(chain=[leaves[7], ca.der]), CTX)
        assert again == results[7]
        assert v.blocks == height
        # Identical submissions at once: one entry for all, each SCT valid for it.
        twin = ca.leaf("twin.trust")
        same = await asyncio.gather(*(svc.add_chain(ops.AddChainArgs(chain=[twin, ca.der]), CTX)
                                      for _ in range(3)))
        assert {s["leaf_index"] for s in same} == {40}
        for s in same:
            check_sct(sct_of(s), twin, key)
        assert v.log.active.size == 41
        sth = svc.get_sth(ops.GetSthArgs(), CTX)
    finally:
        await v.stop()
    # A new process sees everything: the chain, the state and the tiles agree.
    v2 = await LoneValidator.start(tmp_path, ca)
    try:
        svc2 = v2.service
        assert v2.machine.corrupt is None and v2.machine.height == v2.blocks
        assert v2.log.active.size == 41 and v2.log.active.checkpoint.root == \
            sth["sha256_root_hash"]
        entries = svc2.get_entries(ops.GetEntriesArgs(start=0, end=39), CTX)["entries"]
        assert len(entries) == 40
        by_index = {r["leaf_index"]: d for r, d in zip(results, leaves, strict=True)}
        for i, e in enumerate(entries):
            te = ct.parse_merkle_tree_leaf(e["leaf_input"])
            assert te.certificate == by_index[i] and te.leaf_index == i
            _, chain = ct.parse_extra_data(ct.X509_ENTRY, e["extra_data"])
            assert chain == [ca.der, ca.root_der]
            proof = svc2.get_proof_by_hash(ops.GetProofByHashArgs(
                hash=merkle.leaf_hash(e["leaf_input"]), tree_size=41), CTX)
            assert proof["leaf_index"] == i
            merkle.verify_inclusion(i, 41, merkle.leaf_hash(e["leaf_input"]),
                                    proof["audit_path"], sth["sha256_root_hash"])
        dup = await svc2.add_chain(ops.AddChainArgs(chain=[leaves[3], ca.der]), CTX)
        assert dup == results[3]  # the SCT signed before the restart was kept
        assert v2.log.active.size == 41
    finally:
        await v2.stop()


def make_csr(*names: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()).public_bytes(DER))


async def test_issuance_logs_its_precertificate_and_the_embedded_sct_verifies(
        tmp_path: Path, plotted: Path) -> None:
    """The CA's flow: an issuance decision logs the precertificate, the SCT goes into the
    certificate, and every validator checks that SCT against the announced log key."""
    ca = cluster_ca()
    prover = stoq.Prover.open(plotted)
    v = await LoneValidator.start(tmp_path, ca, genesis={prover.key_id: PARAMS.minimum_stake})
    try:
        shard = v.log.active
        raise_refused(await v.decisions.commit(ValidatorKeys(
            intermediates=(ca.der,), ct_logs=((0, shard.public_key_der()),), dnskeys=(),
            admins=(), at_ms=now_ms())))
        record = await v.verifier.beacons.current()
        beacon = stoq.Beacon(epoch=record.epoch, start=record.start,
                             end=record.start + EPOCH_LENGTH, value=record.value,
                             params=PARAMS, development=True)
        csr = make_csr("www.hypermesh", "api.trust")
        proofs = prover.build("issue", issue_digest(csr), beacon,
                              prover.credential_for(beacon)).to_wire()
        request = check_request(csr, POLICY)
        at_ms = now_ms()
        not_before, not_after = validity(at_ms, lifetime=LIFETIME, backdate=BACKDATE,
                                         issuer=ca.intermediate)
        serial = _x509.new_serial()

        def sign(extension: x509.Extension[x509.ExtensionType]) -> bytes:
            return _x509.sign_leaf(ca.intermediate, request, serial=serial,
                                   not_before=not_before, not_after=not_after,
                                   extensions=[extension], private_key=ca.key)

        reserved = await v.decisions.commit(Issue(
            csr=csr, proofs=proofs, precertificate=sign(_x509.precertificate_poison()),
            at_ms=at_ms))
        raise_refused(reserved)
        logged = reserved.logged
        assert logged is not None and logged.fresh and (logged.shard, logged.leaf_index) == (0, 0)
        sct = v.log.sct(logged).sct
        # An SCT whose signature does not verify is refused by the state machine.
        forged = ct.SignedCertificateTimestamp(
            log_id=sct.log_id, timestamp=sct.timestamp, extensions=sct.extensions,
            signature=ct.digitally_signed(ec.generate_private_key(ec.SECP256R1()).sign(
                b"forged", ec.ECDSA(hashes.SHA256()))))
        refused = await v.decisions.commit(SignedCertificate(
            serial=_x509.serial_hex(serial),
            certificate=sign(_x509.sct_list([forged.encode()])), at_ms=now_ms()))
        assert not refused.accepted and "does not verify" in refused.message
        # So is a compact decision of it (the SCT list and the signature alone) ...
        precert = sign(_x509.precertificate_poison())
        forged_list = ct.encode_sct_list([forged.encode()])
        refused = await v.decisions.commit(CompactCertificate(
            serial=_x509.serial_hex(serial), sct_list=forged_list,
            signature=_leaf_der.signature(ct.certificate_tbs(precert, forged_list), ca.key),
            at_ms=now_ms()))
        assert not refused.accepted and "does not verify" in refused.message
        # ... and one whose SCT list does not parse, before the vote.
        with pytest.raises(ConsensusRejected, match="the SCT list cannot be read"):
            await v.decisions.commit(CompactCertificate(
                serial=_x509.serial_hex(serial), sct_list=b"\x00\x03\x00\x01\x00",
                signature=bytes(70), at_ms=now_ms()))
        final_der = sign(_x509.sct_list([sct.encode()]))
        raise_refused(await v.decisions.commit(SignedCertificate(
            serial=_x509.serial_hex(serial), certificate=final_der, at_ms=now_ms())))
        stored = v.node.state.get(_x509.serial_hex(serial))
        assert stored is not None and stored.der == final_der
        assert (stored.ct_shard, stored.ct_index) == (0, 0)
        final = x509.load_der_x509_certificate(final_der)
        (embedded,) = ct.embedded_scts(final)
        key = shard.signer.public_key()
        entry = ct.verify_embedded_sct(final, ca.intermediate, embedded, key)
        leaf = merkle.leaf_hash(entry.merkle_tree_leaf())
        svc = v.service
        proof = svc.get_proof_by_hash(ops.GetProofByHashArgs(hash=leaf, tree_size=1), CTX)
        merkle.verify_inclusion(embedded.leaf_index, 1, leaf, proof["audit_path"],
                                v.log.active.checkpoint.root)
        got = svc.get_entry_and_proof(ops.GetEntryAndProofArgs(leaf_index=0, tree_size=1), CTX)
        pre, chain = ct.parse_extra_data(ct.PRECERT_ENTRY, got["extra_data"])
        assert x509.load_der_x509_certificate(pre).extensions.get_extension_for_oid(
            ct.POISON_OID)
        assert chain == [ca.der, ca.root_der]
        # add-pre-chain of a precertificate built by hand.
        pre_der, pre_builder = ca.precert("x.trust")
        r = await svc.add_pre_chain(ops.AddChainArgs(chain=[pre_der, ca.der, ca.root_der]), CTX)
        assert r["leaf_index"] == 1
        final2 = pre_builder.add_extension(x509.UnrecognizedExtension(
            ct.SCT_LIST_OID, ct.sct_list_extension_value([sct_of(r).encode()])),
            critical=False).sign(ca.key, hashes.SHA256())
        ct.verify_embedded_sct(final2, ca.intermediate, ct.embedded_scts(final2)[0], key)
    finally:
        await v.stop()


async def test_bad_chains_each_get_a_specific_error(tmp_path: Path, ca: CaForTests) -> None:
    node = CtNode.open(tmp_path, [ca.root_der])
    svc = CtService(node.log, node.chains, clock=now)  # no decisions: an observer
    try:
        other = make_ca("Other")
        t = now()
        cases = {
            "empty_chain": [],
            "bad_certificate": [b"\x30\x03garbage"],
            "unknown_root": [other.leaf("a.trust"), other.der],
            "expired": [ca.leaf("old.trust", not_before=t - 7200, lifetime=3600), ca.der],
            "not_yet_valid": [ca.leaf("new.trust", not_before=t + 3600), ca.der],
            "chain_broken": [ca.leaf("b.trust"), other.der],
            "precertificate": [ca.precert("p.trust")[0], ca.der],
        }
        for reason, chain in cases.items():
            with pytest.raises(InvalidRequest) as info:
                await svc.add_chain(ops.AddChainArgs(chain=chain), CTX)
            assert info.value.details["reason"] == reason, (reason, info.value.message)
            assert info.value.details["field"] == "chain"
        with pytest.raises(InvalidRequest) as info:
            await svc.add_pre_chain(ops.AddChainArgs(chain=[ca.leaf("c.trust"), ca.der]), CTX)
        assert info.value.details["reason"] == "not_precertificate"
        assert node.log.active.size == 0 and node.state.ct_shards() == []
        # A node without decisions cannot log a new chain...
        ok = [ca.leaf("ok.trust"), ca.der]
        with pytest.raises(Unavailable, match="submit to a validator"):
            await svc.add_chain(ops.AddChainArgs(chain=ok), CTX)
        # ... but once a block logged it, it answers with its own SCT.
        await node.block([node.entry(ok)])
        r = await svc.add_chain(ops.AddChainArgs(chain=ok), CTX)
        assert r["leaf_index"] == 0
        check_sct(sct_of(r), ok[0], node.log.active.signer.public_key())
        reads: dict[str, Callable[[], Any]] = {
            "range_reversed": lambda: svc.get_entries(ops.GetEntriesArgs(start=1, end=0), CTX),
            "range_too_large": lambda: svc.get_entries(ops.GetEntriesArgs(start=0, end=5000),
                                                       CTX),
            "beyond_tree": lambda: svc.get_entries(ops.GetEntriesArgs(start=1, end=1), CTX),
        }
        for reason, call in reads.items():
            with pytest.raises(InvalidRequest) as info:
                call()
            assert info.value.details["reason"] == reason
        with pytest.raises(InvalidRequest, match="beyond"):
            svc.get_sth_consistency(ops.GetSthConsistencyArgs(first=1, second=2), CTX)
        with pytest.raises(InvalidRequest, match="beyond"):
            svc.get_proof_by_hash(ops.GetProofByHashArgs(hash=b"\x00" * 32, tree_size=2), CTX)
        with pytest.raises(NotFound):
            svc.get_proof_by_hash(ops.GetProofByHashArgs(hash=b"\x00" * 32, tree_size=1), CTX)
        with pytest.raises(NotFound):
            svc.get_sth(ops.GetSthArgs(shard=3), CTX)
        assert svc.get_entries(ops.GetEntriesArgs(start=0, end=999), CTX)["entries"]  # clamped
    finally:
        await node.close()


# --- blocks: the same tree everywhere, once, durably ---------------------------------------


async def test_every_validator_computes_the_same_tree_and_signs_it_with_its_own_keys(
        tmp_path: Path, ca: CaForTests) -> None:
    a = CtNode.open(tmp_path / "a", [ca.root_der], max_entries_per_shard=4)
    b = CtNode.open(tmp_path / "b", [ca.root_der], max_entries_per_shard=4)
    try:
        pre_der, _ = ca.precert("pre.trust")
        blocks: list[list[tuple[list[bytes], bool]]] = [
            [(c, False) for c in chains(ca, "a", 3)],
            [([pre_der, ca.der], True), *((c, False) for c in chains(ca, "b", 2))],
            [(c, False) for c in chains(ca, "c", 4)],
        ]
        start = now_ms()
        logged: dict[str, list[Logged]] = {"a": [], "b": []}
        for i, block in enumerate(blocks):
            for name, node in (("a", a), ("b", b)):
                batch = await node.block([node.entry(c, precert=p) for c, p in block],
                                         start + 1000 * i)
                logged[name] += batch.logged
        # The replicated rows are the same, row for row, and so is the state hash.
        assert a.state.ct_shards() == b.state.ct_shards()
        assert [(s, n) for s, n, _ in a.state.ct_shards()] == [(0, 4), (1, 4), (2, 2)]
        assert list(a.state.rows()) == list(b.state.rows())
        assert a.state.meta("state_hash") == b.state.meta("state_hash") is not None
        assert a.rows == b.rows == MultisetHash.of(a.state.rows())  # kept block by block
        assert [(x.shard, x.leaf_index, x.timestamp) for x in logged["a"]] == \
            [(x.shard, x.leaf_index, x.timestamp) for x in logged["b"]]
        # What each signs is its own: log ids, SCTs, tree heads.
        assert not {s.log_id for s in a.log.shards} & {s.log_id for s in b.log.shards}
        for x, der in ((logged["a"][0], blocks[0][0][0][0]),
                       (logged["a"][-1], blocks[2][3][0][0])):
            key_a = a.log.shard(x.shard).signer.public_key()
            key_b = b.log.shard(x.shard).signer.public_key()
            check_sct(a.log.sct(x).sct, der, key_a)
            check_sct(b.log.sct(x).sct, der, key_b)
            with pytest.raises(ct.SignatureError):
                check_sct(a.log.sct(x).sct, der, key_b)
        for sa, sb in zip(a.log.shards, b.log.shards, strict=True):
            assert (sa.checkpoint.size, sa.checkpoint.root) == \
                (sb.checkpoint.size, sb.checkpoint.root)
            ct.verify_checkpoint(sa.checkpoint.note, f"{ORIGIN}/{sa.number}",
                                 sa.signer.public_key())
            with pytest.raises(ct.SignatureError):
                ct.verify_tree_head(sb.signer.public_key(), sa.checkpoint.timestamp,
                                    sa.checkpoint.size, sa.checkpoint.root,
                                    sa.checkpoint.signature)
    finally:
        await a.close()
        await b.close()


async def test_a_block_logs_an_entry_once_and_cannot_be_applied_twice(
        tmp_path: Path, ca: CaForTests) -> None:
    node = CtNode.open(tmp_path, [ca.root_der])
    try:
        der, other = [ca.leaf("once.trust"), ca.der], [ca.leaf("other.trust"), ca.der]
        t1 = now_ms()
        batch = await node.block([node.entry(der), node.entry(other), node.entry(der)], t1)
        first, second, third = batch.logged
        assert first == third and first.fresh and (first.shard, first.leaf_index) == (0, 0)
        assert (second.leaf_index, second.timestamp) == (1, t1)
        assert node.log.active.size == 2
        root, rows = node.log.active.tiles.root, node.rows.copy()
        # A later block logging them again: the first places, nothing appended or written.
        again, changes = node.begin([node.entry(other), node.entry(der)], t1 + 5000)
        assert [(x.shard, x.leaf_index, x.timestamp, x.fresh) for x in again.logged] == \
            [(0, 1, t1, False), (0, 0, t1, False)]
        assert again.writes == [] and again.new_shards == []
        assert changes.upserts == {} and changes.ct_heads == [] and node.rows == rows
        await node.log.stage(again)
        node.commit(changes)
        node.log.published(again)
        assert node.log.active.size == 2 and node.log.active.tiles.root == root
        assert node.state.ct_shards() == [(0, 2, root)]
        # The same block once more: the state refuses a height it already has.
        with pytest.raises(StateError, match="does not follow"):
            node.state.apply(changes)
        assert node.state.height() == 2
        assert MultisetHash.of(node.state.rows()) == node.rows
    finally:
        await node.close()


async def test_crash_between_staging_and_the_state_commit_recovers_on_open(
        tmp_path: Path, ca: CaForTests) -> None:
    """Tiles staged for a block whose state transaction never committed are discarded at
    the next start; executing the block again gives every validator's tree."""
    a = CtNode.open(tmp_path / "a", [ca.root_der])
    b = CtNode.open(tmp_path / "b", [ca.root_der])  # a validator that does not crash
    first, second = chains(ca, "f", 3), chains(ca, "s", 2)
    t1, t2 = now_ms(), now_ms() + 1000
    try:
        for node in (a, b):
            await node.block([node.entry(c) for c in first], t1)
        committed = a.state.ct_shards()
        batch, _ = a.begin([a.entry(c) for c in second], t2)
        await a.log.stage(batch)
        assert staged(tmp_path / "a") == [f"{5:012d}-{batch.writes[0].bundle.root.hex()}"]
        await b.block([b.entry(c) for c in second], t2)
    finally:
        await a.close()  # the process dies: the state transaction never ran
    a = CtNode.open(tmp_path / "a", [ca.root_der])
    try:
        assert a.log.active.size == 3 and a.state.ct_shards() == committed
        assert a.log.active.checkpoint.size == 3
        assert staged(tmp_path / "a") == []  # never committed: discarded
        a.log.active.tiles.verify_all()
        again = await a.block([a.entry(c) for c in second], t2)  # the chain executes it again
        assert [(x.shard, x.leaf_index) for x in again.logged] == [(0, 3), (0, 4)]
        assert a.state.ct_shards() == b.state.ct_shards()
        assert a.state.meta("state_hash") == b.state.meta("state_hash")
    finally:
        await a.close()
        await b.close()


async def test_crash_after_the_state_commit_reinstalls_the_staged_tiles(
        tmp_path: Path, ca: CaForTests, caplog: pytest.LogCaptureFixture) -> None:
    node = CtNode.open(tmp_path, [ca.root_der])
    first, second = chains(ca, "f", 3), chains(ca, "s", 2)
    try:
        await node.block([node.entry(c) for c in first])
        await node.installed()
        assert staged(tmp_path) == []
        batch, changes = node.begin([node.entry(c) for c in second])
        await node.log.stage(batch)
        node.commit(changes)  # committed; the process dies before the tiles are installed
        root = batch.writes[0].bundle.root
    finally:
        await node.close()
    assert len(staged(tmp_path)) == 1
    with caplog.at_level(logging.WARNING, logger="trustchain.ct"):
        node = CtNode.open(tmp_path, [ca.root_der])
    try:
        assert "re-installed 1 staged tile bundles" in caplog.text
        assert staged(tmp_path) == []
        shard = node.log.active
        assert shard.size == 5 and shard.tiles.root == root and shard.checkpoint.root == root
        shard.tiles.verify_all()
        svc = CtService(node.log, node.chains)
        entries = svc.get_entries(ops.GetEntriesArgs(start=0, end=4), CTX)["entries"]
        assert [ct.parse_merkle_tree_leaf(e["leaf_input"]).certificate for e in entries] == \
            [c[0] for c in first + second]
        leaf = merkle.leaf_hash(entries[4]["leaf_input"])
        proof = svc.get_proof_by_hash(ops.GetProofByHashArgs(hash=leaf, tree_size=5), CTX)
        merkle.verify_inclusion(4, 5, leaf, proof["audit_path"], root)
        assert (tmp_path / "ct" / "0" / "checkpoint").read_text() == shard.checkpoint.note
    finally:
        await node.close()


async def test_two_writers_cannot_fork_the_log(tmp_path: Path, ca: CaForTests) -> None:
    a = CtNode.open(tmp_path, [ca.root_der])
    b = CtNode.open(tmp_path, [ca.root_der])  # a second writer on the same storage
    try:
        mine, theirs = chains(ca, "a", 1), chains(ca, "b", 1)
        batch_a, changes_a = a.begin([a.entry(c) for c in mine])
        batch_b, changes_b = b.begin([b.entry(c) for c in theirs])
        await a.log.stage(batch_a)
        await b.log.stage(batch_b)
        assert len(staged(tmp_path)) == 2
        a.commit(changes_a)
        a.log.published(batch_a)
        with pytest.raises(StateError, match="does not follow"):
            b.commit(changes_b)  # the state holds block 1 already: b never publishes
        await a.block([a.entry(c) for c in chains(ca, "d", 1)])
        assert a.log.active.size == 2
    finally:
        await a.close()
        await b.close()
    node = CtNode.open(tmp_path, [ca.root_der])  # the tiles agree with the surviving state
    try:
        assert node.log.active.size == 2
        assert staged(tmp_path) == []  # the loser's bundle was never committed
        node.log.active.tiles.verify_all()
        (item, _), _ = node.log.active.tiles.entries(0, 2)
        assert ct.TileLeaf.parse(item).entry.certificate == mine[0][0]
    finally:
        await node.close()


async def test_storage_failure_refuses_the_block_and_a_restart_recovers(
        tmp_path: Path, ca: CaForTests) -> None:
    """A block whose tiles cannot be staged is not committed (the node stops); after a
    restart with working storage, executing the block again goes on from the tree the
    state holds."""
    node = CtNode.open(tmp_path, [ca.root_der])
    lost = chains(ca, "lost", 3)
    try:
        await node.block([node.entry(c) for c in chains(ca, "ok", 5)])
        await node.installed()
        svc = CtService(node.log, node.chains)
        before = svc.get_sth(ops.GetSthArgs(), CTX)
        staging = tmp_path / "ct" / "0" / "staging"
        staging.rmdir()
        staging.write_bytes(b"not a directory")  # the bundle cannot be written
        batch, _ = node.begin([node.entry(c) for c in lost])
        with pytest.raises((TileError, OSError)):  # write_bundle's mkdir: FileExistsError
            await node.log.stage(batch)
        assert node.state.height() == 1 and node.state.ct_shards()[0][1] == 5
        assert svc.get_sth(ops.GetSthArgs(), CTX)["tree_size"] == 5
    finally:
        await node.close()
    (tmp_path / "ct" / "0" / "staging").unlink()
    node = CtNode.open(tmp_path, [ca.root_der])
    try:
        svc = CtService(node.log, node.chains)
        assert node.log.active.size == 5
        batch = await node.block([node.entry(c) for c in lost])
        assert [x.leaf_index for x in batch.logged] == [5, 6, 7]
        after = svc.get_sth(ops.GetSthArgs(), CTX)
        proof = svc.get_sth_consistency(ops.GetSthConsistencyArgs(first=5, second=8), CTX)
        merkle.verify_consistency(5, 8, before["sha256_root_hash"], after["sha256_root_hash"],
                                  proof["consistency"])
        await node.installed()
        node.log.active.tiles.verify_all()
    finally:
        await node.close()


async def test_tampered_tiles_or_state_are_detected(tmp_path: Path, ca: CaForTests) -> None:
    node = CtNode.open(tmp_path, [ca.root_der])
    try:
        await node.block([node.entry(c) for c in chains(ca, "t", 260)])  # a full tile + 4
        await node.installed()
        (root_row,) = node.state.ct_shards()
        ((item, _),) = node.log.active.tiles.entries(3, 4)
        leaf = merkle.leaf_hash(ct.TileLeaf.parse(item).entry.merkle_tree_leaf())
    finally:
        await node.close()
    tiles = tmp_path / "ct" / "0" / "tile"
    # The last full data tile (the tiles written last are checked at start) altered at
    # rest: the log refuses to open, naming the file. (Older tiles are checked when
    # read: tests/unit/test_ct_tiles.py.)
    data = tiles / "data" / "000"
    pristine = data.read_bytes()
    flip_byte(data, 200)
    with pytest.raises(TileCorrupted, match=r"the data tile .*tile/data/000 was altered"):
        CtNode.open(tmp_path, [ca.root_der])
    data.write_bytes(pristine)
    # Its hash tile altered: checked against the level above, and blamed on itself.
    hashes = tiles / "0" / "000"
    pristine = hashes.read_bytes()
    flip_byte(hashes, 32 * 7 + 3)
    with pytest.raises(TileCorrupted, match=r"hash tile .*tile/0/000 does not match its hash"):
        CtNode.open(tmp_path, [ca.root_der])
    hashes.write_bytes(pristine)
    node = CtNode.open(tmp_path, [ca.root_der])
    try:
        svc = CtService(node.log, node.chains)
        assert len(svc.get_entries(ops.GetEntriesArgs(start=0, end=3), CTX)["entries"]) == 4
        proof = svc.get_proof_by_hash(ops.GetProofByHashArgs(hash=leaf, tree_size=260), CTX)
        assert proof["leaf_index"] == 3
    finally:
        await node.close()
    # The partial data tile altered: it is checked when the log opens, which refuses.
    partial = tiles / "data" / "001.p" / "4"
    pristine = partial.read_bytes()
    flip_byte(partial, 100)  # inside the first entry's certificate
    with pytest.raises(TileCorrupted, match="does not match its leaf hash"):
        CtNode.open(tmp_path, [ca.root_der])
    partial.write_bytes(pristine)
    # The state's root edited: the tiles do not give it.
    with sqlite3.connect(tmp_path / "state" / "state.sqlite3") as conn:
        conn.execute("UPDATE ct_shards SET root=? WHERE shard=0", (b"\x01" * 32,))
    with pytest.raises(TileCorrupted, match="committed checkpoint"):
        CtNode.open(tmp_path, [ca.root_der])
    with sqlite3.connect(tmp_path / "state" / "state.sqlite3") as conn:
        conn.execute("UPDATE ct_shards SET root=? WHERE shard=0", (root_row[2],))
    node = CtNode.open(tmp_path, [ca.root_der])
    try:
        node.log.active.tiles.verify_all()
    finally:
        await node.close()


async def test_an_altered_issuer_fingerprint_in_a_data_tile_is_reported_as_corruption(
        tmp_path: Path, ca: CaForTests) -> None:
    node = CtNode.open(tmp_path, [ca.root_der])
    try:
        await node.block([node.entry(c) for c in chains(ca, "i", 2)])
        await node.installed()
    finally:
        await node.close()
    partial = tmp_path / "ct" / "0" / "tile" / "data" / "000.p" / "2"
    flip_byte(partial, len(partial.read_bytes()) - 5)  # the last entry's issuer fingerprints
    node = CtNode.open(tmp_path, [ca.root_der])
    try:
        with pytest.raises(TileCorrupted):
            CtService(node.log, node.chains).get_entries(ops.GetEntriesArgs(start=0, end=1),
                                                         CTX)
    finally:
        await node.close()


async def test_a_duplicate_arriving_while_its_block_commits_gets_no_internal_error(
        tmp_path: Path, ca: CaForTests) -> None:
    node = CtNode.open(tmp_path, [ca.root_der])
    chain = [ca.leaf("window.trust"), ca.der]
    try:
        svc = CtService(node.log, node.chains)
        batch, changes = node.begin([node.entry(chain)])
        await node.log.stage(batch)
        node.commit(changes)  # the machine awaits this in a thread: requests run meanwhile
        try:
            r = await svc.add_chain(ops.AddChainArgs(chain=chain), CTX)
            assert r["leaf_index"] == 0
        except Unavailable:
            pass  # or: not yet, ask again
        node.log.published(batch)
    finally:
        await node.close()


# --- SCTs, tree heads, shards --------------------------------------------------------------


async def test_an_sct_is_signed_once_and_kept_across_a_restart(
        tmp_path: Path, ca: CaForTests) -> None:
    node = CtNode.open(tmp_path, [ca.root_der])
    chain = [ca.leaf("kept.trust"), ca.der]
    try:
        (logged,) = (await node.block([node.entry(chain)])).logged
        first = node.log.sct(logged)
        assert (first.shard, first.leaf_index) == (0, 0)
        check_sct(first.sct, chain[0], node.log.active.signer.public_key())
        await node.state.drain()
        assert node.state.sct_signature(logged.entry_hash, 0) == first.sct.signature
        assert node.log.sct(logged) == first
    finally:
        await node.close()
    node = CtNode.open(tmp_path, [ca.root_der])
    try:
        assert node.log.sct(logged) == first
    finally:
        await node.close()


async def test_concurrent_requests_for_one_sct_get_the_same_one(
        tmp_path: Path, ca: CaForTests) -> None:
    node = CtNode.open(tmp_path, [ca.root_der])
    try:
        (logged,) = (await node.block([node.entry([ca.leaf("race.trust"), ca.der])])).logged
        assert node.log.sct(logged) == node.log.sct(logged)
    finally:
        await node.close()


async def test_tree_head_refreshed_without_entries(tmp_path: Path, ca: CaForTests) -> None:
    """ct.merkle_update_interval: an idle log still signs a fresh tree head that often."""
    node = CtNode.open(tmp_path, [ca.root_der], sth_interval=0.05)
    try:
        svc = CtService(node.log, node.chains)
        node.log.start()
        await node.block([node.entry([ca.leaf("idle.trust"), ca.der])])
        first = svc.get_sth(ops.GetSthArgs(), CTX)
        await asyncio.sleep(0.3)
        later = svc.get_sth(ops.GetSthArgs(), CTX)
        key = node.log.active.signer.public_key()
        assert later["tree_size"] == first["tree_size"] == 1
        assert later["timestamp"] > first["timestamp"]
        assert later["sha256_root_hash"] == first["sha256_root_hash"]
        ct.verify_tree_head(key, later["timestamp"], 1, later["sha256_root_hash"],
                            later["tree_head_signature"])
        stored = node.state.ct_head(0)
        assert stored is not None and stored.timestamp >= later["timestamp"]
        assert stored.size == 1 and stored.root == later["sha256_root_hash"]
        assert node.state.height() == 1  # this validator's own: no block, no state change
    finally:
        await node.close()


async def test_shards_roll_over(tmp_path: Path, ca: CaForTests) -> None:
    node = CtNode.open(tmp_path, [ca.root_der], max_entries_per_shard=5)
    submitted = chains(ca, "s", 12)
    try:
        svc = CtService(node.log, node.chains)
        logged: list[Logged] = []
        for start in range(0, 12, 3):  # blocks of 3: one block spans shards 0 and 1
            batch = await node.block([node.entry(c) for c in submitted[start:start + 3]])
            logged += batch.logged
        shards = svc.shards(ops.ShardsArgs(), CTX)["shards"]
        assert [(s["shard"], s["tree_size"], s["state"]) for s in shards] == \
            [(0, 5, "frozen"), (1, 5, "frozen"), (2, 2, "active")]
        assert len({s["log_id"] for s in shards}) == 3
        assert [s["origin"] for s in shards] == [f"{ORIGIN}/{n}" for n in range(3)]
        assert [(x.shard, x.leaf_index) for x in logged] == \
            [(n // 5, n % 5) for n in range(12)]
        for x, chain in zip(logged, submitted, strict=True):
            key = serialization.load_der_public_key(shards[x.shard]["public_key"])
            sct = node.log.sct(x).sct
            assert ct.log_id_of(key) == sct.log_id == shards[x.shard]["log_id"]
            check_sct(sct, chain[0], key)
        assert node.state.ct_shards() == [(s.number, s.size, s.tiles.root)
                                          for s in node.log.shards]
        assert MultisetHash.of(node.state.rows()) == node.rows
        with pytest.raises(InvalidRequest, match="beyond"):  # a frozen shard stays frozen
            svc.get_entries(ops.GetEntriesArgs(shard=0, start=5, end=5), CTX)
        await node.installed()
    finally:
        await node.close()
    node = CtNode.open(tmp_path, [ca.root_der], max_entries_per_shard=5)
    try:
        assert [(s.number, s.size, s.frozen) for s in node.log.shards] == \
            [(0, 5, True), (1, 5, True), (2, 2, False)]
        for n in range(3):
            assert (tmp_path / "ct" / str(n) / "log-key.pem").is_file()
            node.log.shard(n).tiles.verify_all()
        assert node.log.sct(logged[7]).sct.log_id == node.log.shard(1).log_id
    finally:
        await node.close()


async def test_a_block_that_fills_a_shard_opens_the_next_one_empty(
        tmp_path: Path, ca: CaForTests) -> None:
    node = CtNode.open(tmp_path, [ca.root_der], max_entries_per_shard=4)
    try:
        batch = await node.block([node.entry(c) for c in chains(ca, "f", 4)])
        assert [s.number for s in batch.new_shards] == [1]
        assert [(s.number, s.size, s.frozen) for s in node.log.shards] == \
            [(0, 4, True), (1, 0, False)]
        assert node.state.ct_shards()[1] == (1, 0, merkle.EMPTY_ROOT)
        assert [r.shard for r in node.state.ct_logs()] == [0, 1]
        empty = node.log.shard(1).checkpoint
        ct.verify_checkpoint(empty.note, f"{ORIGIN}/1", node.log.shard(1).signer.public_key())
        assert MultisetHash.of(node.state.rows()) == node.rows
        (x,) = (await node.block([node.entry([ca.leaf("next.trust"), ca.der])])).logged
        assert (x.shard, x.leaf_index) == (1, 0)
        assert MultisetHash.of(node.state.rows()) == node.rows
    finally:
        await node.close()
    node = CtNode.open(tmp_path, [ca.root_der], max_entries_per_shard=4)
    try:
        assert [(s.number, s.size) for s in node.log.shards] == [(0, 4), (1, 1)]
    finally:
        await node.close()


async def test_a_new_shard_publishes_its_key_at_once(tmp_path: Path, ca: CaForTests) -> None:
    node = CtNode.open(tmp_path, [ca.root_der], max_entries_per_shard=2)
    try:
        await node.block([node.entry(c) for c in chains(ca, "k", 3)])
        await node.installed()
        assert (tmp_path / "ct" / "1" / "checkpoint").read_text() == \
            node.log.shard(1).checkpoint.note
        assert (tmp_path / "ct" / "1" / "log-key.pem").is_file()
    finally:
        await node.close()


# --- the subscription ----------------------------------------------------------------------


async def _collect(gen: AsyncIterator[Event], until: str, limit: int = 200) -> list[Event]:
    out = []
    async for event in gen:
        out.append(event)
        if event.event == until:
            return out
        assert len(out) < limit, f"no {until} event in {out}"
    raise AssertionError(f"the stream ended without a {until} event: {out}")


async def test_subscription_backfill_live_filter_and_resume(tmp_path: Path,
                                                            ca: CaForTests) -> None:
    node = CtNode.open(tmp_path, [ca.root_der], feed_capacity=50)
    try:
        svc = CtService(node.log, node.chains)

        async def add(n: int, start: int) -> None:  # one block of n entries
            await node.block([node.entry([
                ca.leaf(f"e{i}.hypermesh" if i % 2 else f"e{i}.trust"), ca.der])
                for i in range(start, start + n)])

        await add(30, 0)
        # Backfill from 0, then the sth of the head, then live entries.
        sub = svc.subscribe(ops.SubscribeArgs(start=0, heartbeat_ms=100), CTX)
        events = await _collect(sub, "sth")
        indices = [e["index"] for ev in events if ev.event == "entries"
                   for e in ev.data["entries"]]
        assert indices == list(range(30)) and events[-1].data["tree_size"] == 30
        first = events[0].data["entries"][0]
        assert first["fingerprint"] == hashlib.sha256(
            ct.parse_merkle_tree_leaf(first["leaf_input"]).certificate).digest()
        assert first["names"] == ["e0.trust"]
        await add(10, 30)
        events = await _collect(sub, "sth")
        live = [e for ev in events if ev.event == "entries" for e in ev.data["entries"]]
        assert [e["index"] for e in live] == list(range(30, 40))
        assert all(e["timestamp"] == live[0]["timestamp"] for e in live)  # the block's time
        heartbeat = await _collect(sub, "heartbeat")
        assert heartbeat[-1].data["next"] == 40
        # Too slow: the subscriber stops reading while 80 entries (more than the feed
        # holds) are committed; it is told where to resume, and resuming loses nothing.
        for k in range(8):
            await add(10, 40 + 10 * k)
        events = await _collect(sub, "resume")
        assert events[-1].event == "resume" and events[-1].data["reason"] == "too_slow"
        resume_at = events[-1].data["next"]
        got = [e["index"] for ev in events if ev.event == "entries"
               for e in ev.data["entries"]]
        assert got == list(range(40, resume_at))
        with pytest.raises(StopAsyncIteration):
            await sub.__anext__()
        # Resume from there with a domain filter and without leaves.
        sub2 = cast(AsyncGenerator[Event, None], svc.subscribe(ops.SubscribeArgs(
            start=resume_at, domains=["HyperMesh."], include_leaf=False), CTX))
        events = await _collect(sub2, "sth")
        entries = [e for ev in events if ev.event == "entries" for e in ev.data["entries"]]
        assert [e["index"] for e in entries] == [i for i in range(resume_at, 120) if i % 2]
        assert all("leaf_input" not in e for e in entries)
        assert events[-1].data["next"] == 120
        await sub2.aclose()
        with pytest.raises(InvalidRequest) as info:
            await svc.subscribe(ops.SubscribeArgs(start=121), CTX).__anext__()
        assert info.value.details["reason"] == "beyond_tree"
    finally:
        await node.close()


async def test_subscriber_of_a_full_shard_is_sent_to_the_next(tmp_path: Path,
                                                              ca: CaForTests) -> None:
    node = CtNode.open(tmp_path, [ca.root_der], max_entries_per_shard=3)
    try:
        svc = CtService(node.log, node.chains)
        sub = svc.subscribe(ops.SubscribeArgs(shard=0, start=0, heartbeat_ms=50), CTX)
        await _collect(sub, "sth")  # the empty shard 0
        await node.block([node.entry(c) for c in chains(ca, "r", 4)])
        events = await _collect(sub, "resume")
        assert [e["index"] for ev in events if ev.event == "entries"
                for e in ev.data["entries"]] == [0, 1, 2]
        assert events[-1].data == {"shard": 1, "next": 0, "reason": "shard_full"}
    finally:
        await node.close()


def test_helpers_reject_what_they_should(ca: CaForTests) -> None:
    """check_sct, the helper every SCT assertion here relies on, refuses a wrong SCT."""
    key = ec.generate_private_key(ec.SECP256R1())
    der = ca.leaf("helper.trust")
    entry = ct.TimestampedEntry(timestamp=5, entry_type=ct.X509_ENTRY, certificate=der,
                                extensions=b"")
    signature = ct.digitally_signed(key.sign(
        ct.sct_signed_data(5, ct.X509_ENTRY, entry.signed_entry(), b""),
        ec.ECDSA(hashes.SHA256())))
    sct = ct.SignedCertificateTimestamp(log_id=ct.log_id_of(key.public_key()), timestamp=5,
                                        extensions=b"", signature=signature)
    check_sct(sct, der, key.public_key())
    with pytest.raises(ct.SignatureError):
        check_sct(sct, ca.leaf("other.trust"), key.public_key())


async def test_a_failing_fingerprint_listener_is_counted_for_health(
        tmp_path: Path, ca: CaForTests) -> None:
    """The fp.watch notification of sequenced entries (an ``on_sequenced`` listener) may
    fail; the entries are logged anyway, and the log says so (the ``fingerprints``
    health check) until a notification succeeds again."""
    failing = True
    heard: list[int] = []

    def listener(shard: Any, batch: Any) -> None:
        if failing:
            raise RuntimeError("the watcher index is unavailable")
        heard.append(len(batch.entries))

    v = await LoneValidator.start(tmp_path, ca, on_sequenced=[listener])
    try:
        svc = v.service
        assert v.log.listener_problem() is None
        await svc.add_chain(ops.AddChainArgs(chain=[ca.leaf("a.trust"), ca.der]), CTX)
        problem = v.log.listener_problem()
        assert problem is not None and "1 failures so far" in problem
        assert "the watcher index is unavailable" in problem
        assert v.log.active.size == 1  # logged all the same
        failing = False
        await svc.add_chain(ops.AddChainArgs(chain=[ca.leaf("b.trust"), ca.der]), CTX)
        assert v.log.listener_problem() is None and heard == [1]
    finally:
        await v.stop()
