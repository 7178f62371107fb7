"""The CT log without a socket: real keys (software keystore), real SQLite and tiles in
a temporary directory, real certificate chains. SCTs, duplicates, precertificates,
bad chains, proofs, restarts, two writers, shard rollover, the subscription's backfill,
live follow, filters and slow-consumer resume."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from handlers import RequestContext
from handlers.ct import ChainValidator, CtLog, CtService
from protocol import Event, InvalidRequest, NotFound, Peer, Unavailable
from protocol import ct_merkle as merkle
from protocol import ct_structs as ct
from protocol.ops import ct as ops
from store import CtDatabase, SoftwareKeyStore, TileDirectory

from ..ca_fixtures import CaForTests, make_ca

CTX = RequestContext(peer=Peer(address="::1", port=1, alpn="stoq/1"), op="test", received_at=0)


def open_log(directory: Path, ca: CaForTests, **kwargs: Any) -> tuple[CtLog, CtService]:
    kwargs.setdefault("batch_interval", 0.005)
    log = CtLog(tiles=TileDirectory(directory / "ct"),
                db=CtDatabase(directory / "ct" / "ct.sqlite3"),
                keystore=SoftwareKeyStore(directory / "keys"), origin="test.trust/ct", **kwargs)
    log.open()
    return log, CtService(log, ChainValidator([ca.root_der], clock=_now))


def _now() -> float:
    return datetime.datetime.now(datetime.UTC).timestamp()


@pytest.fixture
def ca() -> CaForTests:
    return make_ca()


async def test_add_chain_scts_durable_and_restart(tmp_path: Path, ca: CaForTests) -> None:
    log, svc = open_log(tmp_path, ca)
    log.start()
    leaves = [ca.leaf(f"h{i}.trust") for i in range(40)]
    results = await asyncio.gather(*(svc.add_chain(ops.AddChainArgs(chain=[d, ca.der]), CTX)
                                     for d in leaves))
    key = log.active.signer.public_key()
    assert sorted(r["leaf_index"] for r in results) == list(range(40))
    for der, r in zip(leaves, results, strict=True):
        sct = ct.SignedCertificateTimestamp(log_id=r["id"], timestamp=r["timestamp"],
                                            extensions=r["extensions"],
                                            signature=r["signature"])
        assert sct.leaf_index == r["leaf_index"] and r["sct_version"] == 0
        entry = ct.TimestampedEntry(timestamp=sct.timestamp, entry_type=ct.X509_ENTRY,
                                    certificate=der, extensions=sct.extensions)
        ct.verify_sct(sct, key, ct.X509_ENTRY, entry.signed_entry())
    assert log.batches < 40  # batched
    sth = svc.get_sth(ops.GetSthArgs(), CTX)
    assert sth["tree_size"] == 40
    ct.verify_tree_head(key, sth["timestamp"], 40, sth["sha256_root_hash"],
                        sth["tree_head_signature"])
    ct.verify_checkpoint(sth["checkpoint"], "test.trust/ct/0", key)
    # The duplicate gets the very same SCT.
    again = await svc.add_chain(ops.AddChainArgs(chain=[leaves[7], ca.der]), CTX)
    assert again == results[7]
    # Identical submissions in the same batch: one entry, one SCT for all.
    twin = ca.leaf("twin.trust")
    same = await asyncio.gather(*(svc.add_chain(ops.AddChainArgs(chain=[twin, ca.der]), CTX)
                                  for _ in range(3)))
    assert same[0] == same[1] == same[2] and same[0]["leaf_index"] == 40
    assert log.active.size == 41
    sth = svc.get_sth(ops.GetSthArgs(), CTX)
    await log.stop()
    log.db.close()
    # A new process sees everything.
    log2, svc2 = open_log(tmp_path, ca)
    assert log2.active.size == 41 and log2.active.checkpoint.root == sth["sha256_root_hash"]
    entries = svc2.get_entries(ops.GetEntriesArgs(start=0, end=39), CTX)["entries"]
    by_index = {r["leaf_index"]: d for r, d in zip(results, leaves, strict=True)}
    for i, e in enumerate(entries):
        te = ct.parse_merkle_tree_leaf(e["leaf_input"])
        assert te.certificate == by_index[i] and te.leaf_index == i
        _, chain = ct.parse_extra_data(ct.X509_ENTRY, e["extra_data"])
        assert chain == [ca.der, ca.root_der]
        proof = svc2.get_proof_by_hash(ops.GetProofByHashArgs(
            hash=merkle.leaf_hash(e["leaf_input"]), tree_size=41), CTX)
        assert proof["leaf_index"] == i
        merkle.verify_inclusion(i, 41, merkle.leaf_hash(e["leaf_input"]), proof["audit_path"],
                                sth["sha256_root_hash"])
    log2.start()
    dup = await svc2.add_chain(ops.AddChainArgs(chain=[leaves[3], ca.der]), CTX)
    assert dup == results[3]
    assert log2.active.size == 41
    await log2.stop()
    log2.db.close()


async def test_precertificate_flow_embeds_a_verifiable_sct(tmp_path: Path, ca: CaForTests) -> None:
    log, svc = open_log(tmp_path, ca)
    log.start()
    builder = ca.leaf_builder("www.hypermesh", "api.trust")

    async def sign(extensions: Sequence[x509.Extension[Any]]) -> bytes:
        signed = builder
        for extension in extensions:
            signed = signed.add_extension(extension.value, critical=extension.critical)
        return signed.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    # the CA's flow: sign the precertificate, log it, sign the certificate with its SCT
    precert = await sign([x509.Extension(ct.POISON_OID, True, x509.PrecertPoison())])
    leaf_key = x509.load_der_x509_certificate(precert).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    logged = await svc.log_precertificate(precert, issuer=ca.intermediate,
                                          chain=[ca.der, ca.root_der],
                                          names=["www.hypermesh", "api.trust"],
                                          spki_sha256=hashlib.sha256(leaf_key).digest())
    sct_list = x509.UnrecognizedExtension(ct.SCT_LIST_OID, ct.sct_list_extension_value(
        [logged.sct.encode()]))
    final = x509.load_der_x509_certificate(
        await sign([x509.Extension(ct.SCT_LIST_OID, False, sct_list)]))
    (sct,) = ct.embedded_scts(final)
    key = log.active.signer.public_key()
    entry = ct.verify_embedded_sct(final, ca.intermediate, sct, key)
    leaf = merkle.leaf_hash(entry.merkle_tree_leaf())
    proof = svc.get_proof_by_hash(ops.GetProofByHashArgs(hash=leaf, tree_size=1), CTX)
    merkle.verify_inclusion(sct.leaf_index, 1, leaf, proof["audit_path"],
                            log.active.checkpoint.root)
    got = svc.get_entry_and_proof(ops.GetEntryAndProofArgs(leaf_index=0, tree_size=1), CTX)
    pre, chain = ct.parse_extra_data(ct.PRECERT_ENTRY, got["extra_data"])
    assert x509.load_der_x509_certificate(pre).extensions.get_extension_for_oid(ct.POISON_OID)
    assert chain == [ca.der, ca.root_der]
    # add-pre-chain of a precertificate built by hand.
    pre_der, pre_builder = ca.precert("x.trust")
    r = await svc.add_pre_chain(ops.AddChainArgs(chain=[pre_der, ca.der, ca.root_der]), CTX)
    final2 = pre_builder.add_extension(x509.UnrecognizedExtension(
        ct.SCT_LIST_OID, ct.sct_list_extension_value([ct.SignedCertificateTimestamp(
            log_id=r["id"], timestamp=r["timestamp"], extensions=r["extensions"],
            signature=r["signature"]).encode()])), critical=False).sign(ca.key, hashes.SHA256())
    ct.verify_embedded_sct(final2, ca.intermediate, ct.embedded_scts(final2)[0], key)
    await log.stop()
    log.db.close()


async def test_bad_chains_each_get_a_specific_error(tmp_path: Path, ca: CaForTests) -> None:
    log, svc = open_log(tmp_path, ca)
    log.start()
    other = make_ca("Other")
    now = _now()
    cases = {
        "empty_chain": [],
        "bad_certificate": [b"\x30\x03garbage"],
        "unknown_root": [other.leaf("a.trust"), other.der],
        "expired": [ca.leaf("old.trust", not_before=now - 7200, lifetime=3600), ca.der],
        "not_yet_valid": [ca.leaf("new.trust", not_before=now + 3600), ca.der],
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
    assert log.active.size == 0
    await svc.add_chain(ops.AddChainArgs(chain=[ca.leaf("ok.trust"), ca.der]), CTX)
    reads = {
        "range_reversed": lambda: svc.get_entries(ops.GetEntriesArgs(start=1, end=0), CTX),
        "range_too_large": lambda: svc.get_entries(ops.GetEntriesArgs(start=0, end=5000), CTX),
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
    await log.stop()
    log.db.close()


async def test_two_writers_cannot_fork_the_log(tmp_path: Path, ca: CaForTests) -> None:
    a, svc_a = open_log(tmp_path, ca)
    b, svc_b = open_log(tmp_path, ca)   # a second writer on the same storage
    a.start()
    b.start()
    await svc_a.add_chain(ops.AddChainArgs(chain=[ca.leaf("a.trust"), ca.der]), CTX)
    with pytest.raises(Unavailable, match="another writer"):
        await svc_b.add_chain(ops.AddChainArgs(chain=[ca.leaf("b.trust"), ca.der]), CTX)
    assert b.failed is not None
    with pytest.raises(Unavailable):
        await svc_b.add_chain(ops.AddChainArgs(chain=[ca.leaf("c.trust"), ca.der]), CTX)
    r = await svc_a.add_chain(ops.AddChainArgs(chain=[ca.leaf("d.trust"), ca.der]), CTX)
    assert r["leaf_index"] == 1
    await a.stop()
    await b.stop()
    a.db.close()
    b.db.close()
    log, _ = open_log(tmp_path, ca)  # the tiles agree with the surviving checkpoint
    assert log.active.size == 2
    log.active.tiles.verify_all()
    log.db.close()


async def test_shards_roll_over(tmp_path: Path, ca: CaForTests) -> None:
    log, svc = open_log(tmp_path, ca, max_entries_per_shard=5, max_batch=3)
    log.start()
    results = await asyncio.gather(*(svc.add_chain(
        ops.AddChainArgs(chain=[ca.leaf(f"s{i}.trust"), ca.der]), CTX) for i in range(12)))
    shards = svc.shards(ops.ShardsArgs(), CTX)["shards"]
    assert [(s["shard"], s["tree_size"], s["state"]) for s in shards] == \
        [(0, 5, "frozen"), (1, 5, "frozen"), (2, 2, "active")]
    assert len({s["log_id"] for s in shards}) == 3
    by_shard: dict[int, list[int]] = {}
    for r in results:
        by_shard.setdefault(r["shard"], []).append(r["leaf_index"])
        key = serialization.load_der_public_key(shards[r["shard"]]["public_key"])
        assert ct.log_id_of(key) == r["id"]
    assert {k: sorted(v) for k, v in by_shard.items()} == {0: list(range(5)),
                                                           1: list(range(5)), 2: [0, 1]}
    assert (tmp_path / "ct" / "1" / "log-key.pem").is_file()
    await log.stop()
    log.db.close()


async def _collect(gen: AsyncIterator[Event], until: str, limit: int = 200) -> list[Event]:
    out = []
    async for event in gen:
        out.append(event)
        if event.event == until:
            return out
        assert len(out) < limit, f"no {until} event in {out}"
    raise AssertionError(f"the stream ended without a {until} event: {out}")


async def test_subscription_backfill_live_filter_and_resume(tmp_path: Path, ca: CaForTests) -> None:
    log, svc = open_log(tmp_path, ca, feed_capacity=50)
    log.start()

    async def add(n: int, start: int) -> None:
        await asyncio.gather(*(svc.add_chain(ops.AddChainArgs(chain=[
            ca.leaf(f"e{i}.hypermesh" if i % 2 else f"e{i}.trust"), ca.der]), CTX)
            for i in range(start, start + n)))

    await add(30, 0)
    # Backfill from 0, then the sth of the head, then live entries.
    sub = svc.subscribe(ops.SubscribeArgs(start=0, heartbeat_ms=100), CTX)
    events = await _collect(sub, "sth")
    indices = [e["index"] for ev in events if ev.event == "entries" for e in ev.data["entries"]]
    assert indices == list(range(30)) and events[-1].data["tree_size"] == 30
    first = events[0].data["entries"][0]
    assert first["fingerprint"] == hashlib.sha256(
        ct.parse_merkle_tree_leaf(first["leaf_input"]).certificate).digest()
    assert first["names"] == ["e0.trust"]
    await add(10, 30)
    events = await _collect(sub, "sth")
    assert [e["index"] for ev in events if ev.event == "entries"
            for e in ev.data["entries"]] == list(range(30, 40))
    heartbeat = await _collect(sub, "heartbeat")
    assert heartbeat[-1].data["next"] == 40
    # Too slow: the subscriber stops reading while 80 entries (more than the feed
    # holds) are sequenced; it is told where to resume, and resuming loses nothing.
    for k in range(8):
        await add(10, 40 + 10 * k)
    events = await _collect(sub, "resume")
    assert events[-1].event == "resume" and events[-1].data["reason"] == "too_slow"
    resume_at = events[-1].data["next"]
    got = [e["index"] for ev in events if ev.event == "entries" for e in ev.data["entries"]]
    assert got == list(range(40, resume_at))
    with pytest.raises(StopAsyncIteration):
        await sub.__anext__()
    # Resume from there with a domain filter and without leaves.
    sub2 = svc.subscribe(ops.SubscribeArgs(start=resume_at, domains=["HyperMesh."],
                                           include_leaf=False), CTX)
    events = await _collect(sub2, "sth")
    entries = [e for ev in events if ev.event == "entries" for e in ev.data["entries"]]
    assert [e["index"] for e in entries] == [i for i in range(resume_at, 120) if i % 2]
    assert all("leaf_input" not in e for e in entries)
    assert events[-1].data["next"] == 120
    await sub2.aclose()
    with pytest.raises(InvalidRequest) as info:
        await svc.subscribe(ops.SubscribeArgs(start=121), CTX).__anext__()
    assert info.value.details["reason"] == "beyond_tree"
    await log.stop()
    log.db.close()


async def test_tree_head_refreshed_without_entries(tmp_path: Path, ca: CaForTests) -> None:
    """ct.merkle_update_interval: an idle log still signs a fresh tree head that often."""
    log, svc = open_log(tmp_path, ca, sth_interval=0.05)
    log.start()
    await svc.add_chain(ops.AddChainArgs(chain=[ca.leaf("idle.trust"), ca.der]), CTX)
    first = svc.get_sth(ops.GetSthArgs(), CTX)
    await asyncio.sleep(0.3)
    later = svc.get_sth(ops.GetSthArgs(), CTX)
    key = log.active.signer.public_key()
    assert later["tree_size"] == first["tree_size"] == 1
    assert later["timestamp"] > first["timestamp"]
    assert later["sha256_root_hash"] == first["sha256_root_hash"]
    ct.verify_tree_head(key, later["timestamp"], 1, later["sha256_root_hash"],
                        later["tree_head_signature"])
    assert log.db.checkpoint(0) is not None and log.db.checkpoint(0).timestamp >= \
        later["timestamp"]
    await log.stop()
    log.db.close()


async def test_storage_failure_fails_the_batch_and_the_log_recovers(tmp_path: Path,
                                                                     ca: CaForTests) -> None:
    """A batch that cannot be staged is refused (no SCT); the log reloads the committed
    tree and goes on once storage works again."""
    from protocol import Internal

    log, svc = open_log(tmp_path, ca)
    log.start()
    await asyncio.gather(*(svc.add_chain(ops.AddChainArgs(chain=[ca.leaf(f"ok{i}.trust"),
                                                                 ca.der]), CTX)
                           for i in range(5)))
    before = svc.get_sth(ops.GetSthArgs(), CTX)
    staging = tmp_path / "ct" / "0" / "staging"
    for _ in range(200):  # the tiles are installed in place, the bundles removed
        if not any(staging.iterdir()):
            break
        await asyncio.sleep(0.01)
    staging.rmdir()
    staging.write_bytes(b"not a directory")  # the bundle cannot be written
    results = await asyncio.gather(*(svc.add_chain(ops.AddChainArgs(
        chain=[ca.leaf(f"lost{i}.trust"), ca.der]), CTX) for i in range(3)),
        return_exceptions=True)
    assert all(isinstance(r, Internal) for r in results), results
    assert log.failed is None
    assert svc.get_sth(ops.GetSthArgs(), CTX)["tree_size"] == 5
    staging.unlink()
    r = await svc.add_chain(ops.AddChainArgs(chain=[ca.leaf("after.trust"), ca.der]), CTX)
    assert r["leaf_index"] == 5
    after = svc.get_sth(ops.GetSthArgs(), CTX)
    proof = svc.get_sth_consistency(ops.GetSthConsistencyArgs(first=5, second=6), CTX)
    merkle.verify_consistency(5, 6, before["sha256_root_hash"], after["sha256_root_hash"],
                              proof["consistency"])
    await log.stop()
    log.active.tiles.verify_all()
    log.db.close()
