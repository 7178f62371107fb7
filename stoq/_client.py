"""The STOQ client library.

::

    async with await stoq.connect("::1", 8443, cafile="root.pem") as client:
        health = await client.request("node.health")
        async for event in client.subscribe("node.heartbeat", {"count": 3}):
            print(event.event, event.data)

One QUIC connection carries any number of requests, each on its own stream.
Errors from the server are raised as the :mod:`protocol` exception for their
code (``InvalidRequest``, ``RateLimited`` ...); transport failures raise
:class:`ConnectionFailed` or its subclasses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import itertools
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from protocol import (
    ALPN,
    DEFAULT_MAX_FRAME_SIZE,
    ClientConnection,
    Error,
    ErrorCode,
    Event,
    EventReceived,
    FrameTrace,
    Request,
    ResponseReceived,
    SendData,
    StopSending,
    StoqEvent,
    StreamBroken,
    StreamEnded,
    Timeout,
    TrustChainError,
    error_from_wire,
)

from ._engine import CERT_NONE, CERT_REQUIRED, DEFAULT_ENGINE, Engine, load_engine
from ._sockets import make_ipv6_socket


class ConnectionFailed(TrustChainError):
    """Could not connect to the server, or the connection was lost."""

    code = ErrorCode.UNAVAILABLE


class CertificateMismatch(ConnectionFailed):
    """The server's certificate does not match the pinned fingerprint."""


class SubscriptionOverflow(ConnectionFailed):
    """A subscription's reader fell more than ``max_buffered`` events behind.

    The client cancelled the stream after the last event it had buffered, so
    memory stays bounded; every event before that was delivered. Subscribe
    again from where the reader stopped (:func:`follow_log` does).
    """


class _Waiter:
    __slots__ = ("events", "limit", "overflowed", "wakeup")

    def __init__(self, limit: int | None = None) -> None:
        self.events: list[StoqEvent] = []
        self.wakeup: asyncio.Future[None] | None = None
        self.limit = limit
        self.overflowed = False


def _client_protocol_class(engine: Engine) -> type:
    ev = engine.events
    base: type = engine.QuicConnectionProtocol
    StreamDataReceived = ev.StreamDataReceived

    class ClientProtocol(base):  # type: ignore[misc]
        def __init__(self, quic: Any, stream_handler: Any = None, *,
                     max_frame_size: int, trace: FrameTrace | None) -> None:
            super().__init__(quic, stream_handler)
            self.stoq = ClientConnection(max_frame_size=max_frame_size, trace=trace)
            self.waiters: dict[int, _Waiter] = {}
            self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.terminated: str | None = None
            self.close_code: int | None = None

        def quic_event_received(self, event: Any) -> None:
            if type(event) is StreamDataReceived:
                self._deliver(self.stoq.receive_data(event.stream_id, event.data,
                                                     event.end_stream))
            elif isinstance(event, ev.StreamReset):
                self._deliver(self.stoq.stream_reset(event.stream_id, event.error_code))
            elif isinstance(event, ev.HandshakeCompleted):
                if not self.handshake.done():
                    self.handshake.set_result(None)
            elif isinstance(event, ev.ConnectionTerminated):
                self.terminated = event.reason_phrase or f"error code {event.error_code:#x}"
                self.close_code = event.error_code
                if not self.handshake.done():
                    self.handshake.set_exception(ConnectionFailed(
                        f"handshake failed: {self.terminated}", quic_error=event.error_code))
                for waiter in self.waiters.values():
                    _wake(waiter)

        def _deliver(self, events: list[StoqEvent]) -> None:
            for event in events:
                waiter = self.waiters.get(event.stream_id)
                if waiter is None or waiter.overflowed:
                    continue
                if waiter.limit is not None and len(waiter.events) >= waiter.limit:
                    # the reader is too slow: stop the stream rather than buffer without end
                    waiter.overflowed = True
                    self.stoq.cancel(event.stream_id)
                else:
                    waiter.events.append(event)
                _wake(waiter)
            self.flush()

        def flush(self) -> None:
            for item in self.stoq.data_to_send():
                if type(item) is SendData:
                    self._quic.send_stream_data(item.stream_id, item.data, item.end_stream)
                elif type(item) is StopSending:
                    with contextlib.suppress(Exception):
                        self._quic.stop_stream(item.stream_id, item.error_code)
            self._transmit_soon()

    return ClientProtocol


def _wake(waiter: _Waiter) -> None:
    if waiter.wakeup is not None and not waiter.wakeup.done():
        waiter.wakeup.set_result(None)


_CLIENT_CLASSES: dict[str, type] = {}


class AsyncClient:
    """A connection to a STOQ server. Build it with :func:`connect`."""

    def __init__(self, protocol: Any, transport: asyncio.DatagramTransport, engine: Engine,
                 *, timeout: float, keep_alive_interval: float | None) -> None:
        self._protocol = protocol
        self._transport = transport
        self.engine = engine
        self.timeout = timeout
        self._closed = False
        self._keepalive: asyncio.Task[None] | None = None
        if keep_alive_interval:
            self._keepalive = asyncio.get_running_loop().create_task(
                self._keep_alive(keep_alive_interval))

    @property
    def server_certificate(self) -> bytes | None:
        """DER of the certificate the server presented."""
        return self.engine.peer_certificate_der(self._protocol._quic)

    @property
    def is_connected(self) -> bool:
        return not self._closed and self._protocol.terminated is None

    async def _keep_alive(self, interval: float) -> None:
        counter = itertools.count()
        while self.is_connected:
            await asyncio.sleep(interval)
            if self.is_connected:
                self._protocol._quic.send_ping(next(counter))
                self._protocol.transmit()

    async def _open(self, op: str, args: dict[str, Any] | None, streaming: bool = False,
                    limit: int | None = None) -> tuple[int, _Waiter]:
        protocol = self._protocol
        if protocol.terminated is not None or self._closed:
            raise ConnectionFailed(f"the connection is closed ({protocol.terminated})")
        quic = protocol._quic
        # Respect the server's stream limit: qh3 raises where aioquic queues.
        while True:
            stream_id = quic.get_next_available_stream_id()
            if stream_id // 4 < quic._remote_max_streams_bidi:
                break
            await asyncio.sleep(0.001)
            if protocol.terminated is not None:
                raise ConnectionFailed(f"the connection is closed ({protocol.terminated})")
        waiter = _Waiter(limit)
        protocol.waiters[stream_id] = waiter
        protocol.stoq.send_request(stream_id, Request(op=op, args=args or {}),
                                   streaming=streaming)
        protocol.flush()
        return stream_id, waiter

    async def _next(self, stream_id: int, waiter: _Waiter, deadline: float | None) -> StoqEvent:
        protocol = self._protocol
        loop = asyncio.get_running_loop()
        while not waiter.events:
            if waiter.overflowed:
                raise SubscriptionOverflow(
                    f"the reader fell more than {waiter.limit} events behind; the "
                    "subscription was cancelled after the last buffered event")
            if protocol.terminated is not None:
                raise ConnectionFailed(f"connection lost: {protocol.terminated}",
                                       quic_error=protocol.close_code)
            waiter.wakeup = loop.create_future()
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that arrives as the answer does (Ctrl-C then never stops
                # `trustchain ct watch`); the timeout context manager cannot.
                async with asyncio.timeout_at(deadline):
                    await waiter.wakeup
            except TimeoutError:
                raise Timeout(f"no answer within {self.timeout if deadline else 0:.1f} s"
                              ) from None
            finally:
                waiter.wakeup = None
        return waiter.events.pop(0)

    def _forget(self, stream_id: int, cancel: bool) -> None:
        self._protocol.waiters.pop(stream_id, None)
        if cancel:
            self._protocol.stoq.cancel(stream_id)
            self._protocol.flush()

    async def request(self, op: str, args: dict[str, Any] | None = None, *,
                      timeout: float | None = None) -> dict[str, Any]:
        """Send one request and return its ``ok`` result.

        :raises TrustChainError: the server's error, as its specific subclass.
        :raises Timeout: no answer within ``timeout`` (default: the client's).
        :raises ConnectionFailed: the connection is gone.
        """
        stream_id, waiter = await self._open(op, args)
        deadline = asyncio.get_running_loop().time() + (timeout or self.timeout)
        done = False
        try:
            while True:
                event = await self._next(stream_id, waiter, deadline)
                if type(event) is ResponseReceived:
                    done = True
                    response = event.response
                    if type(response) is Error:
                        raise error_from_wire(response.to_item()["error"])
                    return response.result  # type: ignore[union-attr]
                if type(event) is StreamBroken:
                    done = True
                    raise event.error
                if type(event) is EventReceived:
                    done = True
                    raise TrustChainError(f"{op} is a streaming op: use subscribe()")
        finally:
            self._forget(stream_id, cancel=not done)

    async def subscribe(self, op: str, args: dict[str, Any] | None = None, *,
                        timeout: float | None = None,
                        max_buffered: int | None = 10_000) -> AsyncIterator[Event]:
        """Send a streaming request and yield its events until the server ends it.

        Leaving the loop early cancels the stream on the server. ``timeout``
        bounds the wait for each event (default: none). At most ``max_buffered``
        events wait for the reader (QUIC flow control does not hold the server
        back once the engine has the bytes): beyond that the stream is cancelled
        and, after the buffered events, :class:`SubscriptionOverflow` is raised.
        """
        stream_id, waiter = await self._open(op, args, streaming=True, limit=max_buffered)
        loop = asyncio.get_running_loop()
        finished = False
        try:
            while True:
                deadline = loop.time() + timeout if timeout else None
                event = await self._next(stream_id, waiter, deadline)
                if type(event) is EventReceived:
                    yield event.event
                elif type(event) is ResponseReceived:
                    response = event.response
                    if type(response) is Error:
                        finished = True
                        raise error_from_wire(response.to_item()["error"])
                elif type(event) is StreamEnded:
                    finished = True
                    return
                elif type(event) is StreamBroken:
                    finished = True
                    raise event.error
        finally:
            self._forget(stream_id, cancel=not finished)

    async def close(self) -> None:
        """Close the connection (NO_ERROR) and wait briefly for the close to leave."""
        if self._closed:
            return
        self._closed = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._protocol.terminated is None:
            self._protocol.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._protocol.wait_closed()
        self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


async def connect(host: str, port: int, *, cafile: str | None = None, pin: str | None = None,
                  insecure: bool = False, server_name: str | None = None,
                  certfile: str | None = None, keyfile: str | None = None,
                  engine: str = DEFAULT_ENGINE, alpn: str = ALPN, timeout: float = 10.0,
                  idle_timeout: float = 60.0, keep_alive_interval: float | None = 15.0,
                  max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                  trace: FrameTrace | None = None,
                  local_address: str = "::") -> AsyncClient:
    """Open a STOQ connection to ``[host]:port`` over IPv6.

    Exactly one of ``cafile`` (verify the chain and name), ``pin`` (accept only
    the certificate whose DER has this SHA-256, hex) or ``insecure`` (accept
    anything: development only) chooses how the server is authenticated.
    ``certfile``/``keyfile`` present a client certificate (mutual TLS).
    ``trace(op, item)`` sees every frame received, decoded, before it is used.
    ``local_address`` is the address to send from (default: the system's choice).

    :raises ConnectionFailed: the handshake failed or timed out.
    :raises CertificateMismatch: the server's certificate is not the pinned one.
    :raises ValueError: bad arguments (an IPv4 host, no or several trust modes).
    """
    if sum(bool(x) for x in (cafile, pin, insecure)) != 1:
        raise ValueError("give exactly one of cafile, pin or insecure=True")
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv6 address; TrustChain is IPv6 only") from None
    if address.ipv4_mapped is not None:
        raise ValueError(f"{host!r} is an IPv4-mapped address; TrustChain is IPv6 only")
    quic_engine = load_engine(engine)
    configuration = quic_engine.configuration(
        is_client=True, alpn_protocols=[alpn], idle_timeout=idle_timeout,
        max_data=max(1 << 20, 4 * max_frame_size),
        max_stream_data=max(1 << 20, max_frame_size + 4))
    # Without a name, verify the address itself (an IP address SAN).
    configuration.server_name = server_name or str(address)
    if cafile:
        configuration.verify_mode = CERT_REQUIRED
        configuration.load_verify_locations(cafile)
    else:
        configuration.verify_mode = CERT_NONE
    if certfile:
        configuration.load_cert_chain(certfile, keyfile)
    cls = _CLIENT_CLASSES.get(quic_engine.name)
    if cls is None:
        cls = _CLIENT_CLASSES[quic_engine.name] = _client_protocol_class(quic_engine)
    loop = asyncio.get_running_loop()
    sock = make_ipv6_socket(local_address, 0)
    quic = quic_engine.QuicConnection(configuration=configuration)
    quic_engine.tune(quic)
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: cls(quic, max_frame_size=max_frame_size, trace=trace), sock=sock)
    protocol.connect((str(address), port, 0, 0))
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(protocol.handshake)
    except TimeoutError:
        transport.close()
        raise ConnectionFailed(f"no QUIC handshake with [{host}]:{port} within {timeout} s"
                               ) from None
    except ConnectionFailed:
        transport.close()
        raise
    client = AsyncClient(protocol, transport, quic_engine, timeout=timeout,
                         keep_alive_interval=keep_alive_interval)
    if pin:
        presented = client.server_certificate
        fingerprint = hashlib.sha256(presented or b"").hexdigest()
        if fingerprint != pin.lower().replace(":", ""):
            await client.close()
            raise CertificateMismatch(
                f"server certificate {fingerprint} does not match the pinned {pin}")
    return client
