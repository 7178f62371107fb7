"""STOQ on one server connection: the glue between QUIC streams and the dispatcher.

It feeds stream data into :class:`protocol.ServerConnection`, hands each
complete request to the dispatcher, and writes back what comes out: one
response, or a stream of events. Requests run concurrently; a dispatcher that
answers synchronously costs no task.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from protocol import (
    Error,
    ErrorCode,
    Event,
    Internal,
    Ok,
    Peer,
    RateLimited,
    Request,
    RequestReceived,
    RequestRefused,
    ResetStream,
    SendData,
    ServerConnection,
    StopSending,
    StreamCancelled,
    TrustChainError,
    Unavailable,
)
from protocol.loglimit import LogLimiter

if TYPE_CHECKING:
    from ._ratelimit import RateLimiter

log = logging.getLogger("stoq")
peer_log = LogLimiter(log)
"""Lines a client can trigger at will (refusals, failing handlers), rate-limited."""

Reply = Ok | Error | Awaitable[Ok | Error] | AsyncIterator[Event | Error]
"""What a dispatcher returns: an answer now, one later, or a stream of events."""

Dispatch = Callable[[Request, Peer], Reply]

DEFAULT_REQUEST_TIMEOUT = 10.0
"""Seconds a request may take to arrive whole (frame and FIN) after its first byte."""

SEND_BUFFER_HIGH_WATER = 1 << 20
"""Bytes written to a streaming op's stream but not yet sent, above which the
producer waits (the reader is slower than the events)."""
BACK_PRESSURE_FIRST_WAIT = 0.005
BACK_PRESSURE_LONGEST_WAIT = 0.02
"""Seconds a waiting producer sleeps between looks at its stream: doubling from the
first to the longest, so that a frozen client costs little CPU."""


class StoqStreams(Protocol):
    """The QUIC connection as a :class:`StoqSession` uses it: write, stop and reset its
    streams, see how much of a stream was sent, know the peer and the time.

    The server's connection protocol implements it (``stoq._server``); not to be
    confused with ``handlers.consensus.Transport``, the links between validators.
    """

    peer: Peer

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None: ...
    def stop_stream(self, stream_id: int, error_code: int) -> None: ...
    def reset_stream(self, stream_id: int, error_code: int) -> None: ...
    def stream_finished(self) -> None: ...
    def stream_sent_offset(self, stream_id: int) -> int | None:
        """Bytes of ``stream_id`` handed to the network so far (None: stream gone)."""
    def stream_send_credit(self, stream_id: int) -> int | None:
        """Bytes the peer's flow control lets us send on ``stream_id`` now (None: gone)."""
    def transmit_soon(self) -> None: ...
    def now(self) -> float: ...


class StoqSession:
    """The ``stoq/1`` application on one connection."""

    def __init__(self, streams: StoqStreams, dispatch: Dispatch, *, max_frame_size: int,
                 rate_limiter: RateLimiter | None, draining: Callable[[], bool],
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        self._streams = streams
        self._dispatch = dispatch
        self._conn = ServerConnection(max_frame_size=max_frame_size)
        self._request_timeout = request_timeout
        self._timer: asyncio.TimerHandle | None = None
        self.expired = 0
        """Requests refused because they did not arrive whole in time."""
        self._rate_limiter = rate_limiter
        self._draining = draining
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._streaming: set[int] = set()
        self._unsent: dict[int, int] = {}
        """Streaming op's stream -> bytes written to it so far."""
        self.requests = 0

    @property
    def in_flight(self) -> int:
        """Requests dispatched and not yet answered (streams included)."""
        return len(self._tasks)

    @property
    def buffered(self) -> int:
        """Bytes held for requests that have not arrived whole."""
        return self._conn.buffered

    # --- input from QUIC ------------------------------------------------------

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        conn = self._conn
        events = conn.receive_data(stream_id, data, end_stream, self._streams.now())
        if self._timer is None and conn.unfinished:
            self._arm_timer()
        for event in events:
            if type(event) is RequestReceived:
                self._start(event.stream_id, event.request)
            elif type(event) is RequestRefused:
                peer_log.info("request refused", extra={"stream_id": event.stream_id,
                                                        "code": event.error.code.value,
                                                        "reason": event.error.message})
        self._flush()

    def stream_reset(self, stream_id: int) -> None:
        for event in self._conn.stream_reset(stream_id):
            if type(event) is StreamCancelled:
                task = self._tasks.pop(stream_id, None)
                if task is not None:
                    task.cancel()
        self._flush()

    def connection_lost(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._conn.release()

    # --- unfinished requests ----------------------------------------------------

    def _arm_timer(self) -> None:
        deadline = self._conn.next_deadline(self._request_timeout)
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        expired = self._conn.expire(self._streams.now(), self._request_timeout)
        if expired:
            self.expired += len(expired)
            peer_log.info("unfinished requests expired",
                          extra={"streams": len(expired), "peer": self._streams.peer.address})
            self._flush()
        self._arm_timer()

    # --- dispatch -------------------------------------------------------------

    def _start(self, stream_id: int, request: Request) -> None:
        self.requests += 1
        if self._draining():
            self._conn.refuse(stream_id, Unavailable("the server is shutting down"))
            return
        if self._rate_limiter is not None:
            wait = self._rate_limiter.acquire(self._streams.peer.address,
                                              self._streams.now())
            if wait:
                self._conn.refuse(stream_id, RateLimited(
                    wait, f"rate limit of {self._rate_limiter.per_minute} requests a "
                          f"minute exceeded; retry after {wait:.3f} s"))
                return
        try:
            reply = self._dispatch(request, self._streams.peer)
        except TrustChainError as exc:
            reply = Error(code=exc.code, message=exc.message, details=exc.details)
        except Exception:
            peer_log.error("dispatcher failed", extra={"op": request.op}, exc_info=True)
            reply = _internal()
        kind = type(reply)
        if kind is Ok or kind is Error:
            self._conn.send_response(stream_id, reply)  # type: ignore[arg-type]
        elif inspect.isawaitable(reply):
            self._tasks[stream_id] = asyncio.ensure_future(self._answer(stream_id, reply))
        else:
            self._streaming.add(stream_id)
            self._tasks[stream_id] = asyncio.ensure_future(
                self._stream(stream_id, reply))  # type: ignore[arg-type]

    async def _answer(self, stream_id: int, pending: Awaitable[Ok | Error]) -> None:
        try:
            response = await pending
        except asyncio.CancelledError:
            raise
        except TrustChainError as exc:
            response = Error(code=exc.code, message=exc.message, details=exc.details)
        except Exception:
            peer_log.error("handler failed", extra={"stream_id": stream_id}, exc_info=True)
            response = _internal()
        self._tasks.pop(stream_id, None)
        if self._conn.is_open(stream_id):
            self._conn.send_response(stream_id, response)
            self._flush()

    async def _stream(self, stream_id: int, events: AsyncIterator[Event | Error]) -> None:
        written = 0
        try:
            async for item in events:
                if not self._conn.is_open(stream_id):
                    break
                if type(item) is Error:
                    self._conn.send_response(stream_id, item)
                    self._flush()
                    return
                written += self._conn.send_event(stream_id, item)  # type: ignore[arg-type]
                self._unsent[stream_id] = written
                self._flush()
                if not await self._writable(stream_id, written):
                    return
            if self._conn.is_open(stream_id):
                self._conn.end_stream(stream_id)
                self._flush()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, TrustChainError):
                peer_log.error("stream handler failed", extra={"stream_id": stream_id},
                               exc_info=True)
            if self._conn.is_open(stream_id):
                error = exc if isinstance(exc, TrustChainError) else Internal()
                self._conn.send_response(stream_id, Error(code=error.code, message=error.message,
                                                          details=error.details))
                self._flush()
        finally:
            self._tasks.pop(stream_id, None)
            self._streaming.discard(stream_id)
            self._unsent.pop(stream_id, None)
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.exception("closing a stream handler failed")

    async def _writable(self, stream_id: int, written: int) -> bool:
        """Back-pressure: wait until the stream may take another event; False if it is gone.

        A slow reader holds the producer, not our memory: it waits while more than
        ``SEND_BUFFER_HIGH_WATER`` bytes are not sent yet, and while the client grants
        no flow-control credit at all and anything is unsent (a frozen client gets no
        further event produced for it).
        """
        streams = self._streams
        delay = BACK_PRESSURE_FIRST_WAIT
        while True:
            sent = streams.stream_sent_offset(stream_id)
            if sent is None or not self._conn.is_open(stream_id):
                return False
            unsent = written - sent
            if unsent <= 0 or (unsent <= SEND_BUFFER_HIGH_WATER
                               and streams.stream_send_credit(stream_id) != 0):
                return True
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACK_PRESSURE_LONGEST_WAIT)

    @property
    def unsent(self) -> int:
        """Bytes of streaming ops' events written but not yet sent (held for slow readers)."""
        total = 0
        for stream_id, written in list(self._unsent.items()):
            sent = self._streams.stream_sent_offset(stream_id)
            if sent is None or not self._conn.is_open(stream_id):
                del self._unsent[stream_id]
            else:
                total += max(0, written - sent)
        return total

    def end_streams(self, event: Event) -> None:
        """Send ``event`` and end every streaming op (at shutdown); unary ops go on."""
        for stream_id in list(self._streaming):
            task = self._tasks.get(stream_id)
            if task is not None and self._conn.is_open(stream_id):
                try:
                    self._conn.send_event(stream_id, event)
                    self._conn.end_stream(stream_id)
                except TrustChainError:
                    continue
                task.cancel()
                self._tasks.pop(stream_id, None)
                self._streaming.discard(stream_id)
        self._flush()

    # --- output to QUIC -------------------------------------------------------

    def _flush(self) -> None:
        streams = self._streams
        instructions = self._conn.data_to_send()
        if not instructions:
            return
        for item in instructions:
            kind = type(item)
            if kind is SendData:
                streams.send_stream_data(item.stream_id, item.data,  # type: ignore[union-attr]
                                           item.end_stream)  # type: ignore[union-attr]
                if item.end_stream:  # type: ignore[union-attr]
                    streams.stream_finished()
            elif kind is StopSending:
                streams.stop_stream(item.stream_id, item.error_code)  # type: ignore[union-attr]
            elif kind is ResetStream:
                streams.reset_stream(item.stream_id, item.error_code)  # type: ignore[union-attr]
                streams.stream_finished()
        streams.transmit_soon()


def _internal() -> Error:
    return Error(code=ErrorCode.INTERNAL, message="internal server error")
