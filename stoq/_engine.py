"""The one place that names a QUIC engine.

qh3 (the default) and aioquic share aioquic's API shape with other import
paths and a few behaviours of their own; :class:`Engine` gives the rest of
``stoq`` one surface over both. Nothing outside this module imports either.
"""

from __future__ import annotations

import importlib
import ssl
from dataclasses import dataclass
from typing import Any

from ._pacing import CoarseTimerPacer

ENGINES = ("qh3", "aioquic")
DEFAULT_ENGINE = "qh3"

# QUIC transport error codes (RFC 9000 §20.1) we send ourselves.
CONNECTION_REFUSED = 0x2
STREAM_LIMIT_ERROR = 0x4


class _CreditLimit:
    """qh3's MAX_STREAMS limit, granting one new stream per finished one.

    qh3 doubles a stream limit once half of it is used, so a peer's number of
    concurrent streams is not bounded. This stand-in for its ``Limit`` ignores
    those writes: the peer may open ``initial`` streams, plus one for each that
    :meth:`Engine.stream_finished` reports (RFC 9000 §4.6). aioquic already
    works this way.
    """

    __slots__ = ("_granted", "frame_type", "name", "sent", "used")

    def __init__(self, frame_type: int, name: str, initial: int) -> None:
        self.frame_type = frame_type
        self.name = name
        self.sent = initial
        self.used = 0
        self._granted = initial

    @property
    def value(self) -> int:
        return self._granted

    @value.setter
    def value(self, _ignored: int) -> None:
        pass

    def grant(self, count: int = 1) -> None:
        self._granted += count


@dataclass(frozen=True)
class Engine:
    """One QUIC implementation, reached through attribute names that do not change."""

    name: str
    version: str
    QuicConfiguration: Any
    QuicConnection: Any
    QuicConnectionProtocol: Any
    QuicServer: Any
    events: Any

    def configuration(self, *, is_client: bool, alpn_protocols: list[str],
                      idle_timeout: float, max_datagram_size: int = 1350,
                      **extra: Any) -> Any:
        return self.QuicConfiguration(is_client=is_client, alpn_protocols=alpn_protocols,
                                      idle_timeout=idle_timeout,
                                      max_datagram_size=max_datagram_size, **extra)

    def limit_streams(self, quic: Any, *, bidi: int, uni: int = 0) -> None:
        """Advertise at most ``bidi`` concurrent peer streams and ``uni`` unidirectional.

        Call before the connection's first datagram is processed: the values go
        into the transport parameters.
        """
        old_bidi, old_uni = quic._local_max_streams_bidi, quic._local_max_streams_uni
        if self.name == "qh3":
            quic._local_max_streams_bidi = _CreditLimit(old_bidi.frame_type, old_bidi.name, bidi)
            quic._local_max_streams_uni = _CreditLimit(old_uni.frame_type, old_uni.name, uni)
        else:
            for limit, value in ((old_bidi, bidi), (old_uni, uni)):
                limit.value = limit.sent = value

    def tune(self, quic: Any) -> None:
        """Settings every connection gets, client or server: a pacer that keeps its
        rate with millisecond timers (see :mod:`stoq._pacing`)."""
        loss = quic._loss
        loss._pacer = CoarseTimerPacer(quic._max_datagram_size)

    def stream_finished(self, quic: Any) -> None:
        """A peer-initiated bidirectional stream is done: let the peer open another."""
        limit = quic._local_max_streams_bidi
        if isinstance(limit, _CreditLimit):
            limit.grant()

    def peer_certificate_der(self, quic: Any) -> bytes | None:
        """DER of the certificate the peer presented, if any."""
        tls = getattr(quic, "tls", None)
        cert = getattr(tls, "_peer_certificate", None)
        if cert is None:
            return None
        if self.name == "qh3":
            return bytes(cert.public_bytes())
        from cryptography.hazmat.primitives.serialization import Encoding
        return bytes(cert.public_bytes(Encoding.DER))

    def peer_address(self, quic: Any) -> tuple[str, int] | None:
        paths = getattr(quic, "_network_paths", None)
        if not paths:
            return None
        addr = paths[0].addr
        return str(addr[0]), int(addr[1])

    def negotiated_alpn(self, quic: Any) -> str | None:
        tls = getattr(quic, "tls", None)
        value = getattr(tls, "alpn_negotiated", None)
        return str(value) if value is not None else None


_LOADED: dict[str, Engine] = {}


def load_engine(name: str = DEFAULT_ENGINE) -> Engine:
    """The engine called ``name`` (``"qh3"`` or ``"aioquic"``).

    :raises ValueError: an unknown name.
    """
    if name not in ENGINES:
        raise ValueError(f"unknown QUIC engine {name!r}; choose one of {', '.join(ENGINES)}")
    engine = _LOADED.get(name)
    if engine is None:
        package = importlib.import_module(name)
        server = importlib.import_module(f"{name}.asyncio.server")
        protocol = importlib.import_module(f"{name}.asyncio.protocol")
        configuration = importlib.import_module(f"{name}.quic.configuration")
        connection = importlib.import_module(f"{name}.quic.connection")
        events = importlib.import_module(f"{name}.quic.events")
        engine = Engine(
            name=name,
            version=str(getattr(package, "__version__", "?")),
            QuicConfiguration=configuration.QuicConfiguration,
            QuicConnection=connection.QuicConnection,
            QuicConnectionProtocol=protocol.QuicConnectionProtocol,
            QuicServer=server.QuicServer,
            events=events,
        )
        _LOADED[name] = engine
    return engine


CERT_NONE = ssl.CERT_NONE
CERT_REQUIRED = ssl.CERT_REQUIRED
CERT_OPTIONAL = ssl.CERT_OPTIONAL
