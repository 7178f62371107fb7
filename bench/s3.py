"""S3 clients on a real S3 server: ``python -m bench.s3 [--quick] [--endpoint URL]``.

For each candidate client (obstore, aiobotocore) against the same bucket: sequential
1 KiB PUTs/s, 16-concurrent 1 KiB PUTs/s, 8 KiB GETs/s (sequential and 16-concurrent)
and the client's CPU per sequential PUT (this process's CPU time, all threads; the
server runs in other processes), each beside the baseline measured in the same run:
durable local file writes and reads through ``store.FilesystemObjects``. Then whether
each client can send the Object Lock and SSE headers, checked against the server.

Without ``--endpoint`` it starts its own ``tests.s3_server.CephS3`` (one-host Ceph on
``[::1]``) and stops it at the end; with it, credentials come from the standard AWS
environment variables. Every test is bounded in time. Markdown goes to stdout,
progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import obstore
import uvloop
from obstore.store import S3Store

from store import FilesystemObjects

if TYPE_CHECKING:
    from obstore.store import ClientConfig

CONCURRENCY = 16
SMALL = 1024
MEDIUM = 8192


@dataclass(frozen=True)
class Server:
    """Where the S3 server is and how to sign for it."""

    endpoint: str
    region: str
    access_key: str
    secret_key: str


@dataclass(frozen=True)
class Figure:
    """One measurement: operations per second and CPU seconds per operation."""

    rate: float
    cpu: float


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def timed(seconds: float, limit: int, step: Callable[[int], None]) -> Figure:
    """Call ``step(i)`` until ``seconds`` pass or ``limit`` calls; the rate and CPU."""
    cpu, start = time.process_time(), time.perf_counter()
    count = 0
    while count < limit and time.perf_counter() - start < seconds:
        step(count)
        count += 1
    wall = time.perf_counter() - start
    return Figure(count / wall, (time.process_time() - cpu) / max(count, 1))


async def timed_async(seconds: float, limit: int,
                      step: Callable[[int], Awaitable[None]]) -> Figure:
    """``CONCURRENCY`` workers calling ``step(i)`` until ``seconds`` or ``limit``."""
    cpu, start = time.process_time(), time.perf_counter()
    counter = iter(range(limit))

    async def worker() -> int:
        done = 0
        for i in counter:
            if time.perf_counter() - start >= seconds:
                break
            await step(i)
            done += 1
        return done

    count = sum(await asyncio.gather(*(worker() for _ in range(CONCURRENCY))))
    wall = time.perf_counter() - start
    return Figure(count / wall, (time.process_time() - cpu) / max(count, 1))


def timed_threads(seconds: float, limit: int, step: Callable[[int], None]) -> Figure:
    """``CONCURRENCY`` threads calling the blocking ``step(i)``: the filesystem's
    concurrent figure."""
    async def run() -> Figure:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            return await timed_async(
                seconds, limit, lambda i: loop.run_in_executor(pool, step, i))
    return asyncio.run(run())


def bench_filesystem(seconds: float) -> dict[str, Figure]:
    small, medium = secrets.token_bytes(SMALL), secrets.token_bytes(MEDIUM)
    with tempfile.TemporaryDirectory(prefix="bench-s3-fs-", dir=os.environ.get("TMPDIR")) as d:
        objects = FilesystemObjects(d)
        for i in range(64):
            objects.put(f"get/{i}", medium)
        return {
            "put": timed(seconds, 100_000, lambda i: objects.put(f"seq/{i}", small)),
            "put16": timed_threads(seconds, 100_000,
                                   lambda i: objects.put(f"con/{i}", small)),
            "get": timed(seconds, 1_000_000, lambda i: _none(objects.get(f"get/{i % 64}"))),
            "get16": timed_threads(seconds, 1_000_000,
                                   lambda i: _none(objects.get(f"get/{i % 64}"))),
        }


def _none(_: object) -> None:
    return None


def obstore_store(server: Server, bucket: str, **config: Any) -> S3Store:
    headers = config.pop("default_headers", None)
    options: ClientConfig = {"allow_http": server.endpoint.startswith("http:")}
    if headers:
        options["default_headers"] = headers
    return S3Store(bucket, endpoint=server.endpoint, region=server.region,
                   access_key_id=server.access_key, secret_access_key=server.secret_key,
                   client_options=options, **config)


def bench_obstore(server: Server, bucket: str, seconds: float) -> dict[str, Figure]:
    store = obstore_store(server, bucket)
    small, medium = secrets.token_bytes(SMALL), secrets.token_bytes(MEDIUM)
    for i in range(64):
        obstore.put(store, f"ob/get/{i}", medium)

    async def put(i: int) -> None:
        await obstore.put_async(store, f"ob/con/{i}", small)

    async def get(i: int) -> None:
        await (await obstore.get_async(store, f"ob/get/{i % 64}")).bytes_async()

    return {
        "put": timed(seconds, 100_000, lambda i: _none(obstore.put(store, f"ob/seq/{i}", small))),
        "put16": asyncio.run(timed_async(seconds, 100_000, put)),
        "get": timed(seconds, 100_000,
                     lambda i: _none(obstore.get(store, f"ob/get/{i % 64}").bytes())),
        "get16": asyncio.run(timed_async(seconds, 100_000, get)),
    }


@contextmanager
def aiobotocore_client(server: Server) -> Iterator[tuple[asyncio.AbstractEventLoop, Any]]:
    """One aiobotocore client on its own event loop (entered and closed here)."""
    import aiobotocore.session
    from aiobotocore.config import AioConfig

    loop = uvloop.new_event_loop()
    stack = AsyncExitStack()
    session = aiobotocore.session.get_session()
    client = loop.run_until_complete(stack.enter_async_context(session.create_client(
        "s3", region_name=server.region, endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
        config=AioConfig(s3={"addressing_style": "path"},
                         max_pool_connections=CONCURRENCY))))
    try:
        yield loop, client
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()


def bench_aiobotocore(server: Server, bucket: str, seconds: float) -> dict[str, Figure]:
    small, medium = secrets.token_bytes(SMALL), secrets.token_bytes(MEDIUM)
    with aiobotocore_client(server) as (loop, client):
        async def put(key: str) -> None:
            await client.put_object(Bucket=bucket, Key=key, Body=small)

        async def get(i: int) -> None:
            answer = await client.get_object(Bucket=bucket, Key=f"ab/get/{i % 64}")
            async with answer["Body"] as body:
                await body.read()

        for i in range(64):
            loop.run_until_complete(client.put_object(Bucket=bucket, Key=f"ab/get/{i}",
                                                      Body=medium))
        return {
            "put": timed(seconds, 100_000,
                         lambda i: loop.run_until_complete(put(f"ab/seq/{i}"))),
            "put16": loop.run_until_complete(
                timed_async(seconds, 100_000, lambda i: put(f"ab/con/{i}"))),
            "get": timed(seconds, 100_000, lambda i: loop.run_until_complete(get(i))),
            "get16": loop.run_until_complete(timed_async(seconds, 100_000, get)),
        }


def capabilities(server: Server, plain: str, locked: str) -> list[tuple[str, str, str]]:
    """(client, feature, what the server did) for Object Lock and SSE headers."""
    import botocore.session

    check = botocore.session.get_session().create_client(
        "s3", region_name=server.region, endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key)
    until = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    rows: list[tuple[str, str, str]] = []

    def retention(key: str) -> str:
        got = check.get_object_retention(Bucket=locked, Key=key)["Retention"]
        return f"stored: {got['Mode']} until {got['RetainUntilDate']:%Y-%m-%d %H:%M:%S}"

    def outcome(run: Callable[[], object], then: Callable[[], str] = lambda: "accepted") -> str:
        try:
            run()
        except Exception as exc:
            text = str(exc)
            status = re.search(r"status code: (\d{3})", text)
            code = re.search(r"<Code>([^<]+)</Code>|\(([A-Za-z]+)\) when calling", text)
            if code:
                return (f"refused: {'HTTP ' + status.group(1) + ' ' if status else ''}"
                        f"{code.group(1) or code.group(2)}")
            return f"refused: {text.splitlines()[0][:110]}"
        return then()

    lock_headers = {"x-amz-object-lock-mode": "COMPLIANCE",
                    "x-amz-object-lock-retain-until-date": until.strftime("%Y-%m-%dT%H:%M:%SZ")}
    rows.append(("obstore", "Object Lock headers (client_options default_headers)", outcome(
        lambda: obstore.put(obstore_store(server, locked, default_headers=lock_headers),
                            "lock-ob", b"x"), lambda: retention("lock-ob"))))
    for encryption in ("AES256", "aws:kms"):
        rows.append(("obstore", f"SSE {encryption} (server_side_encryption)", outcome(
            lambda e=encryption: obstore.put(  # type: ignore[misc]
                obstore_store(server, plain, server_side_encryption=e), "sse-ob", b"x"))))
    with aiobotocore_client(server) as (loop, client):
        rows.append(("aiobotocore", "Object Lock headers (ObjectLockMode, ...RetainUntilDate)",
                     outcome(lambda: loop.run_until_complete(client.put_object(
                         Bucket=locked, Key="lock-ab", Body=b"x", ObjectLockMode="COMPLIANCE",
                         ObjectLockRetainUntilDate=until)), lambda: retention("lock-ab"))))
        rows.append(("aiobotocore", "bucket Object Lock configuration (check at start)",
                     outcome(lambda: loop.run_until_complete(
                         client.get_object_lock_configuration(Bucket=locked)))))
        for encryption in ("AES256", "aws:kms"):
            rows.append(("aiobotocore", f"SSE {encryption} (ServerSideEncryption)", outcome(
                lambda e=encryption: loop.run_until_complete(  # type: ignore[misc]
                    client.put_object(Bucket=plain, Key="sse-ab", Body=b"x",
                                      ServerSideEncryption=e)))))
    rows.append(("obstore", "bucket Object Lock configuration (check at start)",
                 "no API for it"))
    return rows


TESTS = [("put", "sequential 1 KiB PUT"), ("put16", f"{CONCURRENCY}-concurrent 1 KiB PUT"),
         ("get", "sequential 8 KiB GET"), ("get16", f"{CONCURRENCY}-concurrent 8 KiB GET")]


def report(results: dict[str, dict[str, Figure]], baseline: dict[str, Figure],
           rows: list[tuple[str, str, str]], seconds: float, where: str) -> None:
    print(f"## bench.s3 ({where}; {seconds:.0f} s a test; baseline: durable local files "
          f"through store.FilesystemObjects, measured in the same run)\n")
    print("| test | client | ops/s | baseline ops/s | client/baseline |")
    print("|---|---|---:|---:|---:|")
    for test, label in TESTS:
        for client, figures in results.items():
            rate, base = figures[test].rate, baseline[test].rate
            print(f"| {label} | {client} | {rate:,.0f} | {base:,.0f} | {rate / base:.2f} |")
    print("\n| client CPU per sequential 1 KiB PUT | µs | baseline µs | ratio |")
    print("|---|---:|---:|---:|")
    for client, figures in results.items():
        cpu, base = figures["put"].cpu * 1e6, baseline["put"].cpu * 1e6
        print(f"| {client} | {cpu:,.0f} | {base:,.0f} | {cpu / base:.2f} |")
    print("\n| client | feature | server's answer |")
    print("|---|---|---|")
    for client, feature, answer in rows:
        print(f"| {client} | {feature} | {answer.replace('|', '/')} |")


def run(server: Server, seconds: float, where: str) -> None:
    import botocore.session

    admin = botocore.session.get_session().create_client(
        "s3", region_name=server.region, endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key)
    plain, locked = f"bench-{secrets.token_hex(4)}", f"bench-lock-{secrets.token_hex(4)}"
    admin.create_bucket(Bucket=plain)
    admin.create_bucket(Bucket=locked, ObjectLockEnabledForBucket=True)
    results: dict[str, dict[str, Figure]] = {}
    progress("filesystem baseline ...")
    baseline = bench_filesystem(seconds)
    progress("obstore ...")
    results["obstore"] = bench_obstore(server, plain, seconds)
    progress("aiobotocore ...")
    results["aiobotocore"] = bench_aiobotocore(server, plain, seconds)
    progress("headers ...")
    rows = capabilities(server, plain, locked)
    report(results, baseline, rows, seconds, where)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__.split(
        "\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1 s a test instead of 5 s")
    parser.add_argument("--endpoint", help="an S3 server to use instead of starting Ceph "
                        "(credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    parser.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION", "default"))
    args = parser.parse_args(argv)
    seconds = 1.0 if args.quick else 5.0
    if args.endpoint:
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            parser.error("--endpoint needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        run(Server(args.endpoint, args.region, key, secret), seconds, args.endpoint)
        return
    from tests.s3_server import CephS3, S3ServerError

    ceph = CephS3()
    try:
        progress("starting a one-host Ceph S3 gateway on [::1] ...")
        ceph.start()
        run(Server(ceph.endpoint, ceph.region, ceph.access_key, ceph.secret_key), seconds,
            "Ceph 16.2.15 RADOS Gateway on [::1], memstore OSD")
    except S3ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        ceph.stop()


if __name__ == "__main__":
    main()
