"""dnspython's asyncio DoQ client with its lost wake-up fixed: the forwarder's DoQ client.

dnspython 2.9's ``AsyncioQuicStream`` waits for an answer on a bare
``asyncio.Condition`` without re-checking what it waits for: an answer that
the connection delivers between the stream's "have I got it?" check and the
moment its waiting task actually waits is notified to nobody, and the query
then times out although its answer sits in the buffer. On loopback that
almost never happens; once packets are reordered or lost it does (measured:
about 1 forwarded query in 100 through a reordering proxy,
tests/integration/test_lossy_network.py). :class:`DoqManager` is dnspython's
manager whose streams re-check their buffer every ``RECHECK`` seconds while
they wait, so a missed wake-up costs at most that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import dns.exception
from dns.quic import _asyncio as dnsquic
from dns.quic._common import AsyncQuicManager, UnexpectedEOF

RECHECK = 0.05
"""Seconds a waiting stream sleeps at most before it looks at its buffer again."""


class _Stream(dnsquic.AsyncioQuicStream):
    async def _wait_for_wake_up(self) -> None:
        async with self._wake_up:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_up.wait(), RECHECK)


class _Connection(dnsquic.AsyncioQuicConnection):
    async def make_stream(self, timeout: float | None = None) -> _Stream:
        try:
            await asyncio.wait_for(self._handshake_complete.wait(), timeout)
        except TimeoutError:
            raise dns.exception.Timeout from None
        if self._done:
            raise UnexpectedEOF
        stream_id = self._connection.get_next_available_stream_id(False)
        stream = _Stream(self, stream_id)  # type: ignore[no-untyped-call]
        self._streams[stream_id] = stream
        return stream


class DoqManager(dnsquic.AsyncioQuicManager):
    """``dns.quic.AsyncioQuicManager`` whose connections' streams miss no answer."""

    def __init__(self, conf: Any = None, verify_mode: Any = ssl.CERT_REQUIRED,
                 server_name: str | None = None) -> None:
        AsyncQuicManager.__init__(  # type: ignore[no-untyped-call]
            self, conf, verify_mode, _Connection, server_name, False)
