"""A flood of bad input from the network writes a bounded number of log lines.

A real ``trustchain serve`` logs at level info to a file; a client sends 5,000
malformed STOQ frames, twice 300 ``consensus.gossip`` requests with a forged sender (a
stranger, then the node's own validator id with a forged link statement) and
garbage messages, and 20 DoQ connections that break the protocol. Before issue 16
that wrote a line per frame; now each kind of line gets a burst per interval and
one summary line with the count of the others.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import dns.message

import stoq
from protocol import TrustChainError, frame_payload

from ..helpers import RawConnection, ServerProcess, decode_frames, start_server_process

BAD_FRAMES = 5000
BATCH = 50
"""Streams a batch opens at once (the server grants 100)."""
GOSSIP = 300
DOQ_ERRORS = 20
MAX_LINES = 60


def log_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def send_bad_frames(server: ServerProcess) -> list[str]:
    """``BAD_FRAMES`` streams, each carrying one frame that is not CBOR; the error
    codes that came back."""
    conn = await RawConnection("qh3").connect("::1", server.port)
    codes: list[str] = []
    try:
        for _ in range(BAD_FRAMES // BATCH):
            streams = []
            for _ in range(BATCH):
                stream_id = conn.new_stream()
                conn.send(stream_id, frame_payload(b"\xff\xfe"))
                streams.append(stream_id)
            for stream_id in streams:
                (frame,) = decode_frames(await conn.response(stream_id, timeout=10))
                codes.append(str(frame["error"]["code"]))
    finally:
        await conn.close()
    return codes


async def send_forged_gossip(client: stoq.AsyncClient, sender: str) -> list[str]:
    gate = asyncio.Semaphore(20)
    codes: list[str] = []

    async def one(i: int) -> None:
        async with gate:
            try:
                await client.request("consensus.gossip", {
                    "messages": [b"\xff garbage", bytes([i % 256]) * 64],
                    "sender": sender, "link": bytes([i % 256]) * 64})
                codes.append("accepted")
            except TrustChainError as exc:
                codes.append(exc.code.value)

    await asyncio.gather(*(one(i) for i in range(GOSSIP)))
    return codes


async def break_doq(server: ServerProcess) -> int:
    closed = 0
    for _ in range(DOQ_ERRORS):
        conn = await RawConnection("qh3").connect("::1", server.port, alpn="doq")
        try:
            query = dns.message.make_query("ns1.trust", "AAAA")
            query.id = 7  # RFC 9250: must be 0
            wire = query.to_wire()
            conn.send(conn.new_stream(), len(wire).to_bytes(2, "big") + wire)
            deadline = time.monotonic() + 5
            while conn.terminated is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            closed += conn.terminated is not None
        finally:
            await conn.close()
    return closed


async def test_a_flood_of_bad_input_writes_a_bounded_log(tmp_path: Path) -> None:
    log_file = tmp_path / "node.log"
    server = start_server_process(tmp_path, "qh3", f"""
[node]
names = ["ns1.trust"]
[logging]
level = "info"
[logging.output]
type = "file"
path = "{log_file}"
""")
    try:
        started = len(log_lines(log_file))
        codes = await asyncio.wait_for(send_bad_frames(server), 120)
        assert codes == ["malformed"] * BAD_FRAMES
        async with await stoq.connect("::1", server.port, pin=server.pin) as client:
            # From a stranger, and in the name of the node's own validator (a forged
            # link statement: refused by the signature check, then from a cache).
            me = (await client.request("consensus.identity"))["validator"]
            for sender in ("ab" * 20, me):
                gossip = await asyncio.wait_for(send_forged_gossip(client, sender), 60)
                assert set(gossip) == {"unauthorized"}, set(gossip)
            assert await asyncio.wait_for(break_doq(server), 120) == DOQ_ERRORS
            # The node still answers, and counted no consensus misbehaviour: the forged
            # gossip was refused before its messages were looked at.
            assert (await client.request("node.health"))["status"] in ("ok", "degraded")
            status = await client.request("consensus.status")
            assert not status.get("misbehaviour"), status.get("misbehaviour")
        flood = log_lines(log_file)[started:]
        assert len(flood) < MAX_LINES, [e["message"] for e in flood]
        # When the interval ends, one summary line accounts for the refusals left out.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            lines = log_lines(log_file)[started:]
            refused = [e for e in lines if e["message"] == "request refused"]
            summaries = [e for e in lines if e["message"].startswith("request refused: ")]
            if len(refused) + sum(e["suppressed"] for e in summaries) >= BAD_FRAMES:
                break
            await asyncio.sleep(0.5)
        assert len(refused) + sum(e["suppressed"] for e in summaries) == BAD_FRAMES, \
            {(e.get("code"), e.get("reason")) for e in refused}
        assert len(log_lines(log_file)[started:]) < MAX_LINES
    finally:
        server.stop()
