"""Error codes and the exception tree.

::

    TrustChainError                 every error we raise; carries a wire ``code``
    ├── ProtocolError               the STOQ stream or frame rules were broken
    │   ├── LocalProtocolError      we were about to send something invalid
    │   └── RemoteProtocolError     the peer sent something invalid
    │       ├── MalformedFrame      bytes that are not one well-formed CBOR item
    │       └── FrameTooLarge       a declared frame length above the limit
    └── ServiceError                a well-formed request that a service refused
        ├── InvalidRequest, UnknownOp, NotFound, Unauthorized, RateLimited,
        └── Unavailable, ConsensusRejected, ProofInvalid, Internal, ...

Only the dispatcher turns an exception into an error frame; services raise.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar


class ErrorCode(enum.StrEnum):
    """Stable error codes carried in ``{"error": {"code": ...}}`` frames."""

    MALFORMED = "malformed"
    """The request frame is not a single well-formed CBOR data item."""
    INVALID_REQUEST = "invalid_request"
    """The request is well-formed CBOR but breaks the envelope or an op's schema."""
    UNKNOWN_OP = "unknown_op"
    """The ``op`` names no operation this server offers."""
    TOO_LARGE = "too_large"
    """A frame's declared length is above the server's limit."""
    RATE_LIMITED = "rate_limited"
    """The client sent more requests than its rate allows; see ``retry_after``."""
    UNAUTHORIZED = "unauthorized"
    """The caller did not prove the identity this operation requires."""
    NOT_FOUND = "not_found"
    """The named object does not exist."""
    CONSENSUS_REJECTED = "consensus_rejected"
    """The operation's decision could not be submitted to the validators (this node's
    own check refused it, or its consensus cannot take it now)."""
    PROOF_INVALID = "proof_invalid"
    """One of the four admission proofs failed; ``proof`` names which."""
    UNAVAILABLE = "unavailable"
    """The server cannot take the request now (for example it is shutting down)."""
    TIMEOUT = "timeout"
    """The operation did not finish in its allotted time."""
    INTERNAL = "internal"
    """A bug or an unexpected failure in the server; logged there."""

    @classmethod
    def from_text(cls, text: str) -> ErrorCode:
        """The code for ``text``; raises :class:`ValueError` for an unknown one."""
        return cls(text)


class TrustChainError(Exception):
    """Root of every TrustChain error. The docstring is the default message."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message or (self.__class__.__doc__ or "").strip()
        self.details = details
        super().__init__(self.message)

    def to_wire(self) -> dict[str, Any]:
        """The ``error`` map of an error frame."""
        body: dict[str, Any] = {"code": self.code.value, "message": self.message}
        body.update(self.details)
        return body


class ProtocolError(TrustChainError):
    """The STOQ framing or stream rules were broken."""

    code = ErrorCode.INVALID_REQUEST

    def __init__(self, message: str | None = None, **details: Any) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        super().__init__(message, **details)


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class MalformedFrame(RemoteProtocolError):
    """The frame is not exactly one well-formed CBOR data item."""

    code = ErrorCode.MALFORMED


class FrameTooLarge(RemoteProtocolError):
    """The frame's declared length is above the limit."""

    code = ErrorCode.TOO_LARGE


class ServiceError(TrustChainError):
    """A well-formed request that a service refused."""


class InvalidRequest(ServiceError):
    """The request breaks the envelope or the op's argument schema."""

    code = ErrorCode.INVALID_REQUEST


class UnknownOp(ServiceError):
    """The server offers no such operation."""

    code = ErrorCode.UNKNOWN_OP


class NotFound(ServiceError):
    """No such object."""

    code = ErrorCode.NOT_FOUND


class Unauthorized(ServiceError):
    """The caller did not prove the identity this operation requires."""

    code = ErrorCode.UNAUTHORIZED


class RateLimited(ServiceError):
    """Too many requests; retry after ``retry_after`` seconds."""

    code = ErrorCode.RATE_LIMITED

    def __init__(self, retry_after: float, message: str | None = None) -> None:
        super().__init__(message, retry_after=round(retry_after, 3))
        self.retry_after = retry_after


class ConsensusRejected(ServiceError):
    """The operation's decision could not be submitted to the validators."""

    code = ErrorCode.CONSENSUS_REJECTED


class ProofInvalid(ServiceError):
    """An admission proof failed."""

    code = ErrorCode.PROOF_INVALID


class Unavailable(ServiceError):
    """The server cannot take this request now."""

    code = ErrorCode.UNAVAILABLE


class Timeout(ServiceError):
    """The operation did not finish in time."""

    code = ErrorCode.TIMEOUT


class Internal(ServiceError):
    """Internal server error."""

    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[TrustChainError]] = {
    ErrorCode.MALFORMED: MalformedFrame,
    ErrorCode.TOO_LARGE: FrameTooLarge,
    ErrorCode.INVALID_REQUEST: InvalidRequest,
    ErrorCode.UNKNOWN_OP: UnknownOp,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.CONSENSUS_REJECTED: ConsensusRejected,
    ErrorCode.PROOF_INVALID: ProofInvalid,
    ErrorCode.UNAVAILABLE: Unavailable,
    ErrorCode.TIMEOUT: Timeout,
    ErrorCode.INTERNAL: Internal,
}


def error_from_wire(body: dict[str, Any]) -> TrustChainError:
    """Rebuild the most specific exception for a received ``error`` map.

    Unknown codes (from a newer server) become :class:`ServiceError` with the
    code kept in ``details["code"]``.
    """
    code_text = str(body.get("code", "internal"))
    message = str(body.get("message", ""))
    details = {k: v for k, v in body.items() if k not in ("code", "message")}
    try:
        code = ErrorCode.from_text(code_text)
    except ValueError:
        err = ServiceError(message, **details)
        err.details["code"] = code_text
        return err
    if code is ErrorCode.RATE_LIMITED:
        return RateLimited(float(details.get("retry_after", 1.0)), message)
    cls = _BY_CODE[code]
    return cls(message, **details)
