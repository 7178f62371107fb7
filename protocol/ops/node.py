"""``node.*``: what a client asks a server about the server itself."""

from __future__ import annotations

from dataclasses import dataclass

from .._schema import OpSpec, arg, register


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthArgs:
    """No arguments."""


@dataclass(frozen=True, slots=True, kw_only=True)
class InfoArgs:
    """No arguments."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatArgs:
    interval_ms: int = arg(1000, minimum=10, maximum=60_000,
                           doc="milliseconds between two heartbeat events")
    count: int | None = arg(None, minimum=1, maximum=1_000_000,
                            doc="end the stream after this many events; null: never")


@dataclass(frozen=True, slots=True, kw_only=True)
class EchoArgs:
    data: bytes = arg(max_length=16 << 20, doc="bytes to send back unchanged")


HEALTH = register(OpSpec(name="node.health", args=HealthArgs,
                         summary="liveness and readiness of the node"))
INFO = register(OpSpec(name="node.info", args=InfoArgs,
                       summary="version, engine, ALPNs, ops, limits, uptime"))
HEARTBEAT = register(OpSpec(name="node.heartbeat", args=HeartbeatArgs, streaming=True,
                            summary="a stream of heartbeat events, for liveness probes"))
ECHO = register(OpSpec(name="node.echo", args=EchoArgs,
                       summary="return the given bytes: round-trip and throughput probe"))
