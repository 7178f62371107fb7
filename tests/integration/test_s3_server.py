"""The throwaway Ceph S3 server itself: a real client round trip, the gateway's stop and
restart (what the fault tests rely on), and an Object Lock bucket."""

from __future__ import annotations

import socket

import botocore.exceptions
import pytest

from tests.s3_server import CephS3, S3ServerError


def test_put_get_round_trip(s3_server: CephS3) -> None:
    client = s3_server.client()
    bucket = s3_server.create_bucket()
    client.put_object(Bucket=bucket, Key="dir/a", Body=b"\x00payload\xff")
    assert client.get_object(Bucket=bucket, Key="dir/a")["Body"].read() == b"\x00payload\xff"
    listed = client.list_objects_v2(Bucket=bucket, Prefix="dir/")
    assert [o["Key"] for o in listed["Contents"]] == ["dir/a"]


def test_gateway_stop_then_start(s3_server: CephS3) -> None:
    client = s3_server.client()
    bucket = s3_server.create_bucket()
    client.put_object(Bucket=bucket, Key="k", Body=b"before")
    s3_server.stop_gateway()
    try:
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            client.get_object(Bucket=bucket, Key="k")
    finally:
        s3_server.start_gateway()
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"before"
    client.put_object(Bucket=bucket, Key="k2", Body=b"after")
    assert client.get_object(Bucket=bucket, Key="k2")["Body"].read() == b"after"


def test_object_lock_bucket(s3_server: CephS3) -> None:
    client = s3_server.client()
    locked = s3_server.create_bucket(object_lock=True)
    config = client.get_object_lock_configuration(Bucket=locked)["ObjectLockConfiguration"]
    assert config["ObjectLockEnabled"] == "Enabled"
    plain = s3_server.create_bucket()
    with pytest.raises(botocore.exceptions.ClientError):
        client.get_object_lock_configuration(Bucket=plain)


def test_wrong_secret_is_refused(s3_server: CephS3) -> None:
    bucket = s3_server.create_bucket()
    client = s3_server.client(secret_key="not-the-secret")
    with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch"):
        client.get_object(Bucket=bucket, Key="x")


def test_start_failure_is_one_line_with_the_log_tail() -> None:
    """radosgw cannot bind its port: start() fails with one line quoting its log, and
    stops the monitor and the OSD it had started."""
    server = CephS3()
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as taken:
        taken.bind(("::1", server.rgw_port))
        taken.listen()
        # (radosgw sometimes crashes on its way out: exit -11 after "failed to bind")
        with pytest.raises(S3ServerError, match=r"^rgw exited with -?\d+: .*failed") as error:
            server.start()
    assert "\n" not in str(error.value)
    assert f"[::1]:{server.rgw_port}" in str(error.value)
    assert not server.dir.exists()
