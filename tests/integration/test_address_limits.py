"""Connection limits per client address and per /64, and new connections per address
a second: one client cannot take every slot, and the refused client reads why.

The clients send from extra addresses this test puts on the loopback interface
(root only, as in CI), so that several "clients" exist without leaving the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import stoq

from ..helpers import RunningNode, running_node

CONNECTION_REFUSED = 0x2
NEAR_1, NEAR_2 = "fd7c:5:0:1::1", "fd7c:5:0:1::2"  # one /64
FAR = "fd7c:5:0:2::1"                              # another /64


@pytest.fixture(scope="module")
def addresses() -> Iterator[list[str]]:
    added: list[str] = []
    try:
        for address in (NEAR_1, NEAR_2, FAR):
            done = subprocess.run(["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo",
                                   "nodad"], capture_output=True, text=True, check=False)
            if done.returncode != 0 and "File exists" not in done.stderr:
                pytest.skip(f"cannot add {address} to lo (needs root): {done.stderr.strip()}")
            added.append(address)
        yield added
    finally:
        for address in added:
            subprocess.run(["ip", "-6", "addr", "del", f"{address}/128", "dev", "lo"],
                           capture_output=True, check=False)


async def refused(node: RunningNode, local: str) -> str:
    with pytest.raises(stoq.ConnectionFailed) as info:
        await node.client(local_address=local, timeout=5)
    assert info.value.details.get("quic_error") == CONNECTION_REFUSED
    return str(info.value)


async def test_one_address_or_prefix_cannot_take_every_connection(
        tmp_path: Path, engine: str, addresses: list[str]) -> None:
    extra = ("[network]\nmax_concurrent_connections = 10\nmax_connections_per_address = 2\n"
             "max_connections_per_prefix = 3\nmax_handshakes_per_second = 0")
    async with running_node(tmp_path, engine, extra) as node, contextlib.AsyncExitStack() as held:
        for _ in range(2):
            held.push_async_callback((await node.client(local_address=NEAR_1)).close)
        message = await refused(node, NEAR_1)
        assert "too many connections from this address (limit 2)" in message, message
        near_2 = await node.client(local_address=NEAR_2)  # the /64's third
        message = await refused(node, NEAR_2)
        assert "too many connections from this /64 (limit 3)" in message, message
        for local in (FAR, "::1"):  # everybody else still gets in
            async with await node.client(local_address=local) as other:
                assert (await other.request("node.health"))["status"] == "ok"
        server = node.node.server
        assert server is not None and server.connections_from(NEAR_2) == 1
        await near_2.close()
        for _ in range(100):  # the server notices the close, and the slot is free again
            if server.connections_from(NEAR_2) == 0:
                break
            await asyncio.sleep(0.02)
        async with await node.client(local_address=NEAR_2) as again:
            stats = (await again.request("node.info"))["stats"]
        assert stats["refused_by_address_limits"] == 2
        assert stats["refused_connections"] == 2


async def test_new_connections_per_address_a_second(tmp_path: Path, engine: str,
                                                     addresses: list[str]) -> None:
    extra = "[network]\nmax_handshakes_per_second = 2"
    async with running_node(tmp_path, engine, extra) as node:
        # three handshakes at once (one after the other, a slow machine's handshakes
        # could take long enough for a token to come back): one second's burst is two
        tried = await asyncio.gather(*(node.client(local_address=NEAR_1, timeout=5)
                                       for _ in range(3)), return_exceptions=True)
        refusals = [r for r in tried if isinstance(r, stoq.ConnectionFailed)]
        for client in tried:
            if isinstance(client, stoq.AsyncClient):
                await client.close()
        assert len(refusals) == 1 and sum(isinstance(c, stoq.AsyncClient) for c in tried) == 2, \
            tried
        assert refusals[0].details.get("quic_error") == CONNECTION_REFUSED
        message = str(refusals[0])
        assert "too many new connections from this address (limit 2 a second)" in message
        async with await node.client(local_address=FAR) as far:  # its own allowance
            assert (await far.request("node.health"))["status"] == "ok"
        await asyncio.sleep(0.6)  # a token back
        async with await node.client(local_address=NEAR_1) as later:
            assert (await later.request("node.health"))["status"] == "ok"
