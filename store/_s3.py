"""The S3 backend of :class:`ObjectStore` (obstore) and the Object Lock bucket for the
audit log (botocore).

Credentials come only from the standard AWS environment variables or the shared
credentials file, never from TrustChain's configuration. obstore (Rust core, releases
the GIL, conditional puts) carries the tile hot path; see bench/README.md for the
measurement behind that choice. :class:`LockedBucket` uses botocore, the core of
aiobotocore, because it needs calls obstore does not have (the bucket's Object Lock
configuration, object versions) and it is called rarely, from a worker thread.
"""

from __future__ import annotations

import asyncio
import configparser
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple

import obstore
import obstore.exceptions
from obstore.store import S3Store

from ._errors import ObjectStoreError, ObjectStoreUnavailable
from ._objects import check_key, join_prefix

CONCURRENCY = 16
"""Requests put_many keeps in flight."""

Encryption = Literal["AES256", "aws:kms"]
"""``AES256`` asks for SSE-S3, ``aws:kms`` for SSE-KMS (request headers only)."""

CONNECT_TIMEOUT = timedelta(seconds=5)
REQUEST_TIMEOUT = timedelta(seconds=30)
RETRY_TIMEOUT = timedelta(seconds=10)
"""A transient failure is retried within this long before ObjectStoreUnavailable."""


@dataclass(frozen=True, slots=True)
class S3Location:
    """Where objects go: a bucket (and a key prefix) of an S3 or S3-compatible service."""

    bucket: str
    region: str
    endpoint: str | None = None
    """An S3-compatible service's URL (``http://`` allowed); None for AWS."""
    prefix: str = ""
    encryption: Encryption | None = None

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True, slots=True)
class AwsCredentials:
    """Static credentials from the environment or the shared credentials file."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None
    source: str
    """Where they came from, for messages (never the secret)."""


def aws_credentials(environ: Mapping[str, str] | None = None) -> AwsCredentials:
    """The credentials from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
    ``AWS_SESSION_TOKEN``, else from the profile ``AWS_PROFILE`` (or ``default``) of
    ``AWS_SHARED_CREDENTIALS_FILE`` (or ``~/.aws/credentials``).

    :raises ObjectStoreError: none are set, or the file cannot be read.
    """
    env = os.environ if environ is None else environ
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return AwsCredentials(key, secret, env.get("AWS_SESSION_TOKEN") or None,
                              "environment")
    path = Path(env.get("AWS_SHARED_CREDENTIALS_FILE")
                or Path(env.get("HOME", "~")) / ".aws" / "credentials").expanduser()
    profile = env.get("AWS_PROFILE") or "default"
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text())
    except FileNotFoundError:
        raise ObjectStoreError(
            "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            f"profile {profile!r} in {path}") from None
    except (OSError, configparser.Error) as exc:
        raise ObjectStoreError(f"cannot read AWS credentials file {path}: {exc}") from exc
    section = parser[profile] if parser.has_section(profile) else None
    if section is None or not section.get("aws_access_key_id") \
            or not section.get("aws_secret_access_key"):
        raise ObjectStoreError(f"no AWS credentials: {path} has no profile {profile!r} "
                               f"with aws_access_key_id and aws_secret_access_key")
    return AwsCredentials(section["aws_access_key_id"], section["aws_secret_access_key"],
                          section.get("aws_session_token") or None, f"{path} [{profile}]")


_STATUS = re.compile(r"status code: (\d{3})")


def _translate(exc: Exception, what: str) -> ObjectStoreError:
    """An obstore error as ObjectStoreUnavailable (transport errors, timeouts, 5xx, 408,
    429) or a final ObjectStoreError, with a one-line message."""
    text = str(exc)
    status = _STATUS.search(text)
    code = int(status.group(1)) if status else None
    reason = re.search(r"<Code>([^<]+)</Code>", text)
    if code is None:
        detail = text.split("\n", 1)[0]
        detail = detail.split(" - ", 1)[-1].strip() or type(exc).__name__
        return ObjectStoreUnavailable(f"{what}: cannot reach S3 ({detail})")
    summary = f"HTTP {code}" + (f" {reason.group(1)}" if reason else "")
    if code >= 500 or code in (408, 429):
        return ObjectStoreUnavailable(f"{what}: S3 unavailable ({summary})")
    return ObjectStoreError(f"{what}: refused by S3 ({summary})")


class S3Objects:
    """An :class:`ObjectStore` in an S3 bucket under a prefix (obstore's blocking API)."""

    def __init__(self, location: S3Location, *, credentials: AwsCredentials | None = None,
                 _store: S3Store | None = None) -> None:
        """:raises ObjectStoreError: no credentials (see :func:`aws_credentials`)."""
        self._where = location
        self._prefix = location.prefix.strip("/")
        if _store is not None:
            self._store = _store
            return
        creds = credentials or aws_credentials()
        config: dict[str, Any] = {
            "access_key_id": creds.access_key_id,
            "secret_access_key": creds.secret_access_key,
            "region": location.region,
        }
        if creds.session_token:
            config["token"] = creds.session_token
        if location.endpoint:
            config["endpoint"] = location.endpoint
        if location.encryption:
            config["server_side_encryption"] = location.encryption
        self._store = S3Store(
            location.bucket, config=config,  # type: ignore[arg-type]
            client_options={"allow_http": bool(location.endpoint
                                                and location.endpoint.startswith("http:")),
                            "connect_timeout": CONNECT_TIMEOUT, "timeout": REQUEST_TIMEOUT},
            retry_config={"max_retries": 3, "retry_timeout": RETRY_TIMEOUT})

    @property
    def location(self) -> str:
        return self._where.url if not self._prefix else \
            f"s3://{self._where.bucket}/{self._prefix}"

    def sub(self, prefix: str) -> S3Objects:
        where = S3Location(self._where.bucket, self._where.region, self._where.endpoint,
                           join_prefix(self._prefix, prefix.strip("/"), self.location),
                           self._where.encryption)
        return S3Objects(where, _store=self._store)

    def _key(self, key: str) -> str:
        check_key(key, self.location)
        return f"{self._prefix}/{key}" if self._prefix else key

    def _what(self, verb: str, key: str) -> str:
        return f"{verb} s3://{self._where.bucket}/{self._key(key)}"

    def get(self, key: str) -> bytes | None:
        try:
            return bytes(obstore.get(self._store, self._key(key)).bytes())
        except FileNotFoundError as exc:
            if "NoSuchBucket" in str(exc):
                raise _translate(exc, self._what("get", key)) from exc
            return None
        except (obstore.exceptions.BaseError, OSError) as exc:
            raise _translate(exc, self._what("get", key)) from exc

    def put(self, key: str, data: bytes) -> None:
        try:
            obstore.put(self._store, self._key(key), data, use_multipart=False)
        except (obstore.exceptions.BaseError, OSError) as exc:
            raise _translate(exc, self._what("put", key)) from exc

    def put_many(self, objects: Mapping[str, bytes]) -> None:
        paths = {key: self._key(key) for key in objects}
        if paths:
            asyncio.run(self._put_all(objects, paths))

    async def _put_all(self, objects: Mapping[str, bytes], paths: dict[str, str]) -> None:
        limit = asyncio.Semaphore(CONCURRENCY)
        failures: list[ObjectStoreError] = []

        async def put_one(key: str) -> None:
            async with limit:
                try:
                    await obstore.put_async(self._store, paths[key], objects[key],
                                            use_multipart=False)
                except (obstore.exceptions.BaseError, OSError) as exc:
                    failures.append(_translate(exc, self._what("put", key)))

        await asyncio.gather(*(put_one(key) for key in objects))
        if failures:  # an unreachable store wins over a final error: the caller retries
            failures.sort(key=lambda e: not isinstance(e, ObjectStoreUnavailable))
            raise failures[0]

    def list(self, prefix: str = "") -> list[str]:
        full = f"{self._prefix}/{prefix}" if self._prefix else prefix
        head = full.rpartition("/")[0] if prefix else self._prefix
        strip = len(self._prefix) + 1 if self._prefix else 0
        try:
            keys = [meta["path"][strip:]
                    for batch in obstore.list(self._store, prefix=head or None)
                    for meta in batch]
        except (obstore.exceptions.BaseError, OSError) as exc:
            raise _translate(exc, f"list {self.location}/{prefix}") from exc
        return sorted(key for key in keys if key.startswith(prefix))

    def delete(self, key: str) -> None:
        try:
            obstore.delete(self._store, self._key(key))
        except FileNotFoundError:
            return
        except (obstore.exceptions.BaseError, OSError) as exc:
            raise _translate(exc, self._what("delete", key)) from exc

    def check(self) -> None:
        """Verify at start that the bucket can be written and read (one clear line if
        not: the error names the bucket and what S3 said)."""
        probe = ".trustchain-check"
        self.put(probe, b"ok")
        if self.get(probe) != b"ok":
            raise ObjectStoreError(f"{self.location}: a written object did not read back")
        self.delete(probe)


LockMode = Literal["COMPLIANCE", "GOVERNANCE"]
"""COMPLIANCE: no credential can delete or shorten before the retention ends;
GOVERNANCE: a credential with s3:BypassGovernanceRetention can."""


def _botocore_error(exc: Exception, what: str) -> ObjectStoreError:
    """A botocore error as ObjectStoreUnavailable (cannot connect, timeout, 5xx, 408,
    429, SlowDown) or a final ObjectStoreError, with a one-line message."""
    import botocore.exceptions

    if isinstance(exc, botocore.exceptions.ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        error = exc.response.get("Error", {})
        summary = f"HTTP {status} {error.get('Code', '')}".strip()
        if error.get("Message"):
            summary += f": {error['Message']}"
        if status >= 500 or status in (408, 429) or error.get("Code") == "SlowDown":
            return ObjectStoreUnavailable(f"{what}: S3 unavailable ({summary})")
        return ObjectStoreError(f"{what}: refused by S3 ({summary})")
    return ObjectStoreUnavailable(f"{what}: cannot reach S3 ({exc})")


class ObjectVersion(NamedTuple):
    """One version of an object, or a delete marker, in a bucket (``version_id``
    ``null`` in a bucket without versioning)."""

    key: str
    """Relative to the bucket's prefix."""
    version_id: str
    last_modified: datetime
    latest: bool
    delete_marker: bool


class LockedBucket:
    """A bucket with S3 Object Lock: objects written with a retention that no one (in
    COMPLIANCE mode) can delete or overwrite before it ends. For the audit log's
    segments. Blocking: call from a worker thread."""

    def __init__(self, location: S3Location, *, mode: LockMode = "COMPLIANCE",
                 credentials: AwsCredentials | None = None) -> None:
        """:raises ObjectStoreError: no credentials (see :func:`aws_credentials`)."""
        import botocore.config
        import botocore.session

        creds = credentials or aws_credentials()
        self._where = location
        self._prefix = location.prefix.strip("/")
        self.mode: LockMode = mode
        session = botocore.session.Session()
        self._client = session.create_client(
            "s3", region_name=location.region, endpoint_url=location.endpoint,
            aws_access_key_id=creds.access_key_id,
            aws_secret_access_key=creds.secret_access_key,
            aws_session_token=creds.session_token,
            config=botocore.config.Config(
                connect_timeout=CONNECT_TIMEOUT.total_seconds(),
                read_timeout=REQUEST_TIMEOUT.total_seconds(),
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"} if location.endpoint else None))

    @property
    def location(self) -> str:
        return self._where.url

    def _key(self, key: str) -> str:
        check_key(key, self.location)
        return f"{self._prefix}/{key}" if self._prefix else key

    def _call(self, what: str, operation: str, absent: tuple[str, ...] = (), /,
              **params: Any) -> Any:
        """The client's ``operation`` on this bucket; None if S3 answers with one of the
        ``absent`` error codes (no such key, version, configuration)."""
        import botocore.exceptions

        try:
            return getattr(self._client, operation)(Bucket=self._where.bucket, **params)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in absent:
                return None
            raise _botocore_error(exc, what) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise _botocore_error(exc, what) from exc

    def check_lock(self) -> None:
        """Verify at start that the bucket exists and has Object Lock enabled.

        :raises ObjectStoreError: one line naming the bucket and what is wrong.
        """
        what = f"Object Lock of {self.location}"
        answer = self._call(what, "get_object_lock_configuration",
                            ("ObjectLockConfigurationNotFoundError",))
        if answer is None:
            raise ObjectStoreError(
                f"{what}: the bucket does not have Object Lock enabled (create it "
                f"with Object Lock; it cannot be turned on later on this server)")
        enabled = answer.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        if enabled != "Enabled":
            raise ObjectStoreError(f"{what}: the bucket does not have Object Lock enabled")

    def put_locked(self, key: str, data: bytes, retain_until: datetime) -> str:
        """Write ``data`` under ``key`` locked in this bucket's mode until
        ``retain_until`` (timezone-aware); return the new version's id."""
        if retain_until.tzinfo is None:
            raise ValueError("retain_until must be timezone-aware")
        answer = self._call(f"put s3://{self._where.bucket}/{self._key(key)}", "put_object",
                            Key=self._key(key), Body=data, ObjectLockMode=self.mode,
                            ObjectLockRetainUntilDate=retain_until.astimezone(UTC))
        return str(answer.get("VersionId", ""))

    def get(self, key: str) -> bytes | None:
        """The current version's bytes, or None if there is none."""
        return self._get(key, f"get s3://{self._where.bucket}/{self._key(key)}")

    def _get(self, key: str, what: str, **version: str) -> bytes | None:
        import botocore.exceptions

        answer = self._call(what, "get_object", ("NoSuchKey", "NoSuchVersion"),
                            Key=self._key(key), **version)
        if answer is None:
            return None
        try:
            return bytes(answer["Body"].read())
        except botocore.exceptions.BotoCoreError as exc:
            raise _botocore_error(exc, what) from exc

    def versions(self, prefix: str = "") -> list[ObjectVersion]:
        """Every version and delete marker of the keys that start with ``prefix``
        (relative to this bucket's prefix), by key, newest first within a key: what
        Object Lock kept, even where a later write or a delete hides it."""
        full = f"{self._prefix}/{prefix}" if self._prefix else prefix
        strip = len(self._prefix) + 1 if self._prefix else 0
        found: list[ObjectVersion] = []
        marker: dict[str, str] = {}
        while True:
            page = self._call(f"list versions {self.location}/{prefix}",
                              "list_object_versions", Prefix=full, **marker)
            for kind, deleted in (("Versions", False), ("DeleteMarkers", True)):
                found.extend(ObjectVersion(item["Key"][strip:], str(item["VersionId"]),
                                           item["LastModified"], bool(item["IsLatest"]),
                                           deleted)
                             for item in page.get(kind, ()))
            if not page.get("IsTruncated"):
                found.sort(key=lambda v: (v.key, -v.last_modified.timestamp()))
                return found
            marker = {"KeyMarker": page["NextKeyMarker"]}
            if page.get("NextVersionIdMarker"):
                marker["VersionIdMarker"] = page["NextVersionIdMarker"]

    def get_version(self, key: str, version_id: str) -> bytes | None:
        """The bytes of one version of ``key`` (from :meth:`versions`); None if it is
        gone."""
        return self._get(key, f"get s3://{self._where.bucket}/{self._key(key)} version "
                              f"{version_id}", VersionId=version_id)

    def list(self, prefix: str = "") -> list[str]:
        """The keys (relative to this bucket's prefix) that start with ``prefix``, sorted."""
        full = f"{self._prefix}/{prefix}" if self._prefix else prefix
        strip = len(self._prefix) + 1 if self._prefix else 0
        keys: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = self._call(f"list {self.location}/{prefix}", "list_objects_v2",
                              Prefix=full, **token)
            keys.extend(item["Key"][strip:] for item in page.get("Contents", ()))
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def retention(self, key: str) -> tuple[str, datetime]:
        """The current version's lock mode and retain-until date."""
        answer = self._call(f"retention of s3://{self._where.bucket}/{self._key(key)}",
                            "get_object_retention", Key=self._key(key))
        return str(answer["Retention"]["Mode"]), answer["Retention"]["RetainUntilDate"]
