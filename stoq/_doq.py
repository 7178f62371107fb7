"""DNS over QUIC on one server connection: the glue between QUIC streams and a resolver.

:class:`DoqApplication` is registered on the :class:`stoq.Server` under the
ALPN ``doq``; it builds a :class:`DoqSession` per connection. The session
feeds stream data into :class:`protocol.doq.DoqConnection` (which enforces
RFC 9250) and hands each complete query to the ``answer`` callable: it
returns the wire answer at once (a precomputed authoritative answer) or an
awaitable of it (a forwarded query). Nothing here knows DNS beyond the
header-only REFUSED answer of the rate limiter.

Limits (the CoreDNS stream-exhaustion lesson, CVE-2025-47950): a connection
has at most ``max_streams_per_connection`` streams open (QUIC stream credit,
granted back one per answered stream), at most ``max_buffered`` bytes of
unfinished queries, and the whole server at most ``max_pending`` queries
being answered asynchronously; past either of the last two the connection is
closed with DOQ_EXCESSIVE_LOAD.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from protocol import Peer
from protocol.doq import (
    DOQ_EXCESSIVE_LOAD,
    DOQ_INTERNAL_ERROR,
    CloseConnection,
    ConnectionBroken,
    DoqConnection,
    DoqEvent,
    QueryCancelled,
    QueryMemo,
    QueryReceived,
    ResetStream,
    SendData,
    StopSending,
    error_response,
)
from protocol.loglimit import LogLimiter

from ._ratelimit import RateLimiter

log = logging.getLogger("stoq.doq")
peer_log = LogLimiter(log)
"""Lines a client can trigger at will (protocol errors, failing answers), rate-limited."""

Answer = Callable[[QueryReceived, Peer], bytes | Awaitable[bytes]]
"""Answers one query: the DNS response (Message ID 0), now or later."""

RCODE_REFUSED = 5


@dataclass(frozen=True, kw_only=True)
class DoqLimits:
    """Resource limits of the DoQ application; each maps to a ``dns.*`` config key."""

    fin_timeout: float = 5.0
    """Seconds a complete query may wait for its FIN (then DOQ_PROTOCOL_ERROR)."""
    stream_timeout: float = 10.0
    """Seconds an unfinished query may take to arrive (then the stream is cancelled)."""
    max_buffered: int = 256 * 1024
    """Bytes of unfinished queries one connection may have buffered."""
    max_pending: int = 10_000
    """Queries being answered asynchronously (forwarded) across the server."""
    rate_limit_per_minute: int = 0
    """Queries a minute per client prefix; 0 is unlimited. Over it: REFUSED."""
    rate_limit_prefix_length: int = 64


@dataclass
class DoqStats:
    """Counters of the DoQ application since start."""

    connections: int = 0
    """Connections open now."""
    queries: int = 0
    protocol_errors: int = 0
    excessive_load: int = 0
    rate_limited: int = 0
    pending: int = 0
    """Queries being answered asynchronously now."""


class DoqStreams(Protocol):
    """The QUIC connection as a :class:`DoqSession` uses it: write, stop and reset its
    streams, close the connection, know the peer and the time."""

    peer: Peer

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None: ...
    def stop_stream(self, stream_id: int, error_code: int) -> None: ...
    def reset_stream(self, stream_id: int, error_code: int) -> None: ...
    def stream_finished(self) -> None: ...
    def transmit_soon(self) -> None: ...
    def now(self) -> float: ...
    def close_with(self, error_code: int, reason: str) -> None: ...


class DoqApplication:
    """The ``doq`` ALPN: a session factory for :meth:`stoq.Server.add_application`."""

    def __init__(self, answer: Answer, limits: DoqLimits | None = None) -> None:
        self.answer = answer
        self.limits = limits or DoqLimits()
        self.stats = DoqStats()
        self.memo = QueryMemo()
        """Queries read before, shared by every connection."""
        self.rate_limiter = (RateLimiter(self.limits.rate_limit_per_minute,
                                         self.limits.rate_limit_prefix_length)
                             if self.limits.rate_limit_per_minute else None)

    def __call__(self, streams: DoqStreams) -> DoqSession:
        return DoqSession(streams, self)


class DoqSession:
    """The ``doq`` application on one connection."""

    def __init__(self, streams: DoqStreams, app: DoqApplication) -> None:
        self._streams = streams
        self._app = app
        limits = app.limits
        self._conn = DoqConnection(fin_timeout=limits.fin_timeout,
                                   stream_timeout=limits.stream_timeout,
                                   max_buffered=limits.max_buffered, memo=app.memo)
        self._tasks: dict[int, asyncio.Future[bytes]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._lost = False
        self.expired = 0
        """Always 0: DoQ counts its own stream timeouts (DoqStats)."""
        app.stats.connections += 1

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def buffered(self) -> int:
        """Bytes held for queries that have not arrived whole."""
        return self._conn.buffered

    @property
    def unsent(self) -> int:
        """DoQ has no streaming answers."""
        return 0

    # --- input from QUIC ------------------------------------------------------------

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        events = self._conn.receive_data(stream_id, data, end_stream, self._streams.now())
        self._handle(events)
        self._flush()

    def stream_reset(self, stream_id: int) -> None:
        self._handle(self._conn.stream_reset(stream_id))
        self._flush()

    def connection_lost(self) -> None:
        if self._lost:
            return
        self._lost = True
        self._app.stats.connections -= 1
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        if self._timer is not None:
            self._timer.cancel()
        self._conn.release()

    def end_streams(self, event: object) -> None:
        """DoQ has no streaming answers; queries in flight are answered as usual."""

    # --- queries -------------------------------------------------------------------

    def _handle(self, events: list[DoqEvent]) -> None:
        stats = self._app.stats
        for event in events:
            kind = type(event)
            if kind is QueryReceived:
                self._answer(event)  # type: ignore[arg-type]
            elif kind is QueryCancelled:
                task = self._tasks.pop(event.stream_id, None)  # type: ignore[union-attr]
                if task is not None:
                    task.cancel()
            elif kind is ConnectionBroken:
                if event.error_code == DOQ_EXCESSIVE_LOAD:  # type: ignore[union-attr]
                    stats.excessive_load += 1
                else:
                    stats.protocol_errors += 1
                peer_log.info("DoQ connection closed", extra={
                    "code": event.error_code, "reason": event.reason,  # type: ignore[union-attr]
                    "peer": self._streams.peer.address})
                for task in self._tasks.values():
                    task.cancel()
                self._tasks.clear()

    def _answer(self, event: QueryReceived) -> None:
        app = self._app
        app.stats.queries += 1
        limiter = app.rate_limiter
        if limiter is not None and limiter.acquire(self._streams.peer.address,
                                                   self._streams.now()):
            app.stats.rate_limited += 1
            flags = event.query.flags if event.query is not None else None
            self._conn.send_answer(event.stream_id,
                                   error_response(event.message, RCODE_REFUSED, flags))
            return
        try:
            reply = app.answer(event, self._streams.peer)
        except Exception:
            peer_log.error("DoQ answer failed", exc_info=True)
            self._conn.abandon(event.stream_id, DOQ_INTERNAL_ERROR)
            return
        if type(reply) is bytes or not inspect.isawaitable(reply):
            # written at once, not queued as an instruction for _flush
            framed = self._conn.take_answer(event.stream_id, reply)
            if framed is not None:
                streams = self._streams
                streams.send_stream_data(event.stream_id, framed, True)
                streams.stream_finished()
            return
        if app.stats.pending >= app.limits.max_pending:
            close = getattr(reply, "close", None)
            if close is not None:
                close()  # a coroutine that will never run
            self._handle(self._conn.close(
                DOQ_EXCESSIVE_LOAD, f"more than {app.limits.max_pending} queries pending"))
            return
        app.stats.pending += 1
        # The reply itself is the task: cancelled before it ever ran (its connection
        # closed), it is still closed, and the done callback still counts it out.
        task = asyncio.ensure_future(reply)
        self._tasks[event.stream_id] = task
        task.add_done_callback(functools.partial(self._answered, event.stream_id))

    def _answered(self, stream_id: int, task: asyncio.Future[bytes]) -> None:
        self._app.stats.pending -= 1
        if self._tasks.get(stream_id) is task:
            del self._tasks[stream_id]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            peer_log.error("DoQ answer failed", exc_info=exc)
            self._conn.abandon(stream_id, DOQ_INTERNAL_ERROR)
            self._flush()
            return
        if self._conn.is_answering(stream_id):
            self._conn.send_answer(stream_id, task.result())
            self._flush()

    # --- output to QUIC --------------------------------------------------------------

    def _flush(self) -> None:
        streams = self._streams
        for item in self._conn.data_to_send():
            kind = type(item)
            if kind is SendData:
                streams.send_stream_data(item.stream_id, item.data,  # type: ignore[union-attr]
                                           item.end_stream)  # type: ignore[union-attr]
                streams.stream_finished()
            elif kind is ResetStream:
                streams.reset_stream(item.stream_id, item.error_code)  # type: ignore[union-attr]
                streams.stream_finished()
            elif kind is StopSending:
                streams.stop_stream(item.stream_id, item.error_code)  # type: ignore[union-attr]
            elif kind is CloseConnection:
                streams.close_with(item.error_code, item.reason)  # type: ignore[union-attr]
                self.connection_lost()
                return
        streams.transmit_soon()
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = self._conn.get_timer()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None and not self._lost:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._handle(self._conn.handle_timer(self._streams.now()))
        self._flush()
