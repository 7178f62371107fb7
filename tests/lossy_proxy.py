"""A lossy, reordering UDP proxy on loopback, for driving QUIC through a bad network.

:class:`LossyProxy` listens on ``[::1]:port`` and forwards every client's datagrams
to one server address through a socket of its own per client (so the server sees
one peer per client, as through a NAT), and the server's datagrams back. Each
direction drops a seeded-random share of datagrams, delays some of them (which
reorders them behind later ones) and duplicates a few. The seed makes a run
repeatable as far as the event loop's timing allows; the counters say what the
proxy did, so that a test can check the network really was bad.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Impairment:
    """What happens to the datagrams of one direction."""

    drop: float = 0.0
    """Share of datagrams dropped."""
    delay: float = 0.0
    """Share of datagrams held back (the rest overtake them)."""
    max_delay: float = 0.03
    """Seconds a held-back datagram waits at most (uniformly from 0)."""
    duplicate: float = 0.0
    """Share of datagrams sent twice (the copy after a delay)."""


@dataclass
class ProxyCounts:
    """What the proxy did to one direction's datagrams."""

    forwarded: int = 0
    dropped: int = 0
    delayed: int = 0
    duplicated: int = 0


@dataclass
class _Counts:
    to_server: ProxyCounts = field(default_factory=ProxyCounts)
    to_client: ProxyCounts = field(default_factory=ProxyCounts)


class _Upstream(asyncio.DatagramProtocol):
    """The proxy's socket towards the server for one client."""

    def __init__(self, proxy: LossyProxy, client: Any) -> None:
        self.proxy = proxy
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        listener = self.proxy.listener
        if listener is not None:
            self.proxy.forward(data, self.proxy.to_client, self.proxy.counts.to_client,
                               lambda d: listener.sendto(d, self.client))


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, proxy: LossyProxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: Any) -> None:
        task = asyncio.ensure_future(self.proxy.from_client(data, addr))
        self.proxy.tasks.add(task)
        task.add_done_callback(self.proxy.tasks.discard)


class LossyProxy:
    """A UDP proxy from ``[::1]:port`` (``port`` after :meth:`start`) to ``server``.

    Use as ``async with LossyProxy(...) as proxy:``; clients connect to
    ``("::1", proxy.port)``.
    """

    def __init__(self, server: tuple[str, int], *, to_server: Impairment,
                 to_client: Impairment, seed: int = 1) -> None:
        self.server = server
        self.to_server = to_server
        self.to_client = to_client
        self.random = random.Random(seed)
        self.counts = _Counts()
        self.port = 0
        self.listener: asyncio.DatagramTransport | None = None
        self._upstreams: dict[Any, asyncio.Future[_Upstream]] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self.closed = False
        self.tasks: set[asyncio.Future[None]] = set()

    async def start(self) -> LossyProxy:
        loop = asyncio.get_running_loop()
        self.listener, _ = await loop.create_datagram_endpoint(
            lambda: _Listener(self), local_addr=("::1", 0))
        self.port = int(self.listener.get_extra_info("sockname")[1])
        return self

    async def close(self) -> None:
        self.closed = True
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for pending in self._upstreams.values():
            if pending.done() and not pending.cancelled() and pending.exception() is None:
                transport = pending.result().transport
                if transport is not None:
                    transport.close()
        self._upstreams.clear()
        if self.listener is not None:
            self.listener.close()

    async def __aenter__(self) -> LossyProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def from_client(self, data: bytes, addr: Any) -> None:
        if self.closed:
            return
        pending = self._upstreams.get(addr)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = self._upstreams[addr] = loop.create_future()
            _, upstream = await loop.create_datagram_endpoint(
                lambda: _Upstream(self, addr), remote_addr=self.server)
            pending.set_result(upstream)
        upstream = await pending
        transport = upstream.transport
        if transport is not None:
            self.forward(data, self.to_server, self.counts.to_server, transport.sendto)

    def forward(self, data: bytes, how: Impairment, counts: ProxyCounts,
                send: Any) -> None:
        """Send ``data`` on, or not, now or later, once or twice, as ``how`` says."""
        if self.closed:
            return
        rng = self.random
        if rng.random() < how.drop:
            counts.dropped += 1
            return
        counts.forwarded += 1
        if rng.random() < how.delay:
            counts.delayed += 1
            self._later(rng.uniform(0.0, how.max_delay), send, data)
        else:
            send(data)
        if rng.random() < how.duplicate:
            counts.duplicated += 1
            self._later(rng.uniform(0.0, how.max_delay), send, data)

    def _later(self, delay: float, send: Any, data: bytes) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            if not self.closed:
                send(data)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)
