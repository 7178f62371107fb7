"""STOQ over a set of QUIC streams, without I/O.

The caller (the transport in ``stoq/``) feeds what QUIC delivered —
``receive_data(stream_id, data, end_stream)`` and ``stream_reset(stream_id)`` —
and gets events back. What the connection wants written comes out of
:meth:`data_to_send` as :class:`SendData`, :class:`StopSending` and
:class:`ResetStream` instructions. There is no clock, socket or event loop here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._cbor import decode_item, encode_item
from ._errors import (
    FrameTooLarge,
    LocalProtocolError,
    RemoteProtocolError,
    Timeout,
    TrustChainError,
)
from ._frames import DEFAULT_MAX_FRAME_SIZE, HEADER_SIZE, FrameDecoder, frame_payload
from ._messages import Error, Event, Ok, Request, parse_server_item
from ._state import (
    CLIENT_RECEIVE_TRANSITIONS,
    CLIENT_STREAMING_RECEIVE_TRANSITIONS,
    SERVER_SEND_TRANSITIONS,
    Receive,
    Send,
    StreamState,
)

# QUIC application error codes for STOP_SENDING, RESET_STREAM and CONNECTION_CLOSE.
STOQ_NO_ERROR = 0x0
STOQ_INTERNAL_ERROR = 0x1
STOQ_PROTOCOL_ERROR = 0x2
STOQ_REQUEST_CANCELLED = 0x3
STOQ_EXCESSIVE_LOAD = 0x4

ENDED_STREAMS_KEPT = 1024
"""Ended request streams a server connection remembers: a STREAM frame that QUIC
retransmitted after the request was answered (its ACK was lost) reaches us as the
whole request again on a stream the engine had forgotten, and must not run twice."""


# --- events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """Server: a complete request (frame and FIN) arrived."""

    stream_id: int
    request: Request


@dataclass(frozen=True, slots=True)
class RequestRefused:
    """Server: a stream broke the rules; an error frame is already queued."""

    stream_id: int
    error: TrustChainError


@dataclass(frozen=True, slots=True)
class StreamCancelled:
    """The peer reset or stopped a stream that was being handled."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """Client: the final ``ok`` or ``error`` of a request."""

    stream_id: int
    response: Ok | Error


@dataclass(frozen=True, slots=True)
class EventReceived:
    """Client: one event of a streaming op."""

    stream_id: int
    event: Event


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """Client: the server finished the stream after events (or after a response)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamBroken:
    """Client: the server broke the protocol on this stream, or reset it."""

    stream_id: int
    error: TrustChainError


StoqEvent = (RequestReceived | RequestRefused | StreamCancelled | ResponseReceived
             | EventReceived | StreamEnded | StreamBroken)


# --- instructions for the transport -----------------------------------------


@dataclass(frozen=True, slots=True)
class SendData:
    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(frozen=True, slots=True)
class StopSending:
    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class ResetStream:
    stream_id: int
    error_code: int


Instruction = SendData | StopSending | ResetStream


class _Stream:
    __slots__ = ("_decoder", "frame", "max_frame_size", "op", "state", "streaming")

    def __init__(self, state: StreamState, max_frame_size: int, op: str = "",
                 streaming: bool = False) -> None:
        self.state = state
        self.max_frame_size = max_frame_size
        self._decoder: FrameDecoder | None = None
        self.frame: bytes | None = None
        self.op = op
        self.streaming = streaming

    @property
    def decoder(self) -> FrameDecoder:
        """Made on first use: most requests arrive whole and never need one."""
        if self._decoder is None:
            self._decoder = FrameDecoder(self.max_frame_size)
        return self._decoder

    @decoder.setter
    def decoder(self, value: FrameDecoder) -> None:
        self._decoder = value


def is_client_bidi(stream_id: int) -> bool:
    """Client-initiated bidirectional streams have ids ending in binary 00."""
    return stream_id & 0x3 == 0


class ServerConnection:
    """The server side of STOQ on one QUIC connection."""

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._streams: dict[int, _Stream] = {}
        self._ended: OrderedDict[int, None] = OrderedDict()
        """The latest request streams that ended here (answered, refused, reset), oldest
        first: data arriving on one of them again is a retransmission, ignored."""
        self._receiving: dict[int, float] = {}
        """Streams whose request has not arrived whole (frame and FIN) -> when they
        started; oldest first, so the first is the next to expire."""
        self._out: list[Instruction] = []

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def unfinished(self) -> int:
        """Requests that have not arrived whole (frame and FIN): what may expire."""
        return len(self._receiving)

    @property
    def buffered(self) -> int:
        """Bytes of requests that have not arrived whole, held for their streams."""
        total = 0
        for stream_id in self._receiving:
            stream = self._streams[stream_id]
            total += len(stream.frame or b"")
            if stream._decoder is not None:
                total += stream._decoder.buffered
        return total

    def next_deadline(self, timeout: float) -> float | None:
        """When the oldest unfinished request expires (:meth:`expire`); None: none is."""
        for started in self._receiving.values():
            return started + timeout
        return None

    def expire(self, now: float, timeout: float) -> list[int]:
        """Refuse every request that has not arrived whole within ``timeout`` seconds of
        its first byte: error ``timeout``, STOP_SENDING, its buffer released."""
        expired = []
        for stream_id, started in list(self._receiving.items()):
            if now < started + timeout:
                break
            expired.append(stream_id)
            self.refuse(stream_id, Timeout(
                f"the request did not arrive whole (frame and FIN) within {timeout:g} s"))
        return expired

    def release(self) -> None:
        """The connection is gone: drop every stream's state and buffer at once."""
        self._streams.clear()
        self._receiving.clear()
        self._out.clear()

    def _forget(self, stream_id: int) -> None:
        """``stream_id`` ended: drop its state and remember that it did."""
        self._streams.pop(stream_id, None)
        self._receiving.pop(stream_id, None)
        ended = self._ended
        ended[stream_id] = None
        if len(ended) > ENDED_STREAMS_KEPT:
            # OrderedDict: a plain dict's first key is found by skipping the deleted
            # entries before it, which grow with every request until the next resize.
            ended.popitem(last=False)

    def receive_data(self, stream_id: int, data: bytes, end_stream: bool,
                     now: float = 0.0) -> list[StoqEvent]:
        """QUIC delivered ``data`` (and maybe the FIN) on ``stream_id`` at time ``now``."""
        stream = self._streams.get(stream_id)
        if stream is None and stream_id in self._ended:
            return []
        if stream is None and end_stream and stream_id & 0x3 == 0 and len(data) > HEADER_SIZE \
                and int.from_bytes(data[:HEADER_SIZE], "big") == len(data) - HEADER_SIZE \
                and len(data) - HEADER_SIZE <= self.max_frame_size:
            # The common case: a whole request and its FIN in one piece.
            stream = _Stream(StreamState.HANDLING, 0)
            self._streams[stream_id] = stream
            try:
                request = Request.from_item(decode_item(data[HEADER_SIZE:]))
            except TrustChainError as exc:
                return [self._refuse(stream_id, stream, exc, stop=False)]
            return [RequestReceived(stream_id, request)]
        if stream is None:
            if not is_client_bidi(stream_id):
                # Unidirectional streams are refused by flow control (we grant
                # none); a peer that opens one anyway is stopped here too.
                self._out.append(StopSending(stream_id, STOQ_PROTOCOL_ERROR))
                return []
            stream = _Stream(StreamState.RECEIVING, self.max_frame_size)
            self._streams[stream_id] = stream
            self._receiving[stream_id] = now
        state = stream.state
        if state is StreamState.CLOSED:
            # The tail of a refused request, sent before our STOP_SENDING arrived.
            if end_stream:
                self._forget(stream_id)
            return []
        if state is StreamState.HANDLING or state is StreamState.STREAMING:
            return []  # QUIC delivers nothing after the FIN
        try:
            if data:
                frames = stream.decoder.receive_data(data)
                if frames:
                    if state is StreamState.RECEIVED or len(frames) > 1 \
                            or stream.decoder.buffered:
                        raise RemoteProtocolError(
                            "a stream carries one request frame; data followed it")
                    stream.frame = frames[0]
                    stream.state = state = StreamState.RECEIVED
                elif state is StreamState.RECEIVED:
                    raise RemoteProtocolError(
                        "a stream carries one request frame; data followed it")
            if not end_stream:
                return []
            stream.decoder.end_of_stream()
            if stream.frame is None:
                raise RemoteProtocolError("the stream ended without a request frame")
            request = Request.from_item(decode_item(stream.frame))
        except TrustChainError as exc:
            return [self._refuse(stream_id, stream, exc, stop=not end_stream)]
        stream.frame = None
        stream.state = StreamState.HANDLING
        del self._receiving[stream_id]
        return [RequestReceived(stream_id, request)]

    def _refuse(self, stream_id: int, stream: _Stream, exc: TrustChainError,
                stop: bool) -> RequestRefused:
        self._out.append(SendData(stream_id, _error_frame(exc), True))
        self._close_refused(stream_id, stream, stop,
                            STOQ_EXCESSIVE_LOAD if isinstance(exc, FrameTooLarge)
                            else STOQ_PROTOCOL_ERROR)
        return RequestRefused(stream_id, exc)

    def _close_refused(self, stream_id: int, stream: _Stream, stop: bool, code: int) -> None:
        if stop:
            # Keep the entry until the peer's FIN or RESET_STREAM, so that the
            # rest of the refused request is not taken for a new one.
            self._out.append(StopSending(stream_id, code))
            stream.state = StreamState.CLOSED
            stream.decoder = FrameDecoder(0)
            stream.frame = None
            self._streams[stream_id] = stream
            self._receiving.pop(stream_id, None)
        else:
            self._forget(stream_id)

    def refuse(self, stream_id: int, error: TrustChainError) -> None:
        """Answer ``error`` on a stream instead of dispatching it (or to end it)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state is StreamState.CLOSED:
            return
        stop = stream.state in (StreamState.RECEIVING, StreamState.RECEIVED)
        self._send(stream_id, Send.ERROR)
        self._out.append(SendData(stream_id, _error_frame(error), True))
        self._close_refused(stream_id, stream, stop, STOQ_REQUEST_CANCELLED)

    def stream_reset(self, stream_id: int) -> list[StoqEvent]:
        """The peer sent RESET_STREAM or STOP_SENDING on ``stream_id``.

        Whatever we had not finished on that stream is abandoned: our side is
        reset with STOQ_REQUEST_CANCELLED.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return []
        self._forget(stream_id)
        if stream.state is StreamState.CLOSED:
            return []
        self._out.append(ResetStream(stream_id, STOQ_REQUEST_CANCELLED))
        return [StreamCancelled(stream_id)]

    def _oversized(self, size: int, what: str) -> bytes:
        """The ``too_large`` error frame that replaces an answer above our frame limit:
        we never send a frame we would refuse ourselves."""
        return _error_frame(FrameTooLarge(
            f"the {what} ({size} bytes) is larger than the frame limit ({self.max_frame_size} "
            "bytes); ask for less at a time", limit=self.max_frame_size, size=size))

    def send_response(self, stream_id: int, response: Ok | Error) -> None:
        """Queue the final answer of a unary op (or an error ending a stream)."""
        self._send(stream_id, Send.OK if type(response) is Ok else Send.ERROR)
        payload = encode_item(response.to_item())
        if len(payload) > self.max_frame_size:
            data = self._oversized(len(payload), "answer")
        else:
            data = len(payload).to_bytes(4, "big") + payload
        self._out.append(SendData(stream_id, data, True))

    def send_event(self, stream_id: int, event: Event) -> int:
        """Queue one event of a streaming op; returns the frame's size in bytes.

        An event above the frame limit ends the stream with ``too_large`` instead.
        """
        payload = encode_item(event.to_item())
        if len(payload) > self.max_frame_size:
            self._send(stream_id, Send.ERROR)
            data = self._oversized(len(payload), "event")
            self._out.append(SendData(stream_id, data, True))
            return len(data)
        self._send(stream_id, Send.EVENT)
        data = len(payload).to_bytes(4, "big") + payload
        self._out.append(SendData(stream_id, data, False))
        return len(data)

    def end_stream(self, stream_id: int) -> None:
        """Finish a streaming op's stream (FIN)."""
        self._send(stream_id, Send.END)
        self._out.append(SendData(stream_id, b"", True))

    def _send(self, stream_id: int, kind: Send) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not open")
        new = SERVER_SEND_TRANSITIONS.get((stream.state, kind))
        if new is None:
            raise LocalProtocolError(
                f"cannot send {kind.value} on stream {stream_id} in state {stream.state.value}")
        if new is StreamState.CLOSED:
            self._forget(stream_id)
        else:
            stream.state = new

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def data_to_send(self) -> list[Instruction]:
        """Take what the transport must write now."""
        out, self._out = self._out, []
        return out


def _error_frame(exc: TrustChainError) -> bytes:
    return frame_payload(encode_item({"error": exc.to_wire()}))


FrameTrace = Callable[[str, Any], None]
"""Called with (op, decoded item) for every frame a client receives."""


class ClientConnection:
    """The client side of STOQ on one QUIC connection.

    :param trace: if given, sees every decoded frame from the server before
        it is interpreted (for debugging and conformance checks).
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 trace: FrameTrace | None = None) -> None:
        self.max_frame_size = max_frame_size
        self._trace = trace
        self._streams: dict[int, _Stream] = {}
        self._out: list[Instruction] = []

    def send_request(self, stream_id: int, request: Request, *, streaming: bool = False) -> None:
        """Queue ``request`` and the FIN on the new stream ``stream_id``.

        ``streaming``: the op answers with events, and may end with none.
        """
        if stream_id in self._streams:
            raise LocalProtocolError(f"stream {stream_id} already carries a request")
        if not is_client_bidi(stream_id):
            raise LocalProtocolError("requests go on client-initiated bidirectional streams")
        self._streams[stream_id] = _Stream(StreamState.HANDLING, self.max_frame_size,
                                           request.op, streaming)
        self._out.append(SendData(stream_id, frame_payload(encode_item(request.to_item())),
                                  True))

    def cancel(self, stream_id: int) -> None:
        """Stop a stream we no longer want (a subscription, a timed-out request)."""
        if self._streams.pop(stream_id, None) is not None:
            self._out.append(StopSending(stream_id, STOQ_REQUEST_CANCELLED))

    def receive_data(self, stream_id: int, data: bytes, end_stream: bool) -> list[StoqEvent]:
        """QUIC delivered ``data`` (and maybe the FIN) on ``stream_id``."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return []
        events: list[StoqEvent] = []
        try:
            for payload in stream.decoder.receive_data(data) if data else ():
                item = decode_item(payload)
                if self._trace is not None:
                    self._trace(stream.op, item)
                message = parse_server_item(item)
                if type(message) is Event:
                    self._advance(stream, Receive.EVENT)
                    events.append(EventReceived(stream_id, message))
                else:
                    kind = Receive.OK if type(message) is Ok else Receive.ERROR
                    self._advance(stream, kind)
                    events.append(ResponseReceived(stream_id, message))  # type: ignore[arg-type]
            if end_stream:
                stream.decoder.end_of_stream()
                self._advance(stream, Receive.FIN)
                del self._streams[stream_id]
                events.append(StreamEnded(stream_id))
        except TrustChainError as exc:
            remote = exc if isinstance(exc, RemoteProtocolError) else RemoteProtocolError(
                f"server sent an invalid frame: {exc.message}")
            self._streams.pop(stream_id, None)
            if not end_stream:
                self._out.append(StopSending(stream_id, STOQ_PROTOCOL_ERROR))
            events.append(StreamBroken(stream_id, remote))
        return events

    def stream_reset(self, stream_id: int, error_code: int) -> list[StoqEvent]:
        """The server reset ``stream_id``."""
        if self._streams.pop(stream_id, None) is None:
            return []
        return [StreamBroken(stream_id, RemoteProtocolError(
            f"the server reset the stream (code {error_code:#x})", reset_code=error_code))]

    @staticmethod
    def _advance(stream: _Stream, kind: Receive) -> None:
        table = (CLIENT_STREAMING_RECEIVE_TRANSITIONS if stream.streaming
                 else CLIENT_RECEIVE_TRANSITIONS)
        new = table.get((stream.state, kind))
        if new is None:
            raise RemoteProtocolError(
                f"unexpected {kind.value} in state {stream.state.value}")
        stream.state = new

    def data_to_send(self) -> list[Instruction]:
        out, self._out = self._out, []
        return out
