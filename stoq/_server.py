"""The QUIC server: IPv6-only sockets, ALPN routing, connection limits, shutdown.

One :class:`Server` listens on any number of ``[address]:port`` pairs. Every
socket speaks every registered ALPN (``stoq/1`` always; ``doq`` when the DNS
service registers it). Connections beyond ``max_connections`` or beyond the
per-address limits (:class:`AddressLimits`), IPv4 or v4-mapped peers, and new
connections while draining are closed with CONNECTION_REFUSED during the
handshake, with the reason in the close's reason phrase.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from protocol import ALPN, DEFAULT_MAX_FRAME_SIZE, STOQ_NO_ERROR, Event, Peer
from protocol.loglimit import LogLimiter

from ._addresses import AddressLimits
from ._engine import CONNECTION_REFUSED, DEFAULT_ENGINE, Engine, load_engine
from ._ratelimit import RateLimiter
from ._session import DEFAULT_REQUEST_TIMEOUT, Dispatch, StoqSession
from ._sockets import make_ipv6_socket

log = logging.getLogger("stoq")
peer_log = LogLimiter(log)
"""Lines a client can trigger at will (refused connections), rate-limited."""

DRAIN_QUIET_PERIOD = 0.2
"""Seconds without new requests after which a draining server closes connections."""



@dataclass(frozen=True, kw_only=True)
class ServerLimits:
    """Resource limits of a server; each maps to a config key (spec/config.md)."""

    max_connections: int = 10_000
    """Concurrent QUIC connections; more are refused. ``network.max_concurrent_connections``."""
    max_connections_per_address: int = 64
    """Concurrent connections from one IPv6 address; 0 is unlimited.
    ``network.max_connections_per_address``."""
    max_connections_per_prefix: int = 256
    """Concurrent connections from one ``connection_prefix_length`` prefix; 0 is unlimited.
    ``network.max_connections_per_prefix``."""
    connection_prefix_length: int = 64
    """Bits of the address that make a prefix. ``network.connection_prefix_length``."""
    max_handshakes_per_second: float = 100.0
    """New connections a second from one address (one second's burst); 0 is unlimited.
    ``network.max_handshakes_per_second``."""
    idle_timeout: float = 30.0
    """Seconds without packets before a connection is dropped. ``network.connection_timeout``."""
    keep_alive_interval: float = 15.0
    """Seconds between server PINGs on connections with an open streaming op;
    0 disables. ``network.keep_alive_interval``."""
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    """Largest request frame payload in bytes. ``network.max_frame_size``."""
    max_streams_per_connection: int = 100
    """Concurrent request streams a client may open on one connection.
    ``network.max_streams_per_connection``."""
    rate_limit_per_minute: int = 0
    """Requests a minute per client prefix; 0 is unlimited. ``api.rate_limit_per_minute``."""
    rate_limit_prefix_length: int = 64
    """Bits of the client's IPv6 address that identify it for rate limiting."""
    drain_timeout: float = 10.0
    """Seconds a graceful shutdown waits for in-flight requests."""
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    """Seconds a request may take to arrive whole after its first byte; then it is
    refused with ``timeout`` and its buffer released. ``network.request_timeout``."""


class Session(Protocol):
    """One ALPN application on one connection."""

    @property
    def in_flight(self) -> int: ...
    @property
    def buffered(self) -> int: ...
    @property
    def unsent(self) -> int: ...
    expired: int
    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None: ...
    def stream_reset(self, stream_id: int) -> None: ...
    def connection_lost(self) -> None: ...
    def end_streams(self, event: Event) -> None: ...


SessionFactory = Callable[[Any], Session]
"""Builds the application session for a connection (given its transport handle)."""


def certificate_fingerprint(certfile: str) -> str:
    """Lowercase hex SHA-256 of the DER of the first certificate in ``certfile``."""
    with open(certfile, "rb") as f:
        cert = x509.load_pem_x509_certificates(f.read())[0]
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


class Server:
    """A STOQ server on one or more IPv6 sockets."""

    def __init__(self, *, dispatch: Dispatch, certfile: str, keyfile: str,
                 engine: str = DEFAULT_ENGINE, limits: ServerLimits | None = None) -> None:
        self.engine: Engine = load_engine(engine)
        self.limits = limits or ServerLimits()
        self.certfile = certfile
        self.keyfile = keyfile
        self._dispatch = dispatch
        self._rate_limiter = (RateLimiter(self.limits.rate_limit_per_minute,
                                          self.limits.rate_limit_prefix_length)
                              if self.limits.rate_limit_per_minute else None)
        self._address_limits = AddressLimits(
            per_address=self.limits.max_connections_per_address,
            per_prefix=self.limits.max_connections_per_prefix,
            prefix_length=self.limits.connection_prefix_length,
            handshakes_per_second=self.limits.max_handshakes_per_second)
        self._applications: dict[str, SessionFactory] = {ALPN: self._stoq_session}
        self._coalescing = {ALPN}
        """ALPNs whose connections send once per round of received datagrams."""
        self._endpoints: list[tuple[asyncio.DatagramTransport, Any]] = []
        self._connections: set[Any] = set()
        self._configuration: Any = None
        self._draining = False
        self._last_refusal = 0.0
        self._keepalive_task: asyncio.Task[None] | None = None
        self.fingerprint = ""
        self.addresses: list[tuple[str, int]] = []
        self.refused_connections = 0
        self.expired_requests = 0
        """Requests of closed connections refused because they did not arrive in time."""

    # --- set-up ---------------------------------------------------------------

    def add_application(self, alpn: str, factory: SessionFactory) -> None:
        """Serve ``alpn`` on the same sockets; ``factory`` builds its per-connection session.

        Its connections transmit after each datagram. Only ``stoq/1`` coalesces the
        answers to a round of datagrams into shared packets: packets filled to the brim
        split the last answer across two, and dnspython's asyncio DoQ client (2.9) then
        loses a query now and again (its reader misses the wake-up for the second half,
        see bench/README.md), so ``doq`` keeps an answer whole within its datagram's
        packets as far as QUIC allows.
        """
        if self._endpoints:
            raise RuntimeError("register applications before start()")
        self._applications[alpn] = factory

    @property
    def alpns(self) -> list[str]:
        return list(self._applications)

    def _stoq_session(self, streams: Any) -> StoqSession:
        return StoqSession(streams, self._dispatch, max_frame_size=self.limits.max_frame_size,
                           rate_limiter=self._rate_limiter, draining=self._refusing_requests,
                           request_timeout=self.limits.request_timeout)

    def _refusing_requests(self) -> bool:
        """Called for every new request: True while draining (and noted, so that
        shutdown waits until late requests stop arriving)."""
        if self._draining:
            self._last_refusal = asyncio.get_running_loop().time()
        return self._draining

    def _load_configuration(self) -> Any:
        configuration = self.engine.configuration(
            is_client=False, alpn_protocols=self.alpns, idle_timeout=self.limits.idle_timeout,
            max_data=max(1 << 20, 4 * self.limits.max_frame_size),
            max_stream_data=max(1 << 20, self.limits.max_frame_size + 4))
        configuration.load_cert_chain(self.certfile, self.keyfile)
        return configuration

    async def start(self, listen: list[tuple[str, int]]) -> None:
        """Bind every ``(host, port)`` and start serving.

        :raises OSError: a socket could not be bound.
        :raises ValueError: an address is not IPv6.
        """
        loop = asyncio.get_running_loop()
        self._configuration = self._load_configuration()
        self.fingerprint = certificate_fingerprint(self.certfile)
        protocol_class = _protocol_class(self.engine)
        create_protocol = functools.partial(protocol_class, server=self)
        for host, port in listen:
            sock = make_ipv6_socket(host, port)
            server_class = self.engine.QuicServer
            configuration = self._configuration

            def factory(cls: Any = server_class, cfg: Any = configuration) -> Any:
                return cls(configuration=cfg, create_protocol=create_protocol)

            transport, quic_server = await loop.create_datagram_endpoint(factory, sock=sock)
            self._endpoints.append((transport, quic_server))
            bound = sock.getsockname()
            self.addresses.append((bound[0], bound[1]))
        if self.limits.keep_alive_interval > 0:
            self._keepalive_task = loop.create_task(self._keep_alive())

    def reload_certificate(self) -> str:
        """Re-read the certificate and key; new connections use them at once.

        Existing connections keep the certificate they were set up with.
        :returns: the new certificate's SHA-256 fingerprint.
        """
        configuration = self._load_configuration()
        self._configuration = configuration
        for _, quic_server in self._endpoints:
            quic_server._configuration = configuration
        self.fingerprint = certificate_fingerprint(self.certfile)
        log.info("TLS certificate reloaded", extra={"fingerprint": self.fingerprint})
        return self.fingerprint

    # --- connections ------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def connections_from(self, address: str) -> int:
        """Connections the per-address limits count for ``address`` now."""
        return self._address_limits.connections_from(address)

    @property
    def draining(self) -> bool:
        return self._draining

    def _admit(self, protocol: Any) -> str | None:
        """Why a new connection must be refused, or None to accept it."""
        if self._draining:
            return "server shutting down"
        if len(self._connections) >= self.limits.max_connections:
            return "too many connections"
        return None

    async def _keep_alive(self) -> None:
        counter = itertools.count()
        while True:
            await asyncio.sleep(self.limits.keep_alive_interval)
            for protocol in list(self._connections):
                session = protocol.session
                if session is not None and session.in_flight:
                    protocol._quic.send_ping(next(counter))
                    protocol.transmit()

    def stats(self) -> dict[str, Any]:
        return {
            "connections": len(self._connections),
            "refused_connections": self.refused_connections,
            "refused_by_address_limits": self._address_limits.refused,
            "client_addresses": len(self._address_limits),
            "in_flight": sum(p.session.in_flight for p in self._connections
                             if p.session is not None),
            "rate_limited_clients": len(self._rate_limiter) if self._rate_limiter else 0,
            "buffered_request_bytes": sum(p.session.buffered for p in self._connections
                                          if p.session is not None),
            "unsent_response_bytes": sum(p.session.unsent for p in self._connections
                                         if p.session is not None),
            "expired_requests": self.expired_requests + sum(
                p.session.expired for p in self._connections if p.session is not None),
        }

    # --- shutdown ---------------------------------------------------------------

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, end streaming ops, let in-flight requests finish, close.

        New connections and new requests are refused from the first moment.
        Streaming ops get an ``end`` event with reason ``shutdown``. After
        ``timeout`` seconds (``drain_timeout`` by default), what is still
        running is cut off.
        """
        if self._draining:
            return
        self._draining = True
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        end = Event(event="end", data={"reason": "shutdown"})
        for protocol in list(self._connections):
            if protocol.session is not None:
                protocol.session.end_streams(end)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.limits.drain_timeout if timeout is None else timeout)
        self._last_refusal = loop.time()
        # Wait for in-flight requests, and until requests sent before the client
        # saw our refusals stop arriving (each gets an explicit `unavailable`).
        while loop.time() < deadline and (
                any(p.session is not None and p.session.in_flight for p in self._connections)
                or loop.time() - self._last_refusal < DRAIN_QUIET_PERIOD):
            await asyncio.sleep(0.01)
        for protocol in list(self._connections):
            protocol.close_with(STOQ_NO_ERROR, "server shutting down")
        await asyncio.sleep(0.02)
        for transport, _ in self._endpoints:
            transport.close()
        self._endpoints.clear()


_PROTOCOL_CLASSES: dict[str, type] = {}


def _protocol_class(engine: Engine) -> type:
    """The connection protocol class for ``engine``, built once per engine."""
    cls = _PROTOCOL_CLASSES.get(engine.name)
    if cls is not None:
        return cls
    ev = engine.events
    StreamDataReceived = ev.StreamDataReceived
    base: type = engine.QuicConnectionProtocol

    class ServerProtocol(base):  # type: ignore[misc]
        """One QUIC connection: routes its streams to the session of its ALPN."""

        def __init__(self, quic: Any, stream_handler: Any = None, *, server: Server) -> None:
            super().__init__(quic, stream_handler)
            self.server = server
            self.session: Session | None = None
            self.peer = Peer(address="", port=0, alpn="")
            self._refusal = server._admit(self)
            self._loop = asyncio.get_running_loop()
            engine.limit_streams(quic, bidi=server.limits.max_streams_per_connection, uni=0)
            engine.tune(quic)
            self._receiving = False
            self._coalescing = False
            """Set for the ALPNs in ``server._coalescing`` once the session starts."""
            self._address_key: tuple[int, int] | None = None
            server._connections.add(self)

        def datagram_received(self, data: bytes, addr: Any) -> None:
            # Answers are written while the datagram's events are processed. On a
            # coalescing connection they go out in one transmit after every datagram
            # the loop read in this round (call_soon runs after the round's reads), so
            # that answers to several datagrams share packets; else after this one.
            self._receiving = True
            try:
                self._quic.receive_datagram(data, addr, now=self._loop.time())
                self._process_events()
            finally:
                self._receiving = False
            if self._coalescing:
                self._transmit_soon()
            else:
                self.transmit()

        # What sessions use of their connection (_session.StoqStreams, _doq.DoqStreams).
        def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
            try:
                self._quic.send_stream_data(stream_id, data, end_stream)
            except (AssertionError, ValueError) as exc:
                # The engine already finished or reset this stream's sending side (a
                # late duplicate FIN on a stream we answered reopens it in STOQ's eyes):
                # nothing can be written there any more, and nobody waits for it.
                log.debug("write to a finished stream dropped",
                          extra={"stream": stream_id, "error": str(exc)})

        def stop_stream(self, stream_id: int, error_code: int) -> None:
            with contextlib.suppress(Exception):
                self._quic.stop_stream(stream_id, error_code)

        def reset_stream(self, stream_id: int, error_code: int) -> None:
            with contextlib.suppress(Exception):
                self._quic.reset_stream(stream_id, error_code)

        def stream_finished(self) -> None:
            engine.stream_finished(self._quic)

        def stream_sent_offset(self, stream_id: int) -> int | None:
            stream = self._quic._streams.get(stream_id)
            return int(stream.sender.highest_offset) if stream is not None else None

        def stream_send_credit(self, stream_id: int) -> int | None:
            quic = self._quic
            stream = quic._streams.get(stream_id)
            if stream is None:
                return None
            return max(0, min(
                int(stream.max_stream_data_remote) - int(stream.sender.highest_offset),
                int(quic._remote_max_data) - int(quic._remote_max_data_used)))

        def transmit_soon(self) -> None:
            if not self._receiving:
                self._transmit_soon()

        def now(self) -> float:
            return float(self._loop.time())

        def close_with(self, error_code: int, reason: str) -> None:
            self._quic.close(error_code=error_code, reason_phrase=reason)
            self.transmit()

        def quic_event_received(self, event: Any) -> None:
            if type(event) is StreamDataReceived:
                session = self.session
                if session is not None:
                    session.stream_data(event.stream_id, event.data, event.end_stream)
                return
            if isinstance(event, (ev.StreamReset, ev.StopSendingReceived)):
                if self.session is not None:
                    self.session.stream_reset(event.stream_id)
            elif isinstance(event, ev.ProtocolNegotiated):
                self._negotiated(event.alpn_protocol)
            elif isinstance(event, ev.HandshakeCompleted):
                if self.session is None and self._refusal is None:
                    self._start_session()
            elif isinstance(event, ev.ConnectionTerminated):
                self.server._connections.discard(self)
                if self._address_key is not None:
                    self.server._address_limits.release(self._address_key)
                    self._address_key = None
                if self.session is not None:
                    self.server.expired_requests += self.session.expired
                    self.session.connection_lost()

        def _negotiated(self, alpn: str | None) -> None:
            address = engine.peer_address(self._quic)
            if self._refusal is None and address is not None:
                ip = ipaddress.ip_address(address[0].split("%", 1)[0])
                if not isinstance(ip, ipaddress.IPv6Address) or ip.ipv4_mapped is not None:
                    self._refusal = "IPv4 peers are not served"
                else:
                    admitted = self.server._address_limits.admit(str(ip), self._loop.time())
                    if isinstance(admitted, str):
                        self._refusal = admitted
                    else:
                        self._address_key = admitted
            if self._refusal is not None:
                self.server.refused_connections += 1
                peer_log.info("connection refused", extra={"reason": self._refusal,
                                                           "peer": address})
                self.server._connections.discard(self)
                # A transport-level close (frame_type given): during the handshake
                # an application close would reach the peer as APPLICATION_ERROR.
                self._quic.close(error_code=CONNECTION_REFUSED, frame_type=0,
                                 reason_phrase=self._refusal)
                return
            self.peer = Peer(address=address[0] if address else "",
                             port=address[1] if address else 0, alpn=alpn or "")

        def _start_session(self) -> None:
            factory = self.server._applications.get(self.peer.alpn)
            if factory is None:  # the TLS layer only negotiates ALPNs we offered
                self.close_with(CONNECTION_REFUSED, "no application for this ALPN")
                return
            self.peer = Peer(address=self.peer.address, port=self.peer.port, alpn=self.peer.alpn,
                             certificate=engine.peer_certificate_der(self._quic))
            self.session = factory(self)
            self._coalescing = self.peer.alpn in self.server._coalescing

    _PROTOCOL_CLASSES[engine.name] = ServerProtocol
    return ServerProtocol
