"""STOQ links between validators: the :class:`handlers.consensus.PeerLinks` of a node.

One client connection per peer, opened on first use and re-opened after a
failure. Consensus messages are signed by validator keys, so the link does
not need to authenticate the peer's TLS certificate (a node starts with a
self-signed one until the cluster has committed its CA-issued certificate);
TLS still keeps the traffic private.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import stoq

log = logging.getLogger("trustchain.consensus")


class StoqPeerLinks:
    """Reaches validators by id at their configured ``[address]:port``."""

    def __init__(self, *, me: str | None, endpoints: dict[str, tuple[str, int]],
                 engine: str, timeout: float = 5.0) -> None:
        self.me = me
        self.endpoints = endpoints
        self.engine = engine
        self.timeout = timeout
        self._clients: dict[str, stoq.AsyncClient] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self.dropped: set[str] = set()

    async def _client(self, validator: str) -> stoq.AsyncClient:
        if validator in self.dropped:
            raise ConnectionError(f"validator {validator} is isolated")
        client = self._clients.get(validator)
        if client is not None:
            return client
        lock = self._connecting.setdefault(validator, asyncio.Lock())
        async with lock:
            client = self._clients.get(validator)
            if client is None:
                host, port = self.endpoints[validator]
                client = await stoq.connect(host, port, insecure=True, engine=self.engine,
                                            timeout=self.timeout, keep_alive_interval=5.0)
                self._clients[validator] = client
            return client

    async def _request(self, validator: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        client = await self._client(validator)
        try:
            return await client.request(op, args, timeout=self.timeout)
        except stoq.ConnectionFailed:
            self._clients.pop(validator, None)
            with contextlib.suppress(Exception):
                await client.close()
            raise

    async def send(self, validator: str, messages: list[bytes]) -> None:
        await self._request(validator, "consensus.gossip",
                            {"messages": messages, "sender": self.me})

    async def fetch_blocks(self, validator: str, start: int,
                           limit: int) -> list[tuple[bytes, bytes]]:
        result = await self._request(validator, "consensus.blocks",
                                     {"start": start, "limit": limit})
        return [(b["block"], b["commit"]) for b in result["blocks"]]

    def drop(self, validator: str) -> None:
        self.dropped.add(validator)
        client = self._clients.pop(validator, None)
        if client is not None:
            asyncio.get_running_loop().create_task(client.close())

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
