"""Requests that never arrive whole: bounded in time, and released with their connection.

Clients park partial request frames (the CVE-2025-47950 pattern on STOQ, issue 16):
the bytes the node holds for them show in ``node.info`` stats
(``buffered_request_bytes``), drop to zero as soon as the clients close, and a parked
stream is refused with ``timeout`` after ``network.request_timeout``.
"""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path
from typing import Any

import stoq
from protocol import STOQ_REQUEST_CANCELLED, encode_frame
from protocol._frames import FrameDecoder

from ..helpers import RawConnection, RunningNode, decode_frames, running_node

CLIENTS = 8
STREAMS = 20
PARKED = 40_000
"""Bytes of a 100 kB request frame each parked stream sends."""


def partial_frame() -> bytes:
    frame = encode_frame({"op": "node.echo", "args": {"data": b"p" * 100_000}})
    return frame[:PARKED]


async def stats(client: stoq.AsyncClient) -> dict[str, Any]:
    return dict((await client.request("node.info"))["stats"])


async def wait_for_stat(client: stoq.AsyncClient, key: str, ok: Any, timeout: float
                        ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        current = await stats(client)
        if ok(current[key]) or time.monotonic() > deadline:
            return current
        await asyncio.sleep(0.05)


def held_by_decoders() -> int:
    """Bytes every request frame decoder alive in this process holds (the node runs here)."""
    return sum(o.buffered for o in gc.get_objects() if type(o) is FrameDecoder)


async def park(node: RunningNode, streams: int) -> tuple[RawConnection, list[int]]:
    conn = await RawConnection(node.engine).connect(node.host, node.port)
    ids = []
    for _ in range(streams):
        stream_id = conn.new_stream()
        conn.send(stream_id, partial_frame(), end_stream=False)
        ids.append(stream_id)
    return conn, ids


async def test_parked_requests_are_released_when_their_clients_close(
        tmp_path: Path, engine: str) -> None:
    async with running_node(tmp_path / "data", engine) as node:
        async with await node.client() as client:
            assert (await stats(client))["buffered_request_bytes"] == 0
            # Memory actually freed, not only no longer counted: with the cyclic garbage
            # collector off, whatever a closed connection still references stays alive.
            gc.collect()
            gc.disable()
            try:
                parked = [await park(node, STREAMS) for _ in range(CLIENTS)]
                expected = CLIENTS * STREAMS * (PARKED - 4)  # the headers are read
                held = await wait_for_stat(client, "buffered_request_bytes",
                                           lambda v: v >= expected, 10)
                assert held["buffered_request_bytes"] == expected
                assert held_by_decoders() == expected
                for conn, _ in parked:
                    await conn.close()
                del parked
                released = await wait_for_stat(client, "connections", lambda v: v == 1, 10)
                still_held = held_by_decoders()
            finally:
                gc.enable()
            assert released["buffered_request_bytes"] == 0 and still_held == 0
            assert released["connections"] == 1 and released["expired_requests"] == 0
            assert (await client.request("node.health"))["status"] in ("ok", "degraded")


async def test_a_parked_request_is_refused_after_the_request_timeout(
        tmp_path: Path, engine: str) -> None:
    extra = '[network]\nrequest_timeout = "1s"\n'
    async with running_node(tmp_path / "data", engine, extra) as node:
        async with await node.client() as client:
            conn, (stream_id, other) = await park(node, 2)
            try:
                started = time.monotonic()
                (frame,) = decode_frames(await conn.response(stream_id, timeout=5))
                waited = time.monotonic() - started
                assert frame["error"]["code"] == "timeout", frame
                assert 0.8 <= waited < 3.0, waited
                await conn.response(other, timeout=2)
                deadline = time.monotonic() + 2
                while len(conn.stops) < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert conn.stops == {stream_id: STOQ_REQUEST_CANCELLED,
                                      other: STOQ_REQUEST_CANCELLED}
                after = await wait_for_stat(client, "expired_requests", lambda v: v >= 2, 2)
                assert after["expired_requests"] == 2 and after["buffered_request_bytes"] == 0
                # the connection goes on: a whole request is answered
                (ok,) = decode_frames((await conn.request(
                    encode_frame({"op": "node.health"})))[1])
                assert ok["ok"]["status"] in ("ok", "degraded")
            finally:
                await conn.close()
            # a request that arrives whole in time is not touched by the timer
            assert (await client.request("node.echo", {"data": b"x" * 200_000}))["data"]
