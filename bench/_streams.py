"""The QUIC connection that every benchmark client and the bare echo server drive by hand.

The load generators and the echo server sit on the engine's own
``QuicConnectionProtocol``, not on ``stoq``: they must cost less per request
than the server they measure. All of them carry one message each way on a
stream, ended by FIN, so one class serves them all: it gathers a stream's data
until its FIN, then answers it (a server: ``answer``) or hands it to the load
run that sent the request (a client: ``load``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import protocol
import stoq

if TYPE_CHECKING:
    from stoq._engine import Engine

# Flow-control windows: what stoq.Server and stoq.connect use with the default
# network.max_frame_size, so the bare echo server and the lean clients move data
# under the same limits as STOQ does.
MAX_FRAME_SIZE = protocol.DEFAULT_MAX_FRAME_SIZE
MAX_STREAM_DATA = max(1 << 20, MAX_FRAME_SIZE + 4)
MAX_DATA = max(1 << 20, 4 * MAX_FRAME_SIZE)

HANDSHAKE_TIMEOUT = 15.0
"""Seconds a client waits for the handshake (under uvloop, not `wait_connected()`)."""


class Load(Protocol):
    """The load run a client connection sends requests for."""

    def answered(self, connection: Any, tag: Any, data: bytes | None) -> None:
        """The answer to the request sent with ``tag``; None: its stream was reset."""

    def error(self, message: str) -> None: ...

    def finished_one(self) -> None:
        """One request is over without an answer (the connection is gone)."""


Answer = Callable[[Any, bytes], bytes]
"""A server's answer on ``connection`` to one whole request: ``answer(connection, request)``."""


_CLASSES: dict[str, type] = {}


def stream_protocol_class(engine: Engine) -> type:
    """The connection class on ``engine``'s ``QuicConnectionProtocol``.

    Built once per engine: the base class and the event classes are the engine's.
    """
    known = _CLASSES.get(engine.name)
    if known is not None:
        return known
    ev = engine.events
    StreamDataReceived = ev.StreamDataReceived
    base: type = engine.QuicConnectionProtocol

    class StreamProtocol(base):  # type: ignore[misc]
        """One connection: each stream carries one request and its answer.

        :param load: a client's load run; :meth:`send` a request, its answer goes to
            ``load.answered`` with the tag it was sent with.
        :param answer: a server's answer to each request stream, sent back with FIN
            once the request's FIN has arrived.
        """

        def __init__(self, quic: Any, stream_handler: Any = None, *,
                     load: Load | None = None, answer: Answer | None = None) -> None:
            super().__init__(quic, stream_handler)
            self.load = load
            self.answer = answer
            self.alpn = ""
            self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            """Done when the handshake completes, or when the connection ends first
            (then ``terminated`` says why)."""
            self.terminated = ""
            self.parts: dict[int, list[bytes]] = {}
            self.pending: dict[int, Any] = {}
            """The tag of the request on each stream still waiting for its answer."""
            self.blocked: deque[tuple[bytes, Any]] = deque()

        def send(self, frame: bytes, tag: Any) -> None:
            """Send ``frame`` as one request on a new stream; ``tag`` (not None) comes back
            with its answer."""
            quic = self._quic
            stream_id = quic.get_next_available_stream_id()
            try:
                quic.send_stream_data(stream_id, frame, True)
            except ValueError:
                # qh3 2.x: the server's stream limit is used up (aioquic and qh3
                # 1.x queue instead). Retry after the next datagram.
                self.blocked.append((frame, tag))
                return
            self.pending[stream_id] = tag

        def datagram_received(self, data: bytes, addr: Any) -> None:
            super().datagram_received(data, addr)
            if self.blocked:
                blocked, self.blocked = self.blocked, deque()
                for frame, tag in blocked:
                    self.send(frame, tag)
                self.transmit()

        def quic_event_received(self, event: Any) -> None:
            if type(event) is StreamDataReceived:
                stream_id = event.stream_id
                if not event.end_stream:
                    self.parts.setdefault(stream_id, []).append(event.data)
                    return
                parts = self.parts.pop(stream_id, None)
                if parts is None:
                    data = event.data
                else:
                    parts.append(event.data)
                    data = b"".join(parts)
                if self.answer is not None:
                    self._quic.send_stream_data(stream_id, self.answer(self, data), True)
                    engine.stream_finished(self._quic)
                else:
                    self._answered(stream_id, data)
            elif isinstance(event, ev.StreamReset):
                self.parts.pop(event.stream_id, None)
                if self.load is not None:
                    self.load.error(f"stream {event.stream_id} reset, "
                                    f"code {event.error_code:#x}")
                    self._answered(event.stream_id, None)
            elif isinstance(event, ev.ProtocolNegotiated):
                self.alpn = event.alpn_protocol or ""
            elif isinstance(event, ev.HandshakeCompleted):
                if not self.handshake.done():
                    self.handshake.set_result(None)
            elif isinstance(event, ev.ConnectionTerminated):
                self.terminated = event.reason_phrase or f"error code {event.error_code:#x}"
                if not self.handshake.done():
                    self.handshake.set_result(None)
                self.abandon(f"connection closed: {self.terminated}")

        def _answered(self, stream_id: int, data: bytes | None) -> None:
            tag = self.pending.pop(stream_id, None)
            if tag is not None and self.load is not None:
                self.load.answered(self, tag, data)

        def abandon(self, why: str) -> None:
            """Count every request still waiting for an answer as failed."""
            lost = len(self.pending) + len(self.blocked)
            self.pending.clear()
            self.blocked.clear()
            if self.load is None or not lost:
                return
            self.load.error(f"{lost} requests without an answer: {why}")
            for _ in range(lost):
                self.load.finished_one()

    _CLASSES[engine.name] = StreamProtocol
    return StreamProtocol


async def open_client(engine: Engine, load: Load, *, host: str, port: int,
                      alpn: str = protocol.ALPN, pin: str = "", cafile: str = "",
                      tune: bool = True) -> Any:
    """One client connection (:func:`stream_protocol_class`) for ``load`` to
    ``[host]:port``, its handshake done.

    The server is trusted by the SHA-256 ``pin`` of its certificate, or by a chain to
    ``cafile`` (a cluster node's CA-issued certificate, for the name ``host``).
    ``tune`` gives the connection stoq.connect's transport settings (the pacer).
    """
    configuration = engine.configuration(is_client=True, alpn_protocols=[alpn],
                                         idle_timeout=60.0, max_data=MAX_DATA,
                                         max_stream_data=MAX_STREAM_DATA)
    if cafile:
        configuration.server_name = host
        configuration.verify_mode = ssl.CERT_REQUIRED
        configuration.load_verify_locations(cafile)
    else:
        configuration.server_name = "localhost"
        configuration.verify_mode = ssl.CERT_NONE  # trust is the pin, checked below
    quic = engine.QuicConnection(configuration=configuration)
    if tune:
        engine.tune(quic)
    loop = asyncio.get_running_loop()
    sock = stoq.make_ipv6_socket(host, 0)
    cls = stream_protocol_class(engine)
    transport, proto = await loop.create_datagram_endpoint(lambda: cls(quic, load=load),
                                                           sock=sock)
    try:
        proto.connect((host, port, 0, 0))
        # Not wait_connected(): under uvloop it can miss a handshake that is already done.
        await asyncio.wait_for(asyncio.shield(proto.handshake), HANDSHAKE_TIMEOUT)
        if proto.terminated:
            raise ConnectionError(proto.terminated)
        if not cafile:
            presented = engine.peer_certificate_der(quic) or b""
            if hashlib.sha256(presented).hexdigest() != pin:
                raise ConnectionError("the server's certificate does not match the pin")
    except BaseException:
        transport.close()
        raise
    return proto


async def close_clients(connections: list[Any]) -> None:
    """Close client connections: politely for up to 2 s, then their sockets."""
    for proto in connections:
        proto.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(*(p.wait_closed() for p in connections)), 2.0)
    for proto in connections:
        if proto._transport is not None:
            proto._transport.close()
