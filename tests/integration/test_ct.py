"""The CT log over real QUIC on [::1]: the CA logs every certificate through the
precertificate flow (openssl, pkilint, offline `trustchain verify`, `trustchain ct
proof`), RFC 6962 ops with extra roots, bad input with specific errors, proofs that
verify, subscriptions that resume, fingerprints, and every frame against the CDDL."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import stoq
from protocol import InvalidRequest, NotFound
from protocol import ct_merkle as merkle
from protocol import ct_structs as ct

from ..ca_fixtures import CaForTests, make_ca
from ..helpers import CddlChecker, Requester, RunningNode, running_node
from .test_ca import make_csr, openssl_verify, pkilint, write_pems

ENGINE = "qh3"


def _extra(tmp_path: Path, ca: CaForTests, **ct_keys: Any) -> str:
    roots = tmp_path / "extra-root.pem"
    roots.write_bytes(ca.root.public_bytes(serialization.Encoding.PEM))
    lines = [f'extra_roots = ["{roots}"]']
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in ct_keys.items()]
    return "[ct]\n" + "\n".join(lines) + "\n"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trustchain", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60)


async def _cli_async(*args: str, cwd: Path) -> tuple[int, str]:
    """The CLI against the node in this process: the event loop must keep running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trustchain", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, cwd=cwd)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _shard_key(client: stoq.AsyncClient, shard: int = 0) -> Any:
    return (await stoq.ShardKeys.fetch(client)).keys[shard]


async def test_issued_certificates_carry_a_verifiable_sct(tmp_path: Path, cddl: CddlChecker,
                                                          prover: stoq.Prover) -> None:
    data = tmp_path / "node"
    async with running_node(data, ENGINE, checker=cddl) as node, \
            await node.client() as client:
        requester = Requester(client, prover)
        result = await requester.issue(make_csr(ec.generate_private_key(ec.SECP256R1()),
                                                ["www.hypermesh", "api.trust"]))
        cert = x509.load_der_x509_certificate(result["certificate"])
        issuer = x509.load_der_x509_certificate(result["chain"][0])
        (sct,) = ct.embedded_scts(cert)
        key = await _shard_key(client)
        entry = ct.verify_embedded_sct(cert, issuer, sct, key)
        # The poison is gone from the final certificate; the precertificate is in the log.
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_oid(ct.POISON_OID)
        got = await client.request("ct.get-entry-and-proof", {
            "leaf_index": sct.leaf_index, "tree_size": node.node.services.ct.log.active.size})
        assert got["leaf_input"] == entry.merkle_tree_leaf()
        pre, chain = ct.parse_extra_data(ct.PRECERT_ENTRY, got["extra_data"])
        precert = x509.load_der_x509_certificate(pre)
        assert precert.extensions.get_extension_for_oid(ct.POISON_OID).critical
        assert precert.serial_number == cert.serial_number
        assert chain == [result["chain"][0], result["chain"][1]]
        # openssl and pkilint accept the certificate with its SCT list.
        cert_path, chain_path = write_pems(tmp_path, result)
        verified = openssl_verify(data / "root.pem", chain_path, cert_path)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        linted = pkilint(cert_path)
        assert linted.returncode == 0, linted.stdout + linted.stderr
        # The precertificate, with its critical poison extension, passes too.
        pre_path = tmp_path / "precert.pem"
        pre_path.write_bytes(precert.public_bytes(serialization.Encoding.PEM))
        linted = pkilint(pre_path)
        assert linted.returncode == 0, linted.stdout + linted.stderr
        # Offline: `trustchain verify` checks the SCT against DATA/ct/0/log-key.pem.
        ok = _cli("verify", str(cert_path), "--data-dir", str(data), "--offline",
                  cwd=tmp_path)
        assert ok.returncode == 0 and "OK SCT of log" in ok.stdout, ok.stdout + ok.stderr
        # ... and refuses a certificate whose SCT was made for another certificate.
        other = await requester.issue(make_csr(ec.generate_private_key(ec.SECP256R1()),
                                               ["other.trust"]))
        forged = _swap_sct(tmp_path, result, other)
        bad = _cli("verify", str(forged), "--chain", str(chain_path), "--data-dir", str(data),
                   "--offline", cwd=tmp_path)
        assert bad.returncode == 1 and "FAIL SCT" in bad.stdout, bad.stdout
        # Online: `trustchain ct proof` proves inclusion against a verified tree head.
        target = ["--server", f"[::1]:{node.port}", "--pin", node.pin]
        code, out = await _cli_async("ct", "proof", str(cert_path), *target, cwd=tmp_path)
        assert code == 0 and "OK included in the log" in out, out
        # The node's own TLS certificate goes through the same admission and precertificate
        # flow as a client's: it is the log's first entry, and carries its SCT.
        tls, tls_issuer = x509.load_pem_x509_certificates(
            (data / "tls" / "server.pem").read_bytes())[:2]
        for _ in range(100):
            found = await _fp_get(client, tls.public_bytes(serialization.Encoding.DER))
            if found:
                break
            await asyncio.sleep(0.05)
        assert found and found[0]["kind"] == "issued" and found[0]["leaf_index"] == 0
        assert tls.extensions.get_extension_for_oid(
            x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")) is not None
        proven = await stoq.prove_certificate(client, tls, tls_issuer)
        assert proven.leaf_index == found[0]["leaf_index"]


async def _fp_get(client: stoq.AsyncClient, der: bytes) -> list[dict[str, Any]]:
    try:
        result = await client.request("fp.get",
                                      {"fingerprint": hashlib.sha256(der).hexdigest()})
    except NotFound:
        return []
    return list(result["certificates"])


def _swap_sct(tmp_path: Path, result: dict[str, Any], other: dict[str, Any]) -> Path:
    """The first certificate with the second one's SCT list, signed by the issuing
    intermediate (its key from the development keystore): a valid chain whose SCT was
    made for another certificate, like Google's test-invalid-embedded-cert."""
    cert = x509.load_der_x509_certificate(result["certificate"])
    theirs = x509.load_der_x509_certificate(other["certificate"]).extensions \
        .get_extension_for_oid(ct.SCT_LIST_OID)
    builder = (x509.CertificateBuilder().subject_name(cert.subject)
               .issuer_name(cert.issuer).public_key(cert.public_key())
               .serial_number(cert.serial_number)
               .not_valid_before(cert.not_valid_before_utc)
               .not_valid_after(cert.not_valid_after_utc))
    for ext in cert.extensions:
        value = theirs.value if ext.oid == ct.SCT_LIST_OID else ext.value
        builder = builder.add_extension(value, critical=ext.critical)
    keys = sorted((tmp_path / "node" / "keys").glob("intermediate-*.pem"))
    key = serialization.load_pem_private_key(keys[-1].read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    forged = builder.sign(key, hashes.SHA256())
    path = tmp_path / "forged.pem"
    path.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    return path


async def test_rfc6962_ops_over_quic(tmp_path: Path, cddl: CddlChecker) -> None:
    extra = make_ca("Extra")
    async with running_node(tmp_path / "node", ENGINE, _extra(tmp_path, extra),
                            checker=cddl) as node, await node.client() as client:
        roots = (await client.request("ct.get-roots"))["certificates"]
        assert extra.root_der in roots and (tmp_path / "node" / "root.pem").is_file()
        key = await _shard_key(client)
        leaves = [extra.leaf(f"n{i}.trust") for i in range(30)]
        scts = await asyncio.gather(*(client.request("ct.add-chain", {"chain": [d, extra.der]})
                                      for d in leaves))
        sth = await client.request("ct.get-sth")
        stoq.verify_sth(sth, key)
        assert ct.verify_checkpoint(sth["checkpoint"], "trustchain-ct-development/0",
                                    key).tree_size == sth["tree_size"]
        size = sth["tree_size"]
        for der, r in zip(leaves, scts, strict=True):
            sct = ct.SignedCertificateTimestamp(log_id=r["id"], timestamp=r["timestamp"],
                                                extensions=r["extensions"],
                                                signature=r["signature"])
            entry = ct.TimestampedEntry(timestamp=r["timestamp"], entry_type=ct.X509_ENTRY,
                                        certificate=der, extensions=r["extensions"])
            ct.verify_sct(sct, key, ct.X509_ENTRY, entry.signed_entry())
            leaf = merkle.leaf_hash(entry.merkle_tree_leaf())
            proof = await client.request("ct.get-proof-by-hash",
                                         {"hash": leaf, "tree_size": size})
            assert proof["leaf_index"] == r["leaf_index"]
            merkle.verify_inclusion(r["leaf_index"], size, leaf, proof["audit_path"],
                                    sth["sha256_root_hash"])
        # The same chain again: the same SCT.
        assert await client.request("ct.add-chain", {"chain": [leaves[5], extra.der]}) == scts[5]
        entries = (await client.request("ct.get-entries", {"start": 0, "end": size - 1}))
        assert len(entries["entries"]) == size
        old = await client.request("ct.get-sth")
        await client.request("ct.add-chain", {"chain": [extra.leaf("late.trust"), extra.der,
                                                        extra.root_der]})
        new = await client.request("ct.get-sth")
        await stoq.verify_consistency(client, 0, old, new)
        # ct.subscribe: the first sth ends the backfill, after every entry below its size
        # (spec §16.13); from the current size (the default start) it comes first.
        delivered: list[int] = []
        backfill = client.subscribe("ct.subscribe", {"start": 0, "include_leaf": False})
        async for event in backfill:
            if event.event == "sth":
                assert delivered == list(range(event.data["tree_size"]))
                assert event.data["next"] == event.data["tree_size"] == new["tree_size"]
                break
            assert event.event == "entries"
            delivered += [e["index"] for e in event.data["entries"]]
        await backfill.aclose()
        live = client.subscribe("ct.subscribe", {})
        first = await live.__anext__()
        assert first.event == "sth" and first.data["tree_size"] == new["tree_size"]
        await live.aclose()
        bad = {
            "bad_certificate": ("ct.add-chain", {"chain": [b"\x30\x82garbage"]}),
            "unknown_root": ("ct.add-chain", {"chain": [make_ca("X").leaf("x.trust")]}),
            "expired": ("ct.add-chain", {"chain": [extra.leaf(
                "old.trust", not_before=time.time() - 7200, lifetime=3600), extra.der]}),
            "not_precertificate": ("ct.add-pre-chain", {"chain": [leaves[0], extra.der]}),
            "range_reversed": ("ct.get-entries", {"start": 5, "end": 4}),
            "range_too_large": ("ct.get-entries", {"start": 0, "end": 10_000}),
            "beyond_tree": ("ct.get-entries", {"start": 10_000, "end": 10_001}),
            "empty_tree": ("ct.get-sth-consistency", {"first": 0, "second": 1}),
        }
        for reason, (op, args) in bad.items():
            with pytest.raises(InvalidRequest) as info:
                await client.request(op, args)
            assert info.value.details.get("reason") == reason, (reason, info.value.message)
        for op, args in [("ct.get-sth-consistency", {"first": 1, "second": 10**6}),
                         ("ct.get-proof-by-hash", {"hash": b"\x01" * 32, "tree_size": 10**6}),
                         ("ct.get-entry-and-proof", {"leaf_index": 0, "tree_size": 10**6})]:
            with pytest.raises(InvalidRequest) as info:
                await client.request(op, args)
            assert info.value.details["reason"] == "beyond_tree"
        with pytest.raises(NotFound):
            await client.request("ct.get-proof-by-hash", {"hash": b"\x01" * 32, "tree_size": 1})
        with pytest.raises(InvalidRequest):
            await client.request("ct.add-chain", {"chain": "not a list"})
        # The server and the log are intact after all that.
        after = await client.request("ct.get-sth")
        assert after["tree_size"] == new["tree_size"]
        node.node.services.ct.log.active.tiles.verify_all()
    assert cddl.checked > 70


async def test_follow_log_across_shards_and_restarts(tmp_path: Path, cddl: CddlChecker) -> None:
    """The client iterator follows a full shard into the next one, and reconnects to a
    restarted node, without losing or repeating an entry; it verifies every tree head."""
    extra = make_ca("Feed")
    config = _extra(tmp_path, extra, max_entries_per_shard=50)
    where: dict[str, RunningNode] = {}

    async def connect() -> stoq.AsyncClient:
        return await where["node"].client()

    async def add(client: stoq.AsyncClient, names: list[str]) -> None:
        await asyncio.gather(*(client.request("ct.add-chain", {"chain": [
            extra.leaf(name), extra.der]}) for name in names))

    seen: list[tuple[int, int, str]] = []
    got_80 = asyncio.Event()
    follower = stoq.follow_log(connect, shard=0, start=0, heartbeat_ms=200,
                               retry_delay=0.2)

    def ours() -> list[int]:  # the node's own TLS certificates are logged too
        return [int(n[1:].split(".")[0]) for _, _, n in seen if n.startswith("a")]

    async def follow() -> None:
        async for entry in follower:
            seen.append((entry.shard, entry.index, entry.names[0]))
            if len(ours()) == 80:
                got_80.set()
            if len(ours()) == 100:
                return

    async with running_node(tmp_path / "node", ENGINE, config, checker=cddl) as node, \
            await node.client() as client:
        where["node"] = node
        await add(client, [f"a{j}.trust" for j in range(40)])
        task = asyncio.create_task(follow())
        for i in range(40, 80, 10):
            await add(client, [f"a{j}.trust" for j in range(i, i + 10)])
        await asyncio.wait_for(got_80.wait(), 20)
    # The node stops (the stream ends); it comes back on another port.
    async with running_node(tmp_path / "node", ENGINE, config, checker=cddl) as node, \
            await node.client() as client:
        where["node"] = node
        await add(client, [f"a{j}.trust" for j in range(80, 100)])
        await asyncio.wait_for(task, 30)
    shards = sorted({s for s, _, _ in seen})
    assert shards == list(range(len(shards))) and len(shards) >= 2
    expected = [(s, i) for s in shards[:-1] for i in range(50)]
    expected += [(shards[-1], i) for i in range(len(seen) - len(expected))]
    assert [(s, i) for s, i, _ in seen] == expected  # every shard from 0, nothing skipped
    assert sorted(ours()) == list(range(100))
    assert follower.resumes >= 1 and follower.reconnects >= 1
    assert follower.verified >= 2 and follower.roots_recomputed >= 2


async def test_slow_subscriber_is_told_to_resume(tmp_path: Path, cddl: CddlChecker) -> None:
    """A subscriber whose connection stalls falls behind the live feed: the server's send
    buffer fills, its producer waits, the feed moves on; the server sends `resume` and
    ends the stream, and the iterator resumes from storage without losing anything."""
    extra = make_ca("Slow")
    # Large entries (150 names each), so that 1 MiB of unsent events is a few hundred.
    leaves = [extra.leaf(*[f"n{k}.s{j}.trust" for k in range(150)]) for j in range(500)]
    async with running_node(tmp_path / "node", ENGINE, _extra(tmp_path, extra,
                            subscription_buffer=64), checker=cddl) as node, \
            await node.client() as client:
        started = asyncio.Event()
        clients: list[stoq.AsyncClient] = []

        async def connect() -> stoq.AsyncClient:
            c = await node.client()
            clients.append(c)
            return c

        follower = stoq.follow_log(connect, start=0, heartbeat_ms=200)
        seen: list[int] = []

        async def follow() -> None:
            async for entry in follower:
                seen.append(entry.index)
                started.set()
                if len(seen) == len(leaves) + 1:
                    return

        await client.request("ct.add-chain", {"chain": [extra.leaf("first.trust"), extra.der]})
        task = asyncio.create_task(follow())
        await asyncio.wait_for(started.wait(), 10)
        # The follower's connection holds every datagram back (none is lost): no ACK
        # reaches the server, whose unsent data grows until its producer waits.
        protocol = clients[0]._protocol
        held: list[tuple[bytes, Any]] = []
        deliver = protocol.datagram_received
        protocol.datagram_received = lambda data, addr: held.append((data, addr))
        for i in range(0, len(leaves), 50):
            await asyncio.gather(*(client.request("ct.add-chain", {"chain": [d, extra.der]})
                                   for d in leaves[i:i + 50]))
        del protocol.datagram_received
        for data, addr in held:
            deliver(data, addr)
        await asyncio.wait_for(task, 60)
        assert seen == list(range(len(leaves) + 1))
        assert follower.resumes >= 1, "the server never told the subscriber to resume"


async def test_slow_reader_resubscribes_without_losing_entries(tmp_path: Path,
                                                               cddl: CddlChecker) -> None:
    """A reader slower than the feed: the client drops its subscription after a few
    buffered events (bounded memory) and subscribes again from the reader's position."""
    extra = make_ca("Reader")
    async with running_node(tmp_path / "node", ENGINE, _extra(tmp_path, extra),
                            checker=cddl) as node, await node.client() as client:
        for i in range(0, 120, 40):
            await asyncio.gather(*(client.request("ct.add-chain", {"chain": [
                extra.leaf(f"r{j}.trust"), extra.der]}) for j in range(i, i + 40)))
        size = (await client.request("ct.get-sth"))["tree_size"]
        follower = stoq.follow_log(node.client, start=0, heartbeat_ms=200, max_buffered=2)
        seen: list[int] = []
        async for entry in follower:
            seen.append(entry.index)
            if len(seen) == 1:
                # the reader stalls: the server's heartbeats (every 200 ms) alone fill the
                # client's 2-event buffer, whatever the batching of the entries
                await asyncio.sleep(1.0)
            if len(seen) == size:
                break
        await follower.close()
        assert seen == list(range(size))
        assert follower.overflows >= 1 and follower.reconnects == 0


async def test_ct_watch_cli_prints_entries_live(tmp_path: Path) -> None:
    extra = make_ca("Watch")
    async with running_node(tmp_path / "node", ENGINE, _extra(tmp_path, extra)) as node, \
            await node.client() as client:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "trustchain", "ct", "watch", "--from", "0", "--count", "6",
            "--domain", "watched.trust", "--server", f"[::1]:{node.port}", "--pin", node.pin,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=tmp_path)
        for i in range(12):
            name = "x.watched.trust" if i % 2 else "other.trust"
            await client.request("ct.add-chain", {"chain": [extra.leaf(name), extra.der]})
            await asyncio.sleep(0.05)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        lines = out.decode().splitlines()
        assert len(lines) == 6 and all(line.endswith(" x.watched.trust") for line in lines)
        assert all(" x509 " in line for line in lines)


async def test_fingerprints_get_verify_watch(tmp_path: Path, cddl: CddlChecker,
                                             prover: stoq.Prover) -> None:
    async with running_node(tmp_path / "node", ENGINE, checker=cddl) as node, \
            await node.client() as client, await node.client() as watcher_client:
        requester = Requester(client, prover)
        key = ec.generate_private_key(ec.SECP256R1())
        watch = watcher_client.subscribe("fp.watch", {"names": ["fp.trust"],
                                                      "heartbeat_ms": 200})
        first = await watch.__anext__()
        assert first.event == "watching"
        result = await requester.issue(make_csr(key, ["fp.trust", "zz.trust"], ["2001:db8::5"]))
        assert result["names"] == ["fp.trust", "zz.trust", "2001:db8::5"]
        logged = await _next_change(watch)  # the precertificate, as the log sequences it
        assert logged["change"] == "logged" and logged["kind"] == "precert"
        change = await _next_change(watch)
        assert change["change"] == "issued" and change["fingerprint"] == result["fingerprint"]
        assert (change["shard"], change["leaf_index"]) == (logged["shard"],
                                                          logged["leaf_index"])
        assert change["matched"] == ["fp.trust"]
        assert change["names"] == result["names"]  # fp.watch: the certificate's order
        got = (await client.request("fp.get", {"fingerprint": result["fingerprint"]}))
        (record,) = got["certificates"]
        assert record["kind"] == "issued" and record["serial"] == result["serial"]
        # fp.get: names sorted as text, so this address before the DNS names (spec §16.15)
        assert record["names"] == ["2001:db8::5", "fp.trust", "zz.trust"]
        spki = hashlib.sha256(key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        assert record["spki_sha256"] == spki.hexdigest()
        by_name = await client.request("fp.get", {"name": "fp.trust"})
        assert result["fingerprint"] in [r["fingerprint"] for r in by_name["certificates"]]
        verified = await client.request("fp.verify", {"fingerprint": result["fingerprint"]})
        assert verified["valid"] and verified["der_matches"] and verified["sct_valid"]
        assert verified["included"] and not verified["problems"]
        merkle.verify_inclusion(verified["leaf_index"], verified["tree_size"],
                                verified["leaf_hash"], verified["audit_path"],
                                verified["sha256_root_hash"])
        # Revocation is a change too.
        from handlers.ca import revocation_statement
        from tests.integration.test_ca import sign
        now = int(time.time())
        await requester.revoke({"serial": result["serial"], "reason": "key_compromise",
                                "time": now, "signature": sign(key, revocation_statement(
                                    result["serial"], "key_compromise", now))})
        change = await _next_change(watch)
        assert change["change"] == "revoked" and change["reason"] == "key_compromise"
        with pytest.raises(NotFound):
            await client.request("fp.get", {"fingerprint": "00" * 32})
        with pytest.raises(InvalidRequest):
            await client.request("fp.get", {"fingerprint": "zz"})
        with pytest.raises(InvalidRequest):
            await client.request("fp.get", {"fingerprint": "00" * 32, "name": "a.trust"})
        await watch.aclose()
    # Tampering with the stored certificate is detected by fp.verify (and, the state no
    # longer matching its hash, the node stops voting and says so).
    db = tmp_path / "node" / "state" / "state.sqlite3"
    import sqlite3
    with sqlite3.connect(db) as conn:
        der = conn.execute("SELECT der FROM certificates WHERE serial=?",
                           (result["serial"],)).fetchone()[0]
        conn.execute("UPDATE certificates SET der=? WHERE serial=?",
                     (der[:-1] + bytes([der[-1] ^ 1]), result["serial"]))
    async with running_node(tmp_path / "node", ENGINE, checker=cddl) as node, \
            await node.client() as client:
        verified = await client.request("fp.verify", {"fingerprint": result["fingerprint"]})
        assert not verified["valid"] and not verified["der_matches"]
        health = await client.request("node.health")
        assert health["status"] == "degraded" and health["checks"]["consensus"] is False
        status = await client.request("consensus.status")
        assert "does not match its hash" in status["state"]["corrupt"]


async def _next_change(watch: Any) -> dict[str, Any]:
    while True:
        event = await asyncio.wait_for(watch.__anext__(), 10)
        if event.event == "change":
            return dict(event.data)
