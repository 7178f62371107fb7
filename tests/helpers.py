"""Test helpers: real servers on [::1] (in-process or as a process), a raw QUIC
client for bytes no well-behaved client would send, and the CDDL checker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import pycddl

import stoq
from stoq import load_engine
from trustchain import _config as config
from trustchain._app import Node

ROOT = Path(__file__).resolve().parents[1]
CDDL = (ROOT / "spec" / "stoq.cddl").read_text()


class CddlChecker:
    """Validates every frame a client receives against spec/stoq.cddl.

    Each op OP is checked against the rule ``OP.frame``; an op without one may
    only be answered with ``error-response``. Failures are collected, and the
    fixture that owns the checker fails the test if there are any.
    """

    def __init__(self) -> None:
        self._schemas: dict[str, Any] = {}
        self.failures: list[str] = []
        self.checked = 0

    def schema(self, rule: str) -> Any:
        schema = self._schemas.get(rule)
        if schema is None:
            schema = self._schemas[rule] = pycddl.Schema(f"root = {rule}\n{CDDL}")
        return schema

    def rule_for(self, op: str) -> str:
        rule = f"{op}.frame"
        return rule if re.search(rf"^{re.escape(rule)}\s*=", CDDL, re.M) else "error-response"

    def __call__(self, op: str, item: Any) -> None:
        self.checked += 1
        rule = self.rule_for(op)
        try:
            self.schema(rule).validate_cbor(cbor2.dumps(item))
        except Exception as exc:
            self.failures.append(f"{op}: frame {item!r:.200} does not match {rule}: {exc}")


def config_text(engine: str, extra: str = "") -> str:
    """A test configuration: development mode, quiet logs, the given engine."""
    base = f"""
[network]
quic_engine = "{engine}"
connection_timeout = "30s"
keep_alive_interval = "10s"
[logging]
level = "warning"
format = "json"
[consensus]
plot_size = 18
vdf_iterations = 1000
minimum_work_difficulty = 8
"""
    return merge_toml(base, extra)


def merge_toml(base: str, extra: str) -> str:
    """Append ``extra``; keys of a table given in both end up in one table."""
    tables: dict[str, list[str]] = {}
    order: list[str] = []
    for text in (base, extra):
        current = ""
        for line in text.strip().splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("["):
                current = line
                continue
            if current not in tables:
                tables[current] = []
                order.append(current)
            key = line.split("=", 1)[0].strip()
            tables[current] = [x for x in tables[current]
                               if x.split("=", 1)[0].strip() != key] + [line]
    return "\n".join(f"{t}\n" + "\n".join(tables[t]) for t in order) + "\n"


@dataclass
class RunningNode:
    node: Node
    host: str
    port: int
    pin: str
    engine: str
    checker: CddlChecker

    async def client(self, **kwargs: Any) -> stoq.AsyncClient:
        kwargs.setdefault("pin", self.pin)
        kwargs.setdefault("engine", self.engine)
        kwargs.setdefault("trace", self.checker)
        kwargs.setdefault("timeout", 10.0)
        return await stoq.connect(self.host, self.port, **kwargs)


class Requester:
    """A client that sends ``ca.issue`` and ``ca.revoke`` with a real four-proof set.

    The proofs come from ``prover`` (the session's requester key and k=18 plot,
    fixture ``prover``); the key gets its stake from the development faucet on
    first use.
    """

    def __init__(self, client: stoq.AsyncClient, prover: stoq.Prover) -> None:
        self.client = client
        self.prover = prover
        self._staked = False

    async def _stake(self) -> None:
        if not self._staked:
            await self.prover.ensure_stake(self.client)
            self._staked = True

    async def issue(self, csr: bytes, **extra: Any) -> dict[str, Any]:
        await self._stake()
        proofs = await self.prover.for_issue(self.client, csr)
        return await self.client.request("ca.issue", {"csr": csr, "proofs": proofs, **extra})

    async def revoke(self, args: dict[str, Any]) -> dict[str, Any]:
        """``ca.revoke`` with ``args`` (serial, reason, time, signature, ...) and proofs."""
        await self._stake()
        serial = str(args["serial"]).strip().lower().lstrip("0") or "0"
        proofs = await self.prover.for_revoke(self.client, serial,
                                              args.get("reason", "unspecified"), args["time"])
        return await self.client.request("ca.revoke", {**args, "proofs": proofs})


@contextlib.asynccontextmanager
async def running_node(data_dir: Path, engine: str, extra: str = "",
                       checker: CddlChecker | None = None) -> AsyncIterator[RunningNode]:
    """A real node in this process, listening on an ephemeral port of [::1]."""
    cfg = config.loads(config_text(engine, extra))
    node = Node(cfg, data_dir=str(data_dir), listen=[("::1", 0)])
    await node.start()
    assert node.server is not None
    host, port = node.server.addresses[0]
    try:
        yield RunningNode(node=node, host=host, port=port, pin=node.server.fingerprint,
                          engine=engine, checker=checker or CddlChecker())
    finally:
        await node.stop()


@dataclass
class ServerProcess:
    """``trustchain serve`` as a child process; its stdout is collected."""

    proc: subprocess.Popen[str]
    port: int
    pin: str
    lines: list[str] = field(default_factory=list)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def read_rest(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.read()


def start_server_process(tmp: Path, engine: str, extra: str = "",
                         listen: str = "[::1]:0", timeout: float = 30.0,
                         data_dir: Path | None = None) -> ServerProcess:
    """Start ``python -m trustchain serve`` and wait until it announces its port."""
    cfg = tmp / "config.toml"
    cfg.write_text(config_text(engine, extra))
    proc = subprocess.Popen(
        [sys.executable, "-m", "trustchain", "serve", "--config", str(cfg),
         "--data-dir", str(data_dir or tmp / "data"), "--listen", listen],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    port = 0
    pin = ""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"server exited early: {lines} {err}")
        lines.append(line)
        if m := re.match(r"listening on \[(.*)\]:(\d+)", line):
            port = port or int(m.group(2))
        if m := re.match(r"tls certificate sha256 ([0-9a-f]{64})", line):
            pin = m.group(1)
        if line.startswith("data directory"):
            return ServerProcess(proc=proc, port=port, pin=pin, lines=lines)
    proc.kill()
    raise RuntimeError(f"server did not start: {lines}")


class RawConnection:
    """A QUIC connection with ALPN stoq/1 that sends whatever bytes it is told.

    It uses the engine's protocol class directly: no STOQ framing, no checks.
    """

    def __init__(self, engine: str) -> None:
        self.engine = load_engine(engine)
        self.streams: dict[int, bytearray] = {}
        self.ended: dict[int, asyncio.Event] = {}
        self.resets: dict[int, int] = {}
        self.stops: dict[int, int] = {}
        self.terminated: Any = None
        self.protocol: Any = None
        self.transport: Any = None
        self.deaf = False
        """While True, datagrams from the server are dropped (as if lost on the way)."""

    async def connect(self, host: str, port: int, alpn: str = "stoq/1",
                      connection_id_length: int = 8, **settings: Any) -> RawConnection:
        """Connect; ``settings`` are more QuicConfiguration fields (``max_stream_data``)."""
        engine = self.engine
        cfg = engine.configuration(is_client=True, alpn_protocols=[alpn], idle_timeout=30.0,
                                   connection_id_length=connection_id_length, **settings)
        cfg.verify_mode = 0
        cfg.server_name = "localhost"
        owner = self
        loop = asyncio.get_running_loop()
        handshake: asyncio.Future[None] = loop.create_future()
        ev = engine.events

        class Proto(engine.QuicConnectionProtocol):  # type: ignore[misc, name-defined]
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if not owner.deaf:
                    super().datagram_received(data, addr)

            def quic_event_received(self, event: Any) -> None:
                if isinstance(event, ev.StreamDataReceived):
                    owner.streams.setdefault(event.stream_id, bytearray()).extend(event.data)
                    if event.end_stream:
                        owner._ended(event.stream_id).set()
                elif isinstance(event, ev.StreamReset):
                    owner.resets[event.stream_id] = event.error_code
                    owner._ended(event.stream_id).set()
                elif isinstance(event, ev.StopSendingReceived):
                    owner.stops[event.stream_id] = event.error_code
                elif isinstance(event, ev.HandshakeCompleted):
                    if not handshake.done():
                        handshake.set_result(None)
                elif isinstance(event, ev.ConnectionTerminated):
                    owner.terminated = event
                    if not handshake.done():
                        handshake.set_exception(ConnectionError(event.reason_phrase))
                    for waiter in owner.ended.values():
                        waiter.set()

        import socket
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.bind(("::", 0))
        sock.setblocking(False)
        quic = engine.QuicConnection(configuration=cfg)
        self.transport, self.protocol = await loop.create_datagram_endpoint(
            lambda: Proto(quic), sock=sock)
        self.protocol.connect((host, port, 0, 0))
        await asyncio.wait_for(handshake, 10)
        return self

    def _ended(self, stream_id: int) -> asyncio.Event:
        return self.ended.setdefault(stream_id, asyncio.Event())

    def new_stream(self) -> int:
        return int(self.protocol._quic.get_next_available_stream_id())

    def send(self, stream_id: int, data: bytes, end_stream: bool = True) -> None:
        self.protocol._quic.send_stream_data(stream_id, data, end_stream)
        self.protocol.transmit()

    async def response(self, stream_id: int, timeout: float = 5.0) -> bytes:
        """All bytes of the server's side of ``stream_id`` once it ends."""
        await asyncio.wait_for(self._ended(stream_id).wait(), timeout)
        return bytes(self.streams.get(stream_id, b""))

    async def request(self, data: bytes, end_stream: bool = True,
                      timeout: float = 5.0) -> tuple[int, bytes]:
        stream_id = self.new_stream()
        self.send(stream_id, data, end_stream)
        return stream_id, await self.response(stream_id, timeout)

    async def close(self) -> None:
        if self.protocol is not None:
            self.protocol.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.protocol.wait_closed(), 1)
        if self.transport is not None:
            self.transport.close()


def decode_frames(data: bytes) -> list[Any]:
    """Split a server's stream bytes into decoded frames."""
    frames = []
    while data:
        length = int.from_bytes(data[:4], "big")
        frames.append(cbor2.loads(data[4:4 + length]))
        data = data[4 + length:]
    return frames
