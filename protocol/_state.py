"""Stream states of STOQ, written as data.

Everything that moves a stream from one state to another is in these tables;
:mod:`protocol._connection` only looks them up. A send that has no entry raises
:class:`LocalProtocolError`; a received frame that has none is the peer's
fault (:class:`RemoteProtocolError`).
"""

from __future__ import annotations

import enum


class StreamState(enum.Enum):
    __hash__ = object.__hash__
    """Members are singletons: hashing by identity keeps the transition lookups (done for
    every request) in C; ``enum.Enum`` hashes by name in Python."""

    RECEIVING = "receiving"
    """Server: reading the request frame."""
    RECEIVED = "received"
    """Server: the request frame is complete; waiting for the client's FIN."""
    HANDLING = "handling"
    """Server: dispatched; nothing sent yet. Client: request sent, awaiting a reply."""
    STREAMING = "streaming"
    """At least one event has been sent (server) or received (client)."""
    RESPONDED = "responded"
    """Client: a final ``ok`` or ``error`` arrived; only the FIN may follow."""
    CLOSED = "closed"
    """Nothing more may be sent or received."""


class Send(enum.Enum):
    """What a server writes on a request stream."""

    __hash__ = object.__hash__

    OK = "ok"
    ERROR = "error"
    EVENT = "event"
    END = "end"


class Receive(enum.Enum):
    """What a client reads on a request stream."""

    __hash__ = object.__hash__

    OK = "ok"
    ERROR = "error"
    EVENT = "event"
    FIN = "fin"


S = StreamState

SERVER_SEND_TRANSITIONS: dict[tuple[StreamState, Send], StreamState] = {
    (S.HANDLING, Send.OK): S.CLOSED,
    (S.HANDLING, Send.ERROR): S.CLOSED,
    (S.HANDLING, Send.EVENT): S.STREAMING,
    (S.STREAMING, Send.EVENT): S.STREAMING,
    (S.STREAMING, Send.ERROR): S.CLOSED,
    (S.STREAMING, Send.END): S.CLOSED,
    (S.HANDLING, Send.END): S.CLOSED,  # a streaming op with nothing to send
    # The server may refuse a request before it is complete (too large, rate
    # limited, shutting down): an error frame, FIN, and STOP_SENDING.
    (S.RECEIVING, Send.ERROR): S.CLOSED,
    (S.RECEIVED, Send.ERROR): S.CLOSED,
}

CLIENT_RECEIVE_TRANSITIONS: dict[tuple[StreamState, Receive], StreamState] = {
    (S.HANDLING, Receive.OK): S.RESPONDED,
    (S.HANDLING, Receive.ERROR): S.RESPONDED,
    (S.HANDLING, Receive.EVENT): S.STREAMING,
    (S.STREAMING, Receive.EVENT): S.STREAMING,
    (S.STREAMING, Receive.ERROR): S.RESPONDED,
    (S.STREAMING, Receive.FIN): S.CLOSED,
    (S.RESPONDED, Receive.FIN): S.CLOSED,
}

CLIENT_STREAMING_RECEIVE_TRANSITIONS: dict[tuple[StreamState, Receive], StreamState] = {
    **CLIENT_RECEIVE_TRANSITIONS,
    (S.HANDLING, Receive.FIN): S.CLOSED,  # a subscription that ended with no events
}
