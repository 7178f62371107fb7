"""Connection limits, idle timeout and keep-alive, IPv6 only, ALPN, trust."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

import stoq
from trustchain import _config as config
from trustchain._app import Node

from ..helpers import CddlChecker, config_text, running_node

CONNECTION_REFUSED = 0x2


async def test_max_connections(tmp_path: Path, engine: str, cddl: CddlChecker) -> None:
    extra = "[network]\nmax_concurrent_connections = 2"
    async with running_node(tmp_path, engine, extra, checker=cddl) as node:
        first = await node.client()
        second = await node.client()
        with pytest.raises(stoq.ConnectionFailed) as info:
            await node.client(timeout=5)
        assert info.value.details.get("quic_error") == CONNECTION_REFUSED
        assert (await first.request("node.health"))["status"] == "ok"
        await first.close()
        for _ in range(100):  # the server notices the close
            assert node.node.server is not None
            if node.node.server.connection_count < 2:
                break
            await asyncio.sleep(0.02)
        third = await node.client()
        assert (await third.request("node.info"))["stats"]["refused_connections"] == 1
        await second.close()
        await third.close()


async def test_idle_timeout_and_client_keep_alive(tmp_path: Path, engine: str,
                                                  cddl: CddlChecker) -> None:
    extra = "[network]\nconnection_timeout = \"1s\"\nkeep_alive_interval = \"0\""
    async with running_node(tmp_path, engine, extra, checker=cddl) as node:
        idle = await node.client(keep_alive_interval=None)
        kept = await node.client(keep_alive_interval=0.3)
        await asyncio.sleep(2.5)
        assert not idle.is_connected
        with pytest.raises(stoq.ConnectionFailed):
            await idle.request("node.health")
        assert kept.is_connected
        assert (await kept.request("node.health"))["status"] == "ok"
        await idle.close()
        await kept.close()


@pytest.mark.parametrize("server_keep_alive", [True, False])
async def test_server_keep_alive_holds_subscriptions(tmp_path: Path, engine: str,
                                                     cddl: CddlChecker,
                                                     server_keep_alive: bool) -> None:
    interval = "0.3s" if server_keep_alive else "0"
    extra = f"[network]\nconnection_timeout = \"1s\"\nkeep_alive_interval = \"{interval}\""
    async with running_node(tmp_path, engine, extra, checker=cddl) as node:
        client = await node.client(keep_alive_interval=None)
        events = client.subscribe("node.heartbeat", {"interval_ms": 60000})
        await events.__anext__()
        await asyncio.sleep(2.5)
        assert client.is_connected is server_keep_alive
        await events.aclose()
        await client.close()


async def test_ipv4_gets_no_answer(tmp_path: Path, engine: str) -> None:
    cfg = config.loads(config_text(engine))
    node = Node(cfg, data_dir=str(tmp_path), listen=[("::", 0)])
    await node.start()
    assert node.server is not None
    port = node.server.addresses[0][1]
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(1.0)
        initial = b"\xc0\x00\x00\x00\x01\x08" + b"\x01" * 8 + b"\x00" + b"\x00" * 1185
        loop = asyncio.get_running_loop()

        def probe() -> bytes | None:
            try:
                sock.sendto(initial, ("127.0.0.1", port))
                return sock.recvfrom(2048)[0]
            except (TimeoutError, ConnectionRefusedError):
                return None
            finally:
                sock.close()

        assert await loop.run_in_executor(None, probe) is None
        # ... while IPv6 on the same port is served
        client = await stoq.connect("::1", port, pin=node.server.fingerprint, engine=engine)
        assert (await client.request("node.health"))["status"] == "ok"
        await client.close()
    finally:
        await node.stop()


async def test_client_refuses_ipv4_hosts() -> None:
    for host in ("127.0.0.1", "::ffff:127.0.0.1", "localhost"):
        with pytest.raises(ValueError, match="IPv6"):
            await stoq.connect(host, 1, insecure=True)


ALPN_MISMATCH_ALERT = {"qh3": 0x128, "aioquic": 0x178}
"""The CRYPTO_ERROR a node closes with when the client offers no ALPN it serves: qh3
sends handshake_failure, aioquic no_application_protocol (spec §2.2)."""


async def test_wrong_alpn_fails_the_handshake(tmp_path: Path, engine: str) -> None:
    async with running_node(tmp_path, engine) as node:
        for client_engine in ("qh3", "aioquic"):
            with pytest.raises(stoq.ConnectionFailed) as failed:
                await node.client(alpn="h3", timeout=5, engine=client_engine)
            assert failed.value.details["quic_error"] == ALPN_MISMATCH_ALERT[engine]
            assert "No common ALPN protocols" in failed.value.message


async def test_pinning(tmp_path: Path, engine: str, cddl: CddlChecker) -> None:
    async with running_node(tmp_path, engine, checker=cddl) as node:
        with pytest.raises(stoq.CertificateMismatch):
            await node.client(pin="00" * 32)
        upper = ":".join(node.pin[i:i + 2] for i in range(0, 64, 2)).upper()
        async with await node.client(pin=upper) as client:
            assert (await client.request("node.health"))["status"] == "ok"


async def test_cafile_verification(tmp_path: Path, engine: str, cddl: CddlChecker) -> None:
    async with running_node(tmp_path, engine, checker=cddl) as node:
        root = tmp_path / "root.pem"
        # by default the client checks the address it dialled against the IP SAN
        async with await node.client(pin=None, cafile=str(root)) as client:
            assert (await client.request("node.health"))["status"] == "ok"
        with pytest.raises(stoq.ConnectionFailed):
            await node.client(pin=None, cafile=str(root), server_name="wrong.trust", timeout=5)
        leaf = tmp_path / "tls" / "server.pem"  # a leaf anchors nothing
        with pytest.raises(stoq.ConnectionFailed):
            await node.client(pin=None, cafile=str(leaf), timeout=5)


async def test_trust_options_are_exclusive() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        await stoq.connect("::1", 1)
    with pytest.raises(ValueError, match="exactly one"):
        await stoq.connect("::1", 1, insecure=True, pin="00")
