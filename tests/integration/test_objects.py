"""The ObjectStore contract on both backends (a directory, and a bucket of a real Ceph
S3 gateway), S3 faults (gateway down and back, bad credentials, no bucket), the
credentials rules, and the Object Lock bucket against the real server."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import botocore.exceptions
import pytest

from store import (
    AwsCredentials,
    FilesystemObjects,
    LockedBucket,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailable,
    S3Location,
    S3Objects,
    aws_credentials,
)
from tests.s3_server import CephS3


def credentials(server: CephS3, *, secret: str | None = None) -> AwsCredentials:
    return AwsCredentials(server.access_key, secret or server.secret_key, None, "test")


def s3_objects(server: CephS3, bucket: str, prefix: str = "", **kw: str) -> S3Objects:
    return S3Objects(S3Location(bucket, server.region, server.endpoint, prefix),
                     credentials=credentials(server, **kw))


@pytest.fixture(params=["filesystem", "s3"])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """An empty store on each backend (a fresh bucket, under a prefix, for S3)."""
    if request.param == "filesystem":
        yield FilesystemObjects(tmp_path / "objects")
    else:
        server: CephS3 = request.getfixturevalue("s3_server")
        yield s3_objects(server, server.create_bucket(), "log/shard0")


def test_round_trip_and_absent(objects: ObjectStore) -> None:
    assert objects.get("tile/0/000") is None
    objects.put("tile/0/000", b"\x00tile\xff")
    assert objects.get("tile/0/000") == b"\x00tile\xff"
    objects.put("tile/0/000", b"replaced")
    assert objects.get("tile/0/000") == b"replaced"
    objects.put("empty", b"")
    assert objects.get("empty") == b""


def test_list_under_prefix(objects: ObjectStore) -> None:
    keys = ["checkpoint", "tile/0/000", "tile/0/001", "tile/0/x001/002", "tile/1/000",
            "tile/data/000", "issuer/ab"]
    objects.put_many({key: key.encode() for key in keys})
    assert objects.list() == sorted(keys)
    assert objects.list("tile/0/") == ["tile/0/000", "tile/0/001", "tile/0/x001/002"]
    assert objects.list("tile/0/x") == ["tile/0/x001/002"]
    assert objects.list("tile/0/00") == ["tile/0/000", "tile/0/001"]
    assert objects.list("tile/d") == ["tile/data/000"]
    assert objects.list("nothing/") == []
    assert objects.list("check") == ["checkpoint"]


def test_sub_is_the_same_store_under_a_prefix(objects: ObjectStore) -> None:
    shard = objects.sub("shard7")
    shard.put("tile/0/000", b"in shard")
    assert objects.get("shard7/tile/0/000") == b"in shard"
    assert shard.list() == ["tile/0/000"]
    assert objects.sub("shard7").sub("tile").get("0/000") == b"in shard"
    assert shard.location.endswith("shard7")


def test_put_many_and_delete(objects: ObjectStore) -> None:
    batch = {f"tile/0/{i:03d}": secrets.token_bytes(8192) for i in range(40)}
    objects.put_many(batch)
    for key, data in batch.items():
        assert objects.get(key) == data
    objects.delete("tile/0/000")
    objects.delete("tile/0/000")  # absent is fine
    objects.delete("never/was")
    assert objects.get("tile/0/000") is None
    assert len(objects.list("tile/")) == 39


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a/", ".."])
def test_bad_keys_are_refused(objects: ObjectStore, key: str) -> None:
    with pytest.raises(ObjectStoreError, match="bad object key"):
        objects.put(key, b"x")


def test_check_passes_on_a_writable_store(objects: ObjectStore) -> None:
    assert isinstance(objects, FilesystemObjects | S3Objects)
    objects.check()
    assert objects.list() == []


def test_filesystem_put_is_a_durable_file(tmp_path: Path) -> None:
    objects = FilesystemObjects(tmp_path)
    objects.put("a/b/c", b"data")
    assert (tmp_path / "a/b/c").read_bytes() == b"data"
    assert [p.name for p in (tmp_path / "a/b").iterdir()] == ["c"]  # no temporary left


def test_filesystem_check_names_the_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ObjectStoreError, match=str(tmp_path / "file")):
        FilesystemObjects(tmp_path / "file").check()


def test_gateway_down_is_unavailable_then_back(s3_server: CephS3) -> None:
    objects = s3_objects(s3_server, s3_server.create_bucket())
    objects.put("k", b"before")
    s3_server.stop_gateway()
    try:
        with pytest.raises(ObjectStoreUnavailable, match=r"put s3://.*/k2: cannot reach S3"):
            objects.put("k2", b"x")
        with pytest.raises(ObjectStoreUnavailable):
            objects.get("k")
        with pytest.raises(ObjectStoreUnavailable):
            objects.put_many({"a": b"1", "b": b"2"})
        with pytest.raises(ObjectStoreUnavailable):
            objects.list()
    finally:
        s3_server.start_gateway()
    assert objects.get("k") == b"before"
    objects.put("k2", b"after")
    assert objects.get("k2") == b"after"


def test_bad_credentials_are_a_final_error(s3_server: CephS3) -> None:
    objects = s3_objects(s3_server, s3_server.create_bucket(), secret="wrong-secret")
    with pytest.raises(ObjectStoreError, match=r"refused by S3 \(HTTP 403 SignatureDoesNotMatch") \
            as error:
        objects.check()
    assert not isinstance(error.value, ObjectStoreUnavailable)
    assert "\n" not in str(error.value)


def test_missing_bucket_is_a_final_error(s3_server: CephS3) -> None:
    objects = s3_objects(s3_server, "no-such-bucket")
    with pytest.raises(ObjectStoreError, match=r"s3://no-such-bucket/.*NoSuchBucket") as error:
        objects.check()
    assert not isinstance(error.value, ObjectStoreUnavailable)
    with pytest.raises(ObjectStoreError, match="NoSuchBucket"):
        objects.get("k")


@pytest.mark.parametrize("encryption", ["AES256", "aws:kms"])
def test_ceph_refuses_sse_over_http(s3_server: CephS3, encryption: str) -> None:
    """What the tested server does with SSE headers (spec/config.md says it): Ceph 16
    without a KMS and without TLS refuses both with 400 InvalidRequest."""
    objects = S3Objects(S3Location(s3_server.create_bucket(), s3_server.region,
                                   s3_server.endpoint, "", encryption),  # type: ignore[arg-type]
                        credentials=credentials(s3_server))
    with pytest.raises(ObjectStoreError, match="HTTP 400 InvalidRequest") as error:
        objects.put("k", b"x")
    assert not isinstance(error.value, ObjectStoreUnavailable)


def test_credentials_from_environment_or_file(tmp_path: Path) -> None:
    env = {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "SECRET",
           "AWS_SESSION_TOKEN": "TOKEN", "HOME": str(tmp_path)}
    assert aws_credentials(env) == AwsCredentials("AKID", "SECRET", "TOKEN", "environment")
    with pytest.raises(ObjectStoreError, match="no AWS credentials: set AWS_ACCESS_KEY_ID"):
        aws_credentials({"HOME": str(tmp_path)})
    path = tmp_path / "creds"
    path.write_text("[default]\naws_access_key_id = D\naws_secret_access_key = DS\n"
                    "[audit]\naws_access_key_id = A\naws_secret_access_key = AS\n")
    file_env = {"HOME": str(tmp_path), "AWS_SHARED_CREDENTIALS_FILE": str(path)}
    assert aws_credentials(file_env).access_key_id == "D"
    assert aws_credentials({**file_env, "AWS_PROFILE": "audit"}).secret_access_key == "AS"
    with pytest.raises(ObjectStoreError, match="has no profile 'other'"):
        aws_credentials({**file_env, "AWS_PROFILE": "other"})
    (tmp_path / ".aws").mkdir()
    path.rename(tmp_path / ".aws" / "credentials")
    assert aws_credentials({"HOME": str(tmp_path)}).access_key_id == "D"


def test_missing_credentials_fail_at_construction(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
                 "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    where = S3Location("bucket", "default")
    with pytest.raises(ObjectStoreError, match="no AWS credentials"):
        S3Objects(where)
    with pytest.raises(ObjectStoreError, match="no AWS credentials"):
        LockedBucket(where)


def test_credentials_from_the_environment_reach_the_server(
        s3_server: CephS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    objects = S3Objects(S3Location(s3_server.create_bucket(), s3_server.region,
                                   s3_server.endpoint))
    objects.check()


def locked(server: CephS3, bucket: str, prefix: str = "") -> LockedBucket:
    return LockedBucket(S3Location(bucket, server.region, server.endpoint, prefix),
                        credentials=credentials(server))


def test_locked_objects_cannot_be_deleted(s3_server: CephS3) -> None:
    bucket = s3_server.create_bucket(object_lock=True)
    audit = locked(s3_server, bucket, "audit")
    audit.check_lock()
    until = datetime.now(UTC) + timedelta(days=1)
    version = audit.put_locked("segment/000001", b"records", until)
    assert audit.get("segment/000001") == b"records"
    assert audit.get("segment/000002") is None
    assert audit.list() == ["segment/000001"]
    assert audit.list("segment/") == ["segment/000001"]
    mode, retain_until = audit.retention("segment/000001")
    assert mode == "COMPLIANCE"
    assert abs(retain_until - until) < timedelta(seconds=1)
    client = s3_server.client()
    with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
        client.delete_object(Bucket=bucket, Key="audit/segment/000001", VersionId=version)
    with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
        client.delete_object(Bucket=bucket, Key="audit/segment/000001", VersionId=version,
                             BypassGovernanceRetention=True)
    with pytest.raises(botocore.exceptions.ClientError):  # shortening is refused too
        client.put_object_retention(
            Bucket=bucket, Key="audit/segment/000001", VersionId=version,
            Retention={"Mode": "COMPLIANCE", "RetainUntilDate": datetime.now(UTC)})
    assert audit.get("segment/000001") == b"records"


def test_check_lock_refuses_a_plain_bucket(s3_server: CephS3) -> None:
    bucket = s3_server.create_bucket()
    with pytest.raises(ObjectStoreError, match=f"Object Lock of s3://{bucket}: the bucket "
                                               "does not have Object Lock enabled"):
        locked(s3_server, bucket).check_lock()
    with pytest.raises(ObjectStoreError, match="NoSuchBucket"):
        locked(s3_server, "no-such-bucket").check_lock()


def test_locked_bucket_gateway_down_is_unavailable(s3_server: CephS3) -> None:
    audit = locked(s3_server, s3_server.create_bucket(object_lock=True))
    s3_server.stop_gateway()
    try:
        with pytest.raises(ObjectStoreUnavailable, match="cannot reach S3"):
            audit.put_locked("s", b"x", datetime.now(UTC) + timedelta(days=1))
    finally:
        s3_server.start_gateway()
    audit.put_locked("s", b"x", datetime.now(UTC) + timedelta(days=1))
    assert audit.get("s") == b"x"


def test_governance_mode_can_be_bypassed(s3_server: CephS3) -> None:
    """The configured mode is the one stored: GOVERNANCE yields to a bypass, which the
    COMPLIANCE test above shows refused."""
    bucket = s3_server.create_bucket(object_lock=True)
    audit = LockedBucket(S3Location(bucket, s3_server.region, s3_server.endpoint),
                         mode="GOVERNANCE", credentials=credentials(s3_server))
    version = audit.put_locked("s", b"x", datetime.now(UTC) + timedelta(days=1))
    assert audit.retention("s")[0] == "GOVERNANCE"
    client = s3_server.client()
    with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
        client.delete_object(Bucket=bucket, Key="s", VersionId=version)
    client.delete_object(Bucket=bucket, Key="s", VersionId=version,
                         BypassGovernanceRetention=True)
    assert audit.get("s") is None
