"""Streaming ops stop producing for a client that grants no flow-control credit.

A frozen client (aioquic with its credit updates switched off: it never lets the
server send past its initial 2 KiB a stream) opens heartbeat streams at the fastest
interval. The events the server has produced but could not send
(``unsent_response_bytes`` in ``node.info`` stats) stay at about one event a
stream and do not grow: back-pressure, not buffering (issue 16, item 6: 0.67 MB/s
a connection before).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from protocol import encode_frame

from ..helpers import RawConnection, running_node

STREAMS = 20
EVENT_BOUND = 200
"""Bytes one heartbeat event frame takes at most."""


async def frozen_client(host: str, port: int) -> RawConnection:
    conn = await RawConnection("aioquic").connect(host, port, max_stream_data=2048,
                                                    max_data=1 << 16)
    quic: Any = conn.protocol._quic
    quic._write_connection_limits = lambda *args, **kwargs: None
    quic._write_stream_limits = lambda *args, **kwargs: None
    return conn


async def test_a_frozen_client_holds_no_growing_server_memory(
        tmp_path: Path, engine: str) -> None:
    async with running_node(tmp_path / "data", engine) as node:
        async with await node.client() as client:

            async def unsent() -> int:
                return int((await client.request("node.info"))["stats"][
                    "unsent_response_bytes"])

            conn = await frozen_client(node.host, node.port)
            try:
                for _ in range(STREAMS):
                    conn.send(conn.new_stream(),
                              encode_frame({"op": "node.heartbeat",
                                            "args": {"interval_ms": 10}}))
                await asyncio.sleep(2.0)  # ~200 events a stream at 10 ms if nothing held it
                first = await unsent()
                received = sum(len(data) for data in conn.streams.values())
                await asyncio.sleep(2.0)
                second = await unsent()
                assert received <= STREAMS * 2048  # the credit really ran out
                assert received >= STREAMS * 2048 - STREAMS * EVENT_BOUND
                assert first <= STREAMS * EVENT_BOUND, first
                assert second <= STREAMS * EVENT_BOUND, second
                stats = (await client.request("node.info"))["stats"]
                assert stats["in_flight"] >= STREAMS  # the streams are alive, only held
            finally:
                await conn.close()
            assert (await client.request("node.health"))["status"] in ("ok", "degraded")
