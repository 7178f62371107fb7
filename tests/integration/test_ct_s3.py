"""The CT log with its tiles in S3 (a real Ceph RADOS Gateway on [::1], fixture
``s3_server``): a node process issues and logs, is SIGKILLed and restarted, and an
independent reader verifies the log from the bucket's objects alone; with the gateway
stopped under load, sequencing pauses, new submissions get ``unavailable`` with
``retry_after``, health says why, and everything resumes by itself."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import stoq
from protocol import ErrorCode, TrustChainError
from protocol import ct_merkle as merkle
from protocol import ct_structs as ct

from ..ca_fixtures import make_ca
from ..ct_load import add_chains_until_killed
from ..helpers import Requester, start_server_process
from ..s3_server import CephS3
from .test_ca import make_csr

ORIGIN = "trustchain-ct-development/0"


def s3_config(server: CephS3, bucket: str, root: Path) -> str:
    return (f'[ct]\nextra_roots = ["{root}"]\n'
            f'[ct.storage]\nbackend = "s3"\nbucket = "{bucket}"\nregion = "{server.region}"\n'
            f'endpoint = "{server.endpoint}"\nprefix = "validator-a"\n')


@pytest.fixture
def aws_env(s3_server: CephS3, monkeypatch: pytest.MonkeyPatch) -> CephS3:
    """The node processes get the server's credentials from the standard variables."""
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    return s3_server


def bucket_object(server: CephS3, bucket: str, key: str) -> bytes | None:
    """One object read with a plain botocore client (not TrustChain's store code)."""
    client = server.client()
    try:
        return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    except client.exceptions.NoSuchKey:
        return None


def read_log_from_bucket(server: CephS3, bucket: str, prefix: str
                         ) -> tuple[ct.Checkpoint, list[bytes]]:
    """What a static-ct-api reader does with the bucket alone: the checkpoint, checked
    with the shard's public key, and every entry's leaf hash from the data tiles, which
    must give the checkpoint's root and match the level-0 hash tiles."""
    pem = bucket_object(server, bucket, f"{prefix}/log-key.pem")
    note = bucket_object(server, bucket, f"{prefix}/checkpoint")
    assert pem is not None and note is not None
    key = serialization.load_pem_public_key(pem)
    checkpoint = ct.verify_checkpoint(note.decode(), ORIGIN, key)
    size = checkpoint.tree_size
    hashes: list[bytes] = []
    for tile in range(0, (size + 255) // 256):
        width = min(256, size - tile * 256)
        data = bucket_object(server, bucket, f"{prefix}/{ct.tile_path('data', tile, width)}")
        assert data is not None, f"data tile {tile} (width {width}) is not in the bucket"
        items = ct.split_data_tile(data)
        assert len(items) == width
        level0 = [merkle.leaf_hash(b"\x00\x00" + ct.timestamped_entry_of_tile_leaf(item))
                  for item in items]
        tile_hashes = bucket_object(server, bucket, f"{prefix}/{ct.tile_path(0, tile, width)}")
        assert tile_hashes == b"".join(level0), f"hash tile {tile} disagrees with its data"
        hashes += level0
    assert merkle.root_from_hashes(hashes) == checkpoint.root
    return checkpoint, hashes


async def test_tiles_in_s3_survive_sigkill_and_verify_from_the_bucket_alone(
        tmp_path: Path, aws_env: CephS3) -> None:
    bucket = aws_env.create_bucket()
    ca = make_ca("S3")
    root = tmp_path / "extra-root.pem"
    root.write_bytes(ca.root.public_bytes(serialization.Encoding.PEM))
    extra = s3_config(aws_env, bucket, root)
    leaves = [ca.leaf(f"s{i}.trust") for i in range(1200)]
    server = start_server_process(tmp_path, "qh3", extra)
    try:
        acknowledged, heads = await add_chains_until_killed(server, leaves, ca.der, 2.0)
    finally:
        server.stop()
    assert len(acknowledged) > 50, len(acknowledged)
    # Nothing of the tiles on local disk: only the replicated state knows the tree.
    data = tmp_path / "data"
    on_disk = [p for p in data.rglob("*") if p.is_file() and
               ("tile" in p.parts or p.name in ("checkpoint", "log-key.pem"))]
    assert on_disk == []
    staged = list((data / "ct").glob("*/staging/*")) if (data / "ct").is_dir() else []
    assert staged == []  # and no bundle staged locally either

    restarted = start_server_process(tmp_path, "qh3", extra)
    try:
        client = await stoq.connect("::1", restarted.port, pin=restarted.pin, timeout=10)
        key = (await stoq.ShardKeys.fetch(client)).keys[0]
        sth = await client.request("ct.get-sth")
        stoq.verify_sth(sth, key)
        size = sth["tree_size"]
        assert size >= len(acknowledged)
        # Each acknowledged SCT's entry has its proof from the restarted node.
        for der, sct in acknowledged[:: max(1, len(acknowledged) // 20)]:
            leaf = ct.TimestampedEntry(timestamp=sct["timestamp"], entry_type=ct.X509_ENTRY,
                                       certificate=der,
                                       extensions=ct.leaf_index_extensions(sct["leaf_index"]))
            proof = await client.request("ct.get-proof-by-hash", {
                "hash": merkle.leaf_hash(leaf.merkle_tree_leaf()), "tree_size": size})
            merkle.verify_inclusion(proof["leaf_index"], size,
                                    merkle.leaf_hash(leaf.merkle_tree_leaf()),
                                    proof["audit_path"], sth["sha256_root_hash"])
        # The new tree extends every tree head handed out before the kill.
        for head in heads:
            await stoq.verify_consistency(client, 0, head, sth)
        # One more entry, then the bucket alone: checkpoint, tiles, an inclusion proof.
        await client.request("ct.add-chain", {"chain": [leaves[-1], ca.der]})
        deadline = time.monotonic() + 10
        while True:
            checkpoint, hashes = read_log_from_bucket(aws_env, bucket, "validator-a/0")
            if checkpoint.tree_size > size or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert checkpoint.tree_size > size
        der, sct = acknowledged[len(acknowledged) // 2]
        index = sct["leaf_index"]
        leaf = ct.TimestampedEntry(timestamp=sct["timestamp"], entry_type=ct.X509_ENTRY,
                                   certificate=der,
                                   extensions=ct.leaf_index_extensions(index))
        assert hashes[index] == merkle.leaf_hash(leaf.merkle_tree_leaf())
        merkle.verify_inclusion(index, checkpoint.tree_size, hashes[index],
                                merkle.inclusion_proof(index, checkpoint.tree_size,
                                                       lambda a, b: merkle.root_from_hashes(
                                                           hashes[a:b])),
                                checkpoint.root)
        await client.close()
    finally:
        restarted.stop()
    # trustchain ct check verifies every tile in the bucket, and names a missing one.
    check = ct_check(tmp_path)
    assert check.returncode == 0 and "OK shard 0" in check.stdout, check
    aws_env.client().delete_object(Bucket=bucket, Key="validator-a/0/tile/data/000")
    check = ct_check(tmp_path)
    assert check.returncode == 1, check
    assert "FAIL shard 0" in check.stdout and "validator-a/0/tile/data/000" in check.stdout


def ct_check(tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trustchain", "ct", "check", "--config",
                           str(tmp / "config.toml"), "--data-dir", str(tmp / "data")],
                          capture_output=True, text=True, timeout=60)


async def test_unreachable_s3_pauses_sequencing_and_it_resumes_by_itself(
        tmp_path: Path, aws_env: CephS3) -> None:
    bucket = aws_env.create_bucket()
    ca = make_ca("S3 outage")
    root = tmp_path / "extra-root.pem"
    root.write_bytes(ca.root.public_bytes(serialization.Encoding.PEM))
    leaves = iter([ca.leaf(f"o{i}.trust") for i in range(3000)])
    server = start_server_process(tmp_path, "qh3", s3_config(aws_env, bucket, root))
    acknowledged: list[tuple[bytes, dict[str, Any]]] = []
    stop_load = asyncio.Event()
    try:
        client = await stoq.connect("::1", server.port, pin=server.pin, timeout=40)

        async def submitter() -> None:
            while not stop_load.is_set():
                der = next(leaves)
                try:
                    sct = await client.request("ct.add-chain", {"chain": [der, ca.der]})
                except TrustChainError as exc:  # not acknowledged: the client tries again
                    if exc.code not in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT):
                        raise
                    await asyncio.sleep(0.2)
                    continue
                acknowledged.append((der, sct))

        load = [asyncio.ensure_future(submitter()) for _ in range(8)]
        await asyncio.sleep(1.0)
        before_outage = len(acknowledged)
        assert before_outage > 0
        aws_env.stop_gateway()
        try:
            health = await wait_for_health(client, lambda h: h["status"] == "degraded", 40)
            assert health["checks"]["ct"] is False
            assert health["reasons"]["ct"].startswith("sequencing waits for the tiles' object "
                                                      "store"), health
            # a new submission is turned away at once, with a delay to retry after
            with pytest.raises(TrustChainError) as refused:
                await asyncio.wait_for(client.request("ct.add-chain", {
                    "chain": [next(leaves), ca.der]}), 15)
            assert refused.value.code == ErrorCode.UNAVAILABLE, refused.value
            assert refused.value.details.get("retry_after", 0) > 0
            assert "object store" in refused.value.message
            stalled = len(acknowledged)
            await asyncio.sleep(1.0)
            assert len(acknowledged) == stalled  # nothing is acknowledged meanwhile
        finally:
            aws_env.start_gateway()
        await wait_for_health(client, lambda h: h["checks"]["ct"] is True, 60)
        resumed = len(acknowledged)
        deadline = time.monotonic() + 30
        while len(acknowledged) < resumed + 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(acknowledged) >= resumed + 20
        stop_load.set()
        await asyncio.wait_for(asyncio.gather(*load), 60)
        # Every acknowledged entry is in the log, at its index.
        sth = await client.request("ct.get-sth")
        by_index = {sct["leaf_index"]: (der, sct) for der, sct in acknowledged}
        start = 0
        while start < sth["tree_size"]:
            got = await client.request("ct.get-entries", {
                "start": start, "end": min(sth["tree_size"], start + 999)})
            for i, entry in enumerate(got["entries"], start):
                if i in by_index:
                    der, _ = by_index.pop(i)
                    assert ct.parse_merkle_tree_leaf(entry["leaf_input"]).certificate == der
            start += len(got["entries"])
        assert not by_index
        await client.close()
    finally:
        server.stop()


async def wait_for_health(client: stoq.AsyncClient, wanted: Any, seconds: float
                          ) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        health = await client.request("node.health")
        if wanted(health):
            return dict(health)
        if time.monotonic() > deadline:
            raise AssertionError(f"node.health did not change within {seconds} s: {health}")
        await asyncio.sleep(0.2)


async def test_a_node_with_both_storages_on_s3_issues_survives_sigkill_and_verifies(
        tmp_path: Path, aws_env: CephS3, prover: stoq.Prover) -> None:
    """The issue's "done when": certificates issued by a node whose CT tiles and audit
    segments are both in S3; SIGKILL and restart; every certificate still valid with
    its SCT and inclusion proof, nothing of the tiles on disk, the audit segments locked
    and verified from the bucket alone, an edited local audit copy detected."""
    tiles_bucket = aws_env.create_bucket()
    audit_bucket = aws_env.create_bucket(object_lock=True)
    extra = (f'[ct.storage]\nbackend = "s3"\nbucket = "{tiles_bucket}"\n'
             f'region = "{aws_env.region}"\nendpoint = "{aws_env.endpoint}"\n'
             f'[audit.storage]\nbackend = "s3"\nbucket = "{audit_bucket}"\n'
             f'region = "{aws_env.region}"\nendpoint = "{aws_env.endpoint}"\n'
             'retention = "1d"\nprefix = "audit"\n')
    server = start_server_process(tmp_path, "qh3", extra)
    issued: dict[str, str] = {}  # serial -> fingerprint, every answer received
    try:
        client = await stoq.connect("::1", server.port, pin=server.pin, timeout=10)
        requester = Requester(client, prover)
        keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(8)]
        stop = time.monotonic() + 2.0

        async def worker(w: int) -> None:
            counter = 0
            while time.monotonic() < stop + 10:
                counter += 1
                try:
                    result = await requester.issue(make_csr(keys[w], [f"s3w{w}-{counter}.trust"]))
                except Exception:
                    return
                issued[result["serial"]] = result["fingerprint"]

        workers = [asyncio.ensure_future(worker(w)) for w in range(8)]
        await asyncio.sleep(2.0)
        os.kill(server.proc.pid, signal.SIGKILL)
        await asyncio.wait(workers, timeout=20)
        await client.close()
    finally:
        server.stop()
    assert len(issued) >= 5, len(issued)
    assert not [p for p in (tmp_path / "data").rglob("*")
                if p.is_file() and ("tile" in p.parts or p.name == "checkpoint")]

    restarted = start_server_process(tmp_path, "qh3", extra)
    try:
        client = await stoq.connect("::1", restarted.port, pin=restarted.pin, timeout=10)
        for serial, fingerprint in issued.items():
            status = await client.request("ca.validate", {"serial": serial})
            assert status["status"] == "valid", (serial, status)
            verified = await client.request("fp.verify", {"fingerprint": fingerprint})
            assert verified["valid"] and verified["sct_valid"] and verified["included"], \
                verified
        await client.close()
    finally:
        restarted.stop()
    assert restarted.proc.returncode == 0  # a clean stop: the audit tail is signed

    client_s3 = aws_env.client()
    versions = client_s3.list_object_versions(Bucket=audit_bucket, Prefix="audit/segments/")
    segments = versions.get("Versions", [])
    assert segments, versions
    first = segments[0]
    with pytest.raises(client_s3.exceptions.ClientError) as refused:
        client_s3.delete_object(Bucket=audit_bucket, Key=first["Key"],
                                VersionId=first["VersionId"])
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    good = audit_verify_from_s3(tmp_path)
    assert good.returncode == 0 and good.stdout.rstrip().endswith("OK"), good
    log = tmp_path / "data" / "audit" / "audit.log"
    text = log.read_text()
    log.write_text(text.replace('"kind":"ca.issued"', '"kind":"ca.issuex"', 1))
    bad = audit_verify_from_s3(tmp_path)
    assert bad.returncode == 1 and bad.stdout.rstrip().endswith("TAMPERED"), bad


def audit_verify_from_s3(tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trustchain", "audit", "verify", "--from-s3",
                           "--config", str(tmp / "config.toml"), "--data-dir",
                           str(tmp / "data")], capture_output=True, text=True, timeout=120)
