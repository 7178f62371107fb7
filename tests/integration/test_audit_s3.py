"""The audit log's signed segments in a real S3 Object Lock bucket (Ceph's RADOS
Gateway, the ``s3_server`` fixture): uploaded in order off the critical path, locked in
COMPLIANCE mode (the server refuses to delete them), kept locally and uploaded by
themselves once an unreachable gateway is back, and verified from the bucket alone.

Tampering with a segment in place is what COMPLIANCE mode makes impossible: a write to a
segment's key only adds a version and a delete only adds a marker, both of which
``verify_archive`` reports while it checks the locked first version. The tests of an
edited or missing segment's *content* therefore copy the segments to a plain bucket
(no versioning, no lock), where an edit really replaces the bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

import stoq
from protocol import TrustChainError
from store import (
    AuditLog,
    AwsCredentials,
    LockedBucket,
    S3Location,
    SegmentUploader,
    verify_archive,
)
from store._audit_archive import segment_range
from trustchain._compose import audit_bucket
from trustchain._config import loads

from ..audit_records import rehash
from ..helpers import config_text, start_server_process
from ..s3_server import CephS3
from ..unit.test_audit import KeySigner, make_signer

PREFIX = "audit"


def _bucket(server: CephS3, name: str, prefix: str = PREFIX) -> LockedBucket:
    creds = AwsCredentials(server.access_key, server.secret_key, None, "test")
    return LockedBucket(S3Location(name, server.region, server.endpoint, prefix),
                        credentials=creds)


def _uploader(bucket: LockedBucket, path: Path, retention: float = 3600.0
              ) -> SegmentUploader:
    return SegmentUploader(bucket, log_path=path, marker=path.with_suffix(".uploaded"),
                           retention=retention, backoff_max=0.5)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _write(log: AuditLog, count: int, checkpoints: int = 1) -> None:
    """``count`` records, split into ``checkpoints`` signed segments."""
    for part in range(checkpoints):
        for i in range(count // checkpoints):
            log.append("test.record", {"part": part, "i": i, "blob": os.urandom(8)})
        log.checkpoint()


@pytest.fixture
def locked(s3_server: CephS3) -> LockedBucket:
    return _bucket(s3_server, s3_server.create_bucket(object_lock=True))


@pytest.fixture
def signer() -> KeySigner:
    return make_signer("ecdsa-p256-sha256")


@pytest.fixture
def gateway(s3_server: CephS3) -> Iterator[CephS3]:
    """The session's server; its gateway is running again after the test."""
    try:
        yield s3_server
    finally:
        s3_server.start_gateway()


def test_segments_are_locked_in_order_and_verify(tmp_path: Path, s3_server: CephS3,
                                                 locked: LockedBucket,
                                                 signer: KeySigner) -> None:
    locked.check_lock()
    path = tmp_path / "audit.log"
    uploader = _uploader(locked, path)
    with AuditLog(path, signer=signer, checkpoint_every=0, segments=uploader) as log:
        _write(log, 30, checkpoints=3)
        head = log.head[0]
        _wait(lambda: uploader.uploaded_seq == head, "the segments to upload")
        assert uploader.problem() is None and uploader.waiting == 0
    keys = locked.list("segments/")
    ranges = [segment_range(key) for key in keys]
    assert ranges == [(1, 11), (12, 22), (23, 33)], keys  # 10 records and a checkpoint each
    # the bucket holds the local file byte for byte, under COMPLIANCE retention
    assert b"".join(locked.get(key) or b"" for key in keys) == path.read_bytes()
    for key in keys:
        mode, until = locked.retention(key)
        assert mode == "COMPLIANCE"
        assert abs(until - (datetime.now(UTC) + timedelta(hours=1))) < timedelta(minutes=2)
    # no credential, not even the bucket owner's, deletes a locked version
    client = s3_server.client()
    version = locked.versions(keys[0])[0].version_id
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        client.delete_object(Bucket=locked._where.bucket, Key=f"{PREFIX}/{keys[0]}",
                             VersionId=version)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    assert locked.get_version(keys[0], version) is not None

    report = verify_archive(locked, public_keys=[signer.public_key()], local=path)
    assert report.ok, report.problems
    assert (report.records, report.segments, report.last_checkpoint_seq) == (33, 3, 33)
    assert report.local == [f"local copy {path}: the same as the bucket up to record 33"]
    # another key's signatures are not trusted
    other = verify_archive(locked, public_keys=[make_signer("ed25519").public_key()])
    assert not other.ok and all("checkpoint at" in p for p in other.problems)


def test_an_edited_local_copy_is_detected(tmp_path: Path, locked: LockedBucket,
                                          signer: KeySigner) -> None:
    path = tmp_path / "audit.log"
    uploader = _uploader(locked, path)
    with AuditLog(path, signer=signer, checkpoint_every=0, segments=uploader) as log:
        _write(log, 10)
        _wait(lambda: uploader.waiting == 0 and uploader.uploaded_seq == 11, "upload")
        log.append("test.unsigned", {})  # local only: no checkpoint yet
    # close() signed the tail (13) and uploaded it; the local copy is then edited
    lines = path.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[4])
    record["data"]["i"] = 999
    rehash(record)  # a careful forger: the record's own hash matches
    lines[4] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    report = verify_archive(locked, public_keys=[signer.public_key()], local=path)
    assert not report.ok
    assert report.problems == [
        f"local copy {path}: differs from the bucket at record 5 (the local log was "
        "edited; the bucket's copy is locked)"], report.problems
    # a local copy cut short is a difference too
    path.write_bytes(b"".join(lines[:3]))
    cut = verify_archive(locked, local=path)
    assert [p for p in cut.problems if "ends before record 4" in p], cut.problems


def test_overwriting_or_deleting_a_locked_segment_is_reported(
        tmp_path: Path, s3_server: CephS3, locked: LockedBucket, signer: KeySigner) -> None:
    path = tmp_path / "audit.log"
    uploader = _uploader(locked, path)
    with AuditLog(path, signer=signer, checkpoint_every=0, segments=uploader) as log:
        _write(log, 8, checkpoints=2)
        _wait(lambda: uploader.uploaded_seq == 10, "upload")
    first, second = locked.list("segments/")
    client, bucket = s3_server.client(), locked._where.bucket
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/{first}", Body=b"{}\n")  # a new version
    client.delete_object(Bucket=bucket, Key=f"{PREFIX}/{second}")  # only a delete marker
    report = verify_archive(locked, public_keys=[signer.public_key()], local=path)
    assert report.problems == [
        f"{first}: overwritten (2 versions; the first one written is checked)",
        f"{second}: deleted (a delete marker hides it; the locked version is checked)"]
    # what Object Lock kept still verifies as the whole chain, equal to the local copy
    assert report.records == 10 and report.last_checkpoint_seq == 10
    assert report.local == [f"local copy {path}: the same as the bucket up to record 10"]


def _copy_to_plain_bucket(server: CephS3, locked: LockedBucket) -> LockedBucket:
    plain = _bucket(server, server.create_bucket(object_lock=False))
    client = server.client()
    for key in locked.list("segments/"):
        client.put_object(Bucket=plain._where.bucket, Key=f"{PREFIX}/{key}",
                          Body=locked.get(key))
    return plain


def test_an_edited_or_missing_segment_is_detected(tmp_path: Path, s3_server: CephS3,
                                                  locked: LockedBucket,
                                                  signer: KeySigner) -> None:
    path = tmp_path / "audit.log"
    uploader = _uploader(locked, path)
    with AuditLog(path, signer=signer, checkpoint_every=0, segments=uploader) as log:
        _write(log, 15, checkpoints=3)
        _wait(lambda: uploader.uploaded_seq == 18, "upload")
    plain = _copy_to_plain_bucket(s3_server, locked)
    assert verify_archive(plain, public_keys=[signer.public_key()]).ok
    client, bucket = s3_server.client(), plain._where.bucket
    keys = plain.list("segments/")

    # an edited record, rehashed by a careful forger: the next record's prev gives it away
    data = (plain.get(keys[1]) or b"").splitlines(keepends=True)
    record = json.loads(data[2])
    record["kind"] = "test.forged"
    rehash(record)
    data[2] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/{keys[1]}", Body=b"".join(data))
    edited = verify_archive(plain, public_keys=[signer.public_key()], local=path)
    assert not edited.ok
    assert "record 10: prev does not match record 9's hash (that record edited, or " \
           "records removed)" in edited.problems, edited.problems
    assert any("differs from the bucket at record 9" in p for p in edited.problems)

    # a missing segment
    client.delete_object(Bucket=bucket, Key=f"{PREFIX}/{keys[1]}")
    missing = verify_archive(plain, public_keys=[signer.public_key()])
    assert f"records 7-12 are missing from the bucket (no segment before {keys[2]})" \
        in missing.problems, missing.problems
    # the last one missing: only the local copy shows it (the bucket alone cannot)
    client.delete_object(Bucket=bucket, Key=f"{PREFIX}/{keys[2]}")
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/{keys[1]}",
                      Body=locked.get(keys[1]))
    cut = verify_archive(plain, public_keys=[signer.public_key()], local=path)
    assert cut.ok is True and cut.local == [
        f"local copy {path}: the same as the bucket up to record 12; 6 later records not "
        "in the bucket yet (unsigned, or waiting for upload)"]


def test_an_unreachable_bucket_keeps_segments_locally_until_it_is_back(
        tmp_path: Path, gateway: CephS3, locked: LockedBucket, signer: KeySigner) -> None:
    path = tmp_path / "audit.log"
    uploader = _uploader(locked, path)
    with AuditLog(path, signer=signer, checkpoint_every=0, segments=uploader) as log:
        _write(log, 5)
        _wait(lambda: uploader.uploaded_seq == 6, "the first upload")
        gateway.stop_gateway()
        started = time.monotonic()
        _write(log, 15, checkpoints=3)  # appending does not wait for the bucket
        assert time.monotonic() - started < 2.0
        _wait(lambda: log.problem() is not None, "health to see the failure")
        _wait(lambda: "3 segments waiting" in (log.problem() or ""), "the count")
        problem = log.problem() or ""
        assert problem.startswith(f"audit segments cannot be uploaded to {locked.location} ("
                                  ), problem
        assert "cannot reach S3" in problem, problem
        gateway.start_gateway()
        _wait(lambda: uploader.uploaded_seq == 24 and log.problem() is None,
              "the backlog to upload by itself")
        assert uploader.waiting == 0
    assert [segment_range(k) for k in locked.list("segments/")] == [
        (1, 6), (7, 12), (13, 18), (19, 24)]
    assert verify_archive(locked, public_keys=[signer.public_key()], local=path).ok


def test_a_restart_uploads_what_was_left(tmp_path: Path, gateway: CephS3,
                                         locked: LockedBucket, signer: KeySigner) -> None:
    path = tmp_path / "audit.log"
    uploader = _uploader(locked, path)
    with AuditLog(path, signer=signer, checkpoint_every=0, segments=uploader) as log:
        _write(log, 4)
        _wait(lambda: uploader.uploaded_seq == 5, "the first upload")
        gateway.stop_gateway()
        _write(log, 8, checkpoints=2)
    # closed (with a grace for uploads) while the gateway was down: two segments left
    assert uploader.uploaded_seq == 5
    again = _uploader(locked, path)
    with AuditLog(path, signer=signer, checkpoint_every=0, segments=again) as log:
        # restarted while the bucket is still unreachable: health counts the backlog
        _wait(lambda: "2 segments waiting" in (log.problem() or ""), "the count")
        gateway.start_gateway()
        _wait(lambda: again.uploaded_seq == 15 and again.waiting == 0, "the backlog")
        assert log.problem() is None
    # a lost marker (an upload whose marker write a crash lost): nothing is uploaded twice
    path.with_suffix(".uploaded").unlink()
    third = _uploader(locked, path)
    with AuditLog(path, signer=signer, checkpoint_every=0, segments=third) as log:
        log.append("test.after", {})
    _wait(lambda: third.uploaded_seq == 17, "the new segment")
    versions = locked.versions("segments/")
    assert len(versions) == len({v.key for v in versions}) == 4, versions
    assert verify_archive(locked, public_keys=[signer.public_key()], local=path).ok


def test_a_log_that_does_not_match_the_bucket_is_not_uploaded(
        tmp_path: Path, locked: LockedBucket, signer: KeySigner) -> None:
    """A new local log (the old one moved aside) next to a bucket with the old chain:
    the uploader stops and says so rather than mixing two chains."""
    first = tmp_path / "first.log"
    uploader = _uploader(locked, first)
    with AuditLog(first, signer=signer, checkpoint_every=0, segments=uploader) as log:
        _write(log, 3)
        _wait(lambda: uploader.uploaded_seq == 4, "upload")
    second = tmp_path / "second.log"
    other = _uploader(locked, second)
    with AuditLog(second, signer=signer, checkpoint_every=0, segments=other) as log:
        _write(log, 3)
        _wait(lambda: log.problem() is not None, "the refusal")
        # (found when the bucket's first segment is compared with the local one, or, if
        # the uploader looks before the local log has a signed segment, by its key)
        problem = log.problem() or ""
        assert "differs from the local log" in problem or "a different log?" in problem, \
            problem


# --- a node process ----------------------------------------------------------------------


def _cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trustchain", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60, env={**os.environ, **env})


def _storage(server: CephS3, bucket: str) -> str:
    return (f'[audit.storage]\nbackend = "s3"\nbucket = "{bucket}"\n'
            f'region = "{server.region}"\nendpoint = "{server.endpoint}"\n'
            f'retention = "1d"\nprefix = "node"\n')


async def _health(port: int, pin: str) -> dict[str, Any]:
    async with await stoq.connect("::1", port, pin=pin, timeout=10) as client:
        answer: dict[str, Any] = await client.request("node.health")
    return answer


async def _wait_health(port: int, pin: str, degraded: bool, timeout: float = 30.0
                       ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        answer = await _health(port, pin)
        if ("audit" in answer["reasons"]) == degraded or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.2)


async def test_a_node_keeps_its_audit_log_in_the_locked_bucket(
        tmp_path: Path, gateway: CephS3, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in gateway.environment().items():
        monkeypatch.setenv(name, value)
    bucket = gateway.create_bucket(object_lock=True)
    extra = _storage(gateway, bucket)
    server = start_server_process(tmp_path, "qh3", extra)
    try:
        assert (await _health(server.port, server.pin))["reasons"] == {}
        gateway.stop_gateway()
        async with await stoq.connect("::1", server.port, pin=server.pin) as client:
            with pytest.raises(TrustChainError):  # audited, then refused
                await client.request("ca.issue", {"csr": b"junk"})
        answer = await _wait_health(server.port, server.pin, degraded=True)
        reason = answer["reasons"].get("audit", "")
        assert answer["status"] == "degraded" and "segment" in reason and "waiting" in reason, \
            answer
        gateway.start_gateway()
        answer = await _wait_health(server.port, server.pin, degraded=False)
        assert answer["reasons"] == {}, answer
    finally:
        server.stop()
    assert server.proc.returncode == 0
    locked = _bucket(gateway, bucket, "node")
    keys = locked.list("segments/")
    assert keys and all(locked.retention(k)[0] == "COMPLIANCE" for k in keys)

    config, data = tmp_path / "config.toml", tmp_path / "data"
    env = gateway.environment()
    good = _cli("audit", "verify", "--from-s3", "--config", str(config), "--data-dir",
                str(data), cwd=tmp_path, env=env)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.startswith(f"s3://{bucket}/node: ")
    assert "segments; last signed checkpoint: record" in good.stdout
    assert "the same as the bucket up to record" in good.stdout
    assert good.stdout.rstrip().endswith("OK")

    log = data / "audit" / "audit.log"
    lines = log.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[0])
    record["data"]["mode"] = "production"
    rehash(record)
    lines[0] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    log.write_bytes(b"".join(lines))
    bad = _cli("audit", "verify", "--from-s3", "--config", str(config), "--data-dir",
               str(data), cwd=tmp_path, env=env)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"FAIL local copy {log}: differs from the bucket at record 1 (the local log " \
           "was edited; the bucket's copy is locked)" in bad.stdout
    assert bad.stdout.rstrip().endswith("TAMPERED")


def test_a_node_refuses_a_bucket_without_object_lock(
        tmp_path: Path, s3_server: CephS3, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.create_bucket(object_lock=False)
    with pytest.raises(RuntimeError) as refused:
        start_server_process(tmp_path, "qh3", _storage(s3_server, bucket))
    text = str(refused.value)
    assert "the bucket does not have Object Lock enabled" in text, text
    assert "Traceback" not in text
    # no credentials in the environment: one line too, for audit verify --from-s3
    (tmp_path / "config.toml").write_text(config_text("qh3", _storage(s3_server, bucket)))
    env = {k: "" for k in s3_server.environment()} | {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    missing = _cli("audit", "verify", "--from-s3", "--config", str(tmp_path / "config.toml"),
                   cwd=tmp_path, env=env)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no AWS credentials")
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr


def test_the_configured_bucket_and_governance_mode(tmp_path: Path, s3_server: CephS3,
                                                   signer: KeySigner,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``[audit.storage]`` as the node builds it: credentials from the AWS environment,
    the prefix and the mode from the file; governance mode locks in GOVERNANCE."""
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.create_bucket(object_lock=True)
    cfg = loads(_storage(s3_server, bucket) + 'mode = "governance"\n')
    assert audit_bucket(loads("")) is None  # the filesystem backend: no bucket
    archive = audit_bucket(cfg)
    assert archive is not None and archive.location == f"s3://{bucket}/node"
    archive.check_lock()
    path = tmp_path / "audit.log"
    uploader = _uploader(archive, path, cfg.audit.storage.retention)
    with AuditLog(path, signer=signer, checkpoint_every=0, segments=uploader) as log:
        _write(log, 3)
        _wait(lambda: uploader.uploaded_seq == 4, "upload")
    (key,) = archive.list("segments/")
    assert key == "segments/00000000000000000001-00000000000000000004.jsonl"
    mode, until = archive.retention(key)
    assert mode == "GOVERNANCE"
    assert abs(until - (datetime.now(UTC) + timedelta(days=1))) < timedelta(minutes=2)
