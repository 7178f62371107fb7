"""DoQ and STOQ through a lossy, reordering, duplicating UDP proxy on [::1].

QUIC recovers what the network loses; the node must take the retransmissions,
duplicates and late frames that recovery produces for what they are. The bar is
exact: every query answered and not one connection closed with a protocol error
(issue 16: 25 % loss towards the client closed 345 of 2,000 DoQ connections).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

import stoq
from handlers.dns._doq_client import DoqManager

from ..helpers import RunningNode
from ..lossy_proxy import Impairment, LossyProxy
from .test_dns import dns_node, root

TO_CLIENT = Impairment(drop=0.25, delay=0.1, max_delay=0.03, duplicate=0.02)
"""The issue's measurement: a quarter of the server's datagrams lost, some late, a few twice."""
TO_SERVER = Impairment(drop=0.05, delay=0.1, max_delay=0.03, duplicate=0.02)

DOQ_CONNECTIONS = 3
QUERIES_PER_CONNECTION = 100
STOQ_REQUESTS = 300
TIME_BOUND = 150.0


@contextmanager
def doq_closes() -> Iterator[list[logging.LogRecord]]:
    """Collects the node's "DoQ connection closed" log records while in the block."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "closed" in record.getMessage():
                records.append(record)

    logger = logging.getLogger("stoq.doq")
    handler = Collect(level=logging.DEBUG)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def doq_stats(node: RunningNode) -> dict[str, Any]:
    async with await node.client() as client:
        return dict((await client.request("dns.health"))["doq"])


async def dnspython_queries(node: RunningNode, port: int) -> list[int]:
    """``DOQ_CONNECTIONS`` dnspython DoQ connections through the proxy, each carrying
    ``QUERIES_PER_CONNECTION`` queries, eight at a time; the rcodes that came back.

    The manager is dnspython's with the lost wake-up of its streams fixed (the
    forwarder's, handlers/dns/_doq_client.py): the stock one times out about one query
    in a hundred here with the answer in its buffer.
    """
    rcodes: list[int] = []

    async def one(connection: Any, gate: asyncio.Semaphore) -> None:
        async with gate:
            query = dns.message.make_query("ns1.trust", "AAAA")
            response = await dns.asyncquery.quic(query, "::1", port=port, timeout=20,
                                                 connection=connection)
            rcodes.append(response.rcode())

    async def on_connection() -> None:
        # A manager keeps one connection per address: one manager per connection.
        manager = DoqManager(verify_mode=root(node), server_name="ns1.trust")
        connection = manager.connect("::1", port)
        gate = asyncio.Semaphore(8)
        try:
            await asyncio.gather(*(one(connection, gate)
                                   for _ in range(QUERIES_PER_CONNECTION)))
        finally:
            await connection.close()

    await asyncio.gather(*(on_connection() for _ in range(DOQ_CONNECTIONS)))
    return rcodes


async def stoq_requests(node: RunningNode, port: int) -> list[str]:
    """``STOQ_REQUESTS`` requests on one STOQ connection through the proxy, eight at a
    time, alternating ``node.health`` and ``dns.resolve``; what each answered."""
    answers: list[str] = []
    gate = asyncio.Semaphore(8)
    async with await stoq.connect(node.host, port, pin=node.pin, engine=node.engine,
                                  trace=node.checker, timeout=30.0) as client:

        async def one(i: int) -> None:
            async with gate:
                if i % 2:
                    health = await client.request("node.health")
                    answers.append(str(health["status"]))
                else:
                    resolved = await client.request("dns.resolve", {"name": "ns1.trust"})
                    answers.append(str(resolved["rcode"]))

        await asyncio.gather(*(one(i) for i in range(STOQ_REQUESTS)))
    return answers


@pytest.mark.parametrize("engine", ["qh3", "aioquic"])
async def test_doq_and_stoq_through_a_lossy_network(tmp_path: Path, engine: str) -> None:
    async with dns_node(tmp_path, engine) as node:
        before = await doq_stats(node)
        async with LossyProxy((node.host, node.port), to_server=TO_SERVER,
                              to_client=TO_CLIENT, seed=16) as proxy:
            with doq_closes() as closes:
                rcodes, answers = await asyncio.wait_for(asyncio.gather(
                    dnspython_queries(node, proxy.port), stoq_requests(node, proxy.port)),
                    TIME_BOUND)
        after = await doq_stats(node)
    assert rcodes == [dns.rcode.NOERROR] * (DOQ_CONNECTIONS * QUERIES_PER_CONNECTION)
    assert len(answers) == STOQ_REQUESTS
    assert set(answers) <= {"ok", "degraded", "NOERROR"}, set(answers)
    assert closes == [], [r.__dict__ for r in closes[:3]]
    assert after["protocol_errors"] == before["protocol_errors"] == 0
    assert after["queries"] - before["queries"] >= DOQ_CONNECTIONS * QUERIES_PER_CONNECTION
    # The network really was bad, both ways.
    counts = proxy.counts
    assert counts.to_client.dropped > 0.15 * (counts.to_client.forwarded
                                              + counts.to_client.dropped)
    assert counts.to_server.dropped > 0 and counts.to_client.delayed > 0
    assert counts.to_client.duplicated > 0 and counts.to_server.duplicated > 0


async def test_the_forwarder_through_a_lossy_network(tmp_path: Path) -> None:
    """The node's own DoQ client (the forwarder, one reused connection) asks another
    node through the proxy: every distinct name gets the upstream's NXDOMAIN."""
    async with dns_node(tmp_path / "a", "qh3") as a:
        async with LossyProxy((a.host, a.port), to_server=TO_SERVER, to_client=TO_CLIENT,
                              seed=61) as proxy:
            extra = f"""
[dns]
upstream_servers = ["doq://ns1.trust@[::1]:{proxy.port}"]
upstream_cafile = "{root(a)}"
upstream_timeout = "20s"
[dns.domains]
trustchain_domains = ["hypermesh"]
"""
            async with dns_node(tmp_path / "b", "qh3", extra, names="[]") as b:
                gate = asyncio.Semaphore(8)
                rcodes: list[str] = []
                async with await b.client(timeout=30.0) as client:

                    async def one(i: int) -> None:
                        async with gate:
                            resolved = await client.request(
                                "dns.resolve", {"name": f"n{i}.trust", "dnssec": False})
                            rcodes.append(str(resolved["rcode"]))

                    with doq_closes() as closes:
                        await asyncio.wait_for(asyncio.gather(
                            *(one(i) for i in range(STOQ_REQUESTS))), TIME_BOUND)
                    health = await client.request("dns.health")
        stats = await doq_stats(a)
    assert rcodes == ["NXDOMAIN"] * STOQ_REQUESTS, (health["upstreams"], stats)
    assert closes == [], [r.__dict__ for r in closes[:3]]
    assert stats["protocol_errors"] == 0
    assert health["upstreams"][0]["failures"] == 0, health["upstreams"]
    assert proxy.counts.to_client.dropped > 0 and proxy.counts.to_server.dropped > 0
