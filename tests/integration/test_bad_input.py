"""Bad input over real QUIC: each gets the error code or stream action spec/stoq.md
prescribes, and the server goes on serving."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import cbor2
import pytest

from protocol import STOQ_EXCESSIVE_LOAD, RateLimited, encode_frame, frame_payload

from ..helpers import CddlChecker, RawConnection, RunningNode, decode_frames, running_node

STREAM_LIMIT_ERROR = 0x4


async def _still_serving(node: RunningNode) -> None:
    async with await node.client() as client:
        assert (await client.request("node.health"))["status"] == "ok"


def _only_error(data: bytes, cddl: CddlChecker) -> str:
    (frame,) = decode_frames(data)
    cddl("(raw)", frame)  # must be a valid error-response
    return str(frame["error"]["code"])


CASES = [
    ("malformed CBOR", frame_payload(b"\xff\xfe"), "malformed"),
    ("two CBOR items in one frame", frame_payload(b"\xa0\xa0"), "malformed"),
    ("CBOR tag", frame_payload(bytes.fromhex("c11a514b67b0")), "malformed"),
    ("not a map", encode_frame([1, 2]), "invalid_request"),
    ("missing op", encode_frame({"args": {}}), "invalid_request"),
    ("op not a string", encode_frame({"op": 1}), "invalid_request"),
    ("empty op", encode_frame({"op": ""}), "invalid_request"),
    ("unknown op", encode_frame({"op": "ca.nothing"}), "unknown_op"),
    ("wrong argument type", encode_frame({"op": "node.echo", "args": {"data": "text"}}),
     "invalid_request"),
    ("unknown argument", encode_frame({"op": "node.info", "args": {"x": 1}}), "invalid_request"),
    ("truncated frame then FIN", encode_frame({"op": "node.health"})[:-3], "malformed"),
    ("header only then FIN", b"\x00\x00", "malformed"),
    ("no frame at all", b"", "invalid_request"),
    ("data after the request frame", encode_frame({"op": "node.health"}) + b"\x00",
     "invalid_request"),
    ("two request frames", encode_frame({"op": "node.health"}) * 2, "invalid_request"),
]


@pytest.mark.parametrize(("name", "data", "code"), CASES, ids=[c[0] for c in CASES])
async def test_bad_request(tmp_path: Path, engine: str, cddl: CddlChecker, name: str,
                           data: bytes, code: str) -> None:
    async with running_node(tmp_path, engine, checker=cddl) as node:
        raw = await RawConnection(engine).connect(node.host, node.port)
        try:
            _, response = await raw.request(data)
            assert _only_error(response, cddl) == code
            # the same connection still works
            _, response = await raw.request(encode_frame({"op": "node.health"}))
            assert decode_frames(response)[0]["ok"]["status"] == "ok"
        finally:
            await raw.close()
        await _still_serving(node)


async def test_oversize_frame_refused_from_its_header(tmp_path: Path, engine: str,
                                                      cddl: CddlChecker) -> None:
    async with running_node(tmp_path, engine, "[network]\nmax_frame_size = 4096",
                            checker=cddl) as node:
        raw = await RawConnection(engine).connect(node.host, node.port)
        try:
            stream_id = raw.new_stream()
            # declare 1 GB, send only the header, keep the stream open
            raw.send(stream_id, (10**9).to_bytes(4, "big"), end_stream=False)
            response = await raw.response(stream_id)
            (frame,) = decode_frames(response)
            assert frame["error"]["code"] == "too_large"
            assert frame["error"]["limit"] == 4096
            for _ in range(50):
                if stream_id in raw.stops:
                    break
                await asyncio.sleep(0.01)
            assert raw.stops[stream_id] == STOQ_EXCESSIVE_LOAD
            # a frame just under the limit still works
            _, ok = await raw.request(encode_frame({"op": "node.echo",
                                                    "args": {"data": b"x" * 4000}}))
            assert decode_frames(ok)[0]["ok"]["data"] == b"x" * 4000
        finally:
            await raw.close()
        await _still_serving(node)


async def test_unidirectional_stream_closes_only_that_connection(
        tmp_path: Path, engine: str, cddl: CddlChecker) -> None:
    async with running_node(tmp_path, engine, checker=cddl) as node:
        raw = await RawConnection(engine).connect(node.host, node.port)
        try:
            quic = raw.protocol._quic
            assert quic._remote_max_streams_uni == 0  # the server grants none
            quic._remote_max_streams_uni = 4  # ignore that, as a hostile client would
            stream_id = quic.get_next_available_stream_id(is_unidirectional=True)
            raw.send(stream_id, encode_frame({"op": "node.health"}))
            for _ in range(200):
                if raw.terminated is not None:
                    break
                await asyncio.sleep(0.01)
            assert raw.terminated is not None
            assert raw.terminated.error_code == STREAM_LIMIT_ERROR
        finally:
            await raw.close()
        await _still_serving(node)


async def test_stream_limit(tmp_path: Path, engine: str, cddl: CddlChecker) -> None:
    extra = "[network]\nmax_streams_per_connection = 4"
    async with running_node(tmp_path, engine, extra, checker=cddl) as node:
        # A well-behaved client waits for credit.
        async with await node.client() as client:
            subs = [client.subscribe("node.heartbeat", {"interval_ms": 50}) for _ in range(4)]
            for sub in subs:
                await sub.__anext__()
            health = asyncio.ensure_future(client.request("node.health"))
            await asyncio.sleep(0.3)
            assert not health.done()  # blocked: 4 streams open
            await subs[0].aclose()
            assert (await asyncio.wait_for(health, 5))["status"] == "ok"
            for sub in subs[1:]:
                await sub.aclose()
            # credit keeps coming back as streams finish
            for _ in range(3):
                await asyncio.gather(*(client.request("node.health") for _ in range(20)))
        # A client that ignores the limit loses its connection.
        raw = await RawConnection(engine).connect(node.host, node.port)
        try:
            quic = raw.protocol._quic
            assert quic._remote_max_streams_bidi == 4
            quic._remote_max_streams_bidi = 100
            hold = encode_frame({"op": "node.heartbeat", "args": {"interval_ms": 10000}})
            for _ in range(6):
                raw.send(raw.new_stream(), hold)
            for _ in range(200):
                if raw.terminated is not None:
                    break
                await asyncio.sleep(0.01)
            assert raw.terminated is not None
            assert raw.terminated.error_code == STREAM_LIMIT_ERROR
        finally:
            await raw.close()
        await _still_serving(node)


async def test_rate_limit(tmp_path: Path, engine: str, cddl: CddlChecker) -> None:
    async with running_node(tmp_path, engine, "[api]\nrate_limit_per_minute = 600",
                            checker=cddl) as node, await node.client() as client:
        results = await asyncio.gather(*(client.request("node.health") for _ in range(700)),
                                       return_exceptions=True)
        limited = [r for r in results if isinstance(r, Exception)]
        # a burst of 600, then about 10 a second
        assert 80 <= len(limited) <= 100, len(limited)
        assert all(isinstance(r, RateLimited) for r in limited)
        retry = max(r.retry_after for r in limited)  # type: ignore[attr-defined]
        assert 0 < retry <= 0.2
        await asyncio.sleep(retry + 0.1)
        assert (await client.request("node.health"))["status"] == "ok"


async def test_fuzz_frames(tmp_path: Path, engine: str, cddl: CddlChecker) -> None:
    """10,000 random frames on one connection: each answered, the server stays up."""
    rng = random.Random(1234)
    ops = ["node.health", "node.info", "node.echo", "x", ""]

    def random_frame() -> bytes:
        kind = rng.randrange(7)
        if kind == 6:  # a short, valid subscription
            return encode_frame({"op": "node.heartbeat",
                                 "args": {"interval_ms": 10, "count": rng.randrange(1, 4)}})
        if kind == 0:
            return rng.randbytes(rng.randrange(0, 40))
        if kind == 1:
            return frame_payload(rng.randbytes(rng.randrange(0, 40)))
        if kind == 2:
            return (rng.randrange(0, 2**32)).to_bytes(4, "big") + rng.randbytes(8)
        value = {"op": rng.choice(ops),
                 "args": {rng.choice(["data", "count", "interval_ms", "x"]):
                          rng.choice([None, -1, 0, 5, 2**40, "s", b"b", [1], {"a": 1}, 1.5])}}
        if kind == 3:
            value = rng.choice([value, [value], value["args"], {"op": value}])
        encoded = cbor2.dumps(value)
        if kind == 4 and encoded:
            pos = rng.randrange(len(encoded))
            encoded = encoded[:pos] + bytes([rng.randrange(256)]) + encoded[pos + 1:]
        return frame_payload(encoded)

    async with running_node(tmp_path, engine, checker=cddl) as node:
        raw = await RawConnection(engine).connect(node.host, node.port)
        answered = 0
        try:
            for _ in range(10_000 // 50):
                batch = []
                for _ in range(50):
                    stream_id = raw.new_stream()
                    raw.send(stream_id, random_frame())
                    batch.append(stream_id)
                for stream_id in batch:
                    try:
                        data = await raw.response(stream_id, timeout=10)
                    finally:
                        raw.streams.pop(stream_id, None)
                    if stream_id in raw.resets:
                        continue
                    frames = decode_frames(data)
                    if frames and "event" in frames[0]:
                        assert all(f["event"] == "heartbeat" for f in frames)
                        answered += 1
                        continue
                    assert len(frames) == 1 and ("ok" in frames[0] or "error" in frames[0])
                    answered += 1
            assert raw.terminated is None
        finally:
            await raw.close()
        assert answered > 9000
        await _still_serving(node)
