"""STOQ transport: the QUIC server and client library over :mod:`protocol`.

Engine choice (qh3 or aioquic) is made in one place, :mod:`stoq._engine`.
"""

from ._client import AsyncClient, CertificateMismatch, ConnectionFailed, connect
from ._engine import DEFAULT_ENGINE, ENGINES, load_engine
from ._ratelimit import RateLimiter
from ._renewal import CertificateRenewer, build_csr
from ._server import Server, ServerLimits, certificate_fingerprint
from ._session import Dispatch, Reply
from ._sockets import make_ipv6_socket

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "AsyncClient",
    "CertificateMismatch",
    "CertificateRenewer",
    "ConnectionFailed",
    "Dispatch",
    "RateLimiter",
    "Reply",
    "Server",
    "ServerLimits",
    "build_csr",
    "certificate_fingerprint",
    "connect",
    "load_engine",
    "make_ipv6_socket",
]
