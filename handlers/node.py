"""``node.*``: health, identity and liveness of this node."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from protocol import Event
from protocol.ops import node as ops

from ._router import RequestContext, Router


class NodeService:
    """Answers ``node.health``, ``node.info``, ``node.echo`` and ``node.heartbeat``.

    :param describe: returns the static and live facts ``node.info`` reports
        (version, engine, ALPNs, limits, ...); supplied by the application,
        which knows the transport.
    :param checks: named health checks, each returning None when it passes or why it
        does not; ``node.health`` reports each (and the reasons) and is ``"ok"`` only if
        all pass.
    """

    def __init__(self, *, describe: Callable[[], dict[str, Any]],
                 checks: dict[str, Callable[[], str | None]] | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._describe = describe
        self._checks = checks or {}
        self._clock = clock
        self._monotonic = monotonic
        self._started = monotonic()

    def uptime(self) -> float:
        return round(self._monotonic() - self._started, 3)

    def health(self, args: ops.HealthArgs, ctx: RequestContext) -> dict[str, Any]:
        passed: dict[str, bool] = {}
        reasons: dict[str, str] = {}
        for name, check in self._checks.items():
            try:
                problem = check()
            except Exception as exc:  # a check that cannot tell is a failing one
                problem = f"the check failed: {type(exc).__name__}: {exc}"
            passed[name] = problem is None
            if problem is not None:
                reasons[name] = problem
        return {
            "status": "degraded" if reasons else "ok",
            "checks": passed,
            "reasons": reasons,
            "time": round(self._clock(), 3),
            "uptime": self.uptime(),
        }

    def info(self, args: ops.InfoArgs, ctx: RequestContext) -> dict[str, Any]:
        info = dict(self._describe())
        info["uptime"] = self.uptime()
        info["peer"] = {"address": ctx.peer.address, "port": ctx.peer.port}
        return info

    def echo(self, args: ops.EchoArgs, ctx: RequestContext) -> dict[str, Any]:
        return {"data": args.data}

    async def heartbeat(self, args: ops.HeartbeatArgs,
                        ctx: RequestContext) -> AsyncIterator[Event]:
        seq = 0
        while args.count is None or seq < args.count:
            if seq:
                await asyncio.sleep(args.interval_ms / 1000)
            yield Event(event="heartbeat", data={"seq": seq, "time": round(self._clock(), 3),
                                                 "uptime": self.uptime()})
            seq += 1

    def register(self, router: Router) -> None:
        router.add(ops.HEALTH, self.health)
        router.add(ops.INFO, self.info)
        router.add(ops.HEARTBEAT, self.heartbeat)
        router.add(ops.ECHO, self.echo)
