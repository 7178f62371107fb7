"""Route requests to handler functions by op name.

A handler takes the op's typed arguments and a :class:`RequestContext` and
returns a result map (plain or ``async def``), or is an async generator of
:class:`protocol.Event` for a streaming op. Handlers raise
:class:`protocol.ServiceError` subclasses to refuse; the router turns results
and errors into envelope messages, and knows nothing of QUIC.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from protocol import (
    Error,
    ErrorCode,
    Event,
    Internal,
    Ok,
    OpSpec,
    Peer,
    Request,
    TrustChainError,
    UnknownOp,
    lookup,
    parse_args,
)

log = logging.getLogger("trustchain.handlers")


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What a handler may know about the request besides its arguments."""

    peer: Peer
    op: str
    received_at: float
    """Wall-clock time (seconds since the epoch) the request was dispatched."""


Handler = Callable[[Any, RequestContext], Any]
Reply = Ok | Error | Awaitable[Ok | Error] | AsyncIterator[Event | Error]


class Router:
    """Callable dispatcher: ``router(request, peer)`` returns the reply."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._routes: dict[str, tuple[OpSpec, Handler, str]] = {}
        self._clock = clock

    def add(self, spec: OpSpec, handler: Handler) -> None:
        """Serve ``spec`` with ``handler``; its kind must match the op's shape."""
        if inspect.isasyncgenfunction(handler):
            kind = "stream"
        elif inspect.iscoroutinefunction(handler):
            kind = "async"
        else:
            kind = "sync"
        if spec.streaming != (kind == "stream"):
            raise TypeError(f"{spec.name}: streaming ops need an async generator handler, "
                            "unary ops a function")
        self._routes[spec.name] = (spec, handler, kind)

    @property
    def ops(self) -> list[str]:
        return sorted(self._routes)

    def __call__(self, request: Request, peer: Peer) -> Reply:
        route = self._routes.get(request.op)
        if route is None:
            lookup(request.op)  # raises UnknownOp for ops nobody registered
            return _error(UnknownOp(f"{request.op} is not served by this node",
                                    op=request.op))
        spec, handler, kind = route
        args = parse_args(spec, request.args)
        ctx = RequestContext(peer=peer, op=request.op, received_at=self._clock())
        if kind == "sync":
            try:
                result = handler(args, ctx)
            except TrustChainError as exc:
                return _error(exc)
            return Ok(result=_result_map(spec, result))
        if kind == "async":
            return _run(spec, handler(args, ctx))
        return _events(handler(args, ctx))


async def _run(spec: OpSpec, pending: Awaitable[Any]) -> Ok | Error:
    try:
        return Ok(result=_result_map(spec, await pending))
    except TrustChainError as exc:
        return _error(exc)


async def _events(source: AsyncIterator[Event]) -> AsyncIterator[Event | Error]:
    try:
        async for event in source:
            yield event
    except TrustChainError as exc:
        yield _error(exc)


def _result_map(spec: OpSpec, result: Any) -> dict[str, Any]:
    if type(result) is not dict:
        raise Internal(f"{spec.name}: handler returned {type(result).__name__}")
    return result


def _error(exc: TrustChainError) -> Error:
    if exc.code is ErrorCode.INTERNAL:
        log.error("internal error: %s", exc.message)
    return Error(code=exc.code, message=exc.message, details=exc.details)
