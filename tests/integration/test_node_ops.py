"""node.* ops against a real server over QUIC on [::1], both engines."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

import stoq
from protocol import (
    ConsensusRejected,
    InvalidRequest,
    NotFound,
    Timeout,
    TrustChainError,
    Unavailable,
    UnknownOp,
)

from ..ca_fixtures import make_ca
from ..helpers import CddlChecker, running_node
from .test_ct import _extra


async def test_health_and_info(tmp_path: Path, engine: str, cddl: CddlChecker) -> None:
    async with running_node(tmp_path, engine, checker=cddl) as node:
        async with await node.client() as client:
            health = await client.request("node.health")
            assert health["status"] == "ok"
            assert health["checks"] == {"accepting": True, "audit": True, "consensus": True,
                                        "publishing": True, "dns": True, "ct": True,
                                        "fingerprints": True, "rotation": True}
            assert health["reasons"] == {}
            info = await client.request("node.info")
            assert info["engine"]["name"] == engine
            assert info["alpns"] == ["stoq/1", "doq"]  # DoQ on every socket (spec §15.1)
            assert {"node.health", "node.info", "node.heartbeat", "node.echo"} <= set(info["ops"])
            assert info["tls_fingerprint"] == node.pin
            assert info["peer"]["address"] == "::1"
            assert info["limits"]["max_streams_per_connection"] == 100
            assert info["informational"] == {  # named as such: the node does not use them
                "ca.hsm.cluster_id": "", "ca.hsm.backup_enabled": False,
                "dns.server_id": "trustchain-dns-development",
                "api.server_id": "trustchain-api-development",
                "consensus.byzantine_tolerance": 0.33}
    assert cddl.checked >= 2


async def test_many_requests_on_one_connection(tmp_path: Path, engine: str,
                                               cddl: CddlChecker) -> None:
    async with running_node(tmp_path, engine, checker=cddl) as node:
        async with await node.client() as client:
            results = await asyncio.gather(*(client.request("node.echo", {"data": bytes([i])})
                                             for i in range(250)))
            assert [r["data"] for r in results] == [bytes([i]) for i in range(250)]


async def test_large_echo(tmp_path: Path, engine: str, cddl: CddlChecker) -> None:
    async with running_node(tmp_path, engine, checker=cddl) as node:
        async with await node.client() as client:
            payload = bytes(range(256)) * 4000  # 1,024,000 bytes, under the 1 MiB limit
            assert (await client.request("node.echo", {"data": payload}))["data"] == payload


async def test_heartbeat_stream(tmp_path: Path, engine: str, cddl: CddlChecker) -> None:
    async with running_node(tmp_path, engine, checker=cddl) as node:
        async with await node.client() as client:
            events = [e async for e in client.subscribe("node.heartbeat",
                                                        {"interval_ms": 10, "count": 3})]
            assert [e.event for e in events] == ["heartbeat"] * 3
            assert [e.data["seq"] for e in events] == [0, 1, 2]


async def test_leaving_a_stream_cancels_it_on_the_server(tmp_path: Path, engine: str,
                                                          cddl: CddlChecker) -> None:
    async with running_node(tmp_path, engine, checker=cddl) as node:
        async with await node.client() as client:
            async for event in client.subscribe("node.heartbeat", {"interval_ms": 10}):
                assert event.data["seq"] == 0
                break
            assert node.node.server is not None
            for _ in range(100):
                if node.node.server.stats()["in_flight"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert node.node.server.stats()["in_flight"] == 0
            assert (await client.request("node.health"))["status"] == "ok"


async def test_a_stopped_chain_degrades_health_and_refuses_issuance(
        tmp_path: Path, engine: str, cddl: CddlChecker) -> None:
    """The chain's disk fails under it: the node stays up, says so, and issues nothing."""
    async with running_node(tmp_path, engine, checker=cddl) as node:
        chain = node.node.services.chain
        chain.store._db.close()  # the chain database becomes unwritable
        faucet_key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        async with await node.client() as client:
            with pytest.raises(ConsensusRejected):
                await client.request("consensus.faucet", {"key": faucet_key})
            health = await client.request("node.health")
            assert health["status"] == "degraded" and health["checks"]["consensus"] is False
            assert health["reasons"]["consensus"].startswith("consensus has stopped: ")
            with pytest.raises(ConsensusRejected, match="consensus has stopped"):
                await client.request("consensus.faucet", {"key": faucet_key})


async def test_a_follower_refuses_every_state_change_with_unavailable(
        tmp_path: Path, cddl: CddlChecker) -> None:
    """A node whose validator key is not in the set follows the chain and submits no
    decision: the faucet, a CT submission and its own certificate all get the same code,
    ``unavailable`` (spec §8.2), not ``consensus_rejected`` for some of them."""
    other = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    extra_ca = make_ca("Extra")
    settings = _extra(tmp_path, extra_ca) + (
        f'[[consensus.validators]]\npublic_key = "{other.hex()}"\nport = 9\n')
    async with running_node(tmp_path / "node", "qh3", settings, checker=cddl) as node:
        key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        async with await node.client() as client:
            with pytest.raises(Unavailable, match="follows the cluster"):
                await client.request("consensus.faucet", {"key": key})
            with pytest.raises(Unavailable, match="follows the cluster"):
                await client.request("ct.add-chain",
                                     {"chain": [extra_ca.leaf("f.trust"), extra_ca.der]})
            with pytest.raises(NotFound):
                await client.request("consensus.identity")
        with pytest.raises(Unavailable, match="follows the cluster"):
            await node.node.services.rotator.check()


async def test_a_slow_reader_overflows_instead_of_buffering_without_end(
        tmp_path: Path, engine: str, cddl: CddlChecker) -> None:
    """The client buffers at most ``max_buffered`` unread events, then cancels the stream:
    the reader gets every buffered event in order, then SubscriptionOverflow."""
    async with running_node(tmp_path, engine, checker=cddl) as node:
        async with await node.client() as client:
            stream = client.subscribe("node.heartbeat", {"interval_ms": 10, "count": 1000},
                                      max_buffered=5)
            first = await anext(stream)
            await asyncio.sleep(0.5)  # about 50 events arrive meanwhile; 5 are kept
            seen = [first.data["seq"]]
            with pytest.raises(stoq.SubscriptionOverflow):
                async for event in stream:
                    seen.append(event.data["seq"])
            assert seen == list(range(len(seen))) and 5 <= len(seen) <= 7
            assert node.node.server is not None
            for _ in range(100):  # the server stopped sending: the stream was cancelled
                if node.node.server.stats()["in_flight"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert node.node.server.stats()["in_flight"] == 0
            assert (await client.request("node.health"))["status"] == "ok"


async def test_typed_errors(tmp_path: Path, engine: str, cddl: CddlChecker) -> None:
    async with running_node(tmp_path, engine, checker=cddl) as node:
        async with await node.client() as client:
            with pytest.raises(UnknownOp):
                await client.request("node.nothing")
            with pytest.raises(InvalidRequest) as info:
                await client.request("node.heartbeat", {"count": "3"})
            assert info.value.details["field"] == "count"
            with pytest.raises(InvalidRequest):
                await client.request("node.health", {"verbose": True})


async def test_request_refuses_a_streaming_op(tmp_path: Path, engine: str,
                                              cddl: CddlChecker) -> None:
    async with running_node(tmp_path, engine, checker=cddl) as node:
        async with await node.client() as client:
            with pytest.raises(TrustChainError, match="use subscribe"):
                await client.request("node.heartbeat", {"interval_ms": 60000})
            assert (await client.request("node.health"))["status"] == "ok"


async def test_event_timeout(tmp_path: Path, engine: str, cddl: CddlChecker) -> None:
    async with running_node(tmp_path, engine, checker=cddl) as node:
        async with await node.client() as client:
            events = client.subscribe("node.heartbeat", {"interval_ms": 60000}, timeout=0.3)
            assert (await events.__anext__()).data["seq"] == 0
            with pytest.raises(Timeout):
                await events.__anext__()
            await events.aclose()
            assert (await client.request("node.health"))["status"] == "ok"
