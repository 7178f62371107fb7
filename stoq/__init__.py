"""STOQ transport: the QUIC server and client library over :mod:`protocol`.

Engine choice (qh3 or aioquic) is made in one place, :mod:`stoq._engine`.
"""

from ._client import (
    AsyncClient,
    CertificateMismatch,
    ConnectionFailed,
    SubscriptionOverflow,
    connect,
)
from ._ct import (
    CertificateProof,
    LogEntry,
    LogFollower,
    LogVerificationError,
    ShardKeys,
    follow_log,
    prove_certificate,
    verify_consistency,
    verify_sth,
)
from ._doq import DoqApplication, DoqLimits, DoqSession, DoqStats
from ._engine import DEFAULT_ENGINE, ENGINES, load_engine
from ._prover import (
    Beacon,
    Credential,
    Prover,
    ProverError,
    create_plot,
    solve_work,
)
from ._ratelimit import RateLimiter
from ._renewal import CertificateRenewer, build_csr
from ._server import Server, ServerLimits, certificate_fingerprint
from ._session import Dispatch, Reply
from ._sockets import make_ipv6_socket

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "AsyncClient",
    "Beacon",
    "CertificateMismatch",
    "CertificateProof",
    "CertificateRenewer",
    "ConnectionFailed",
    "Credential",
    "Dispatch",
    "DoqApplication",
    "DoqLimits",
    "DoqSession",
    "DoqStats",
    "LogEntry",
    "LogFollower",
    "LogVerificationError",
    "Prover",
    "ProverError",
    "RateLimiter",
    "Reply",
    "Server",
    "ServerLimits",
    "ShardKeys",
    "SubscriptionOverflow",
    "build_csr",
    "certificate_fingerprint",
    "connect",
    "create_plot",
    "follow_log",
    "load_engine",
    "make_ipv6_socket",
    "prove_certificate",
    "solve_work",
    "verify_consistency",
    "verify_sth",
]
