"""STOQ links between validators: the :class:`handlers.consensus.PeerLinks` of a node.

One client connection per peer, opened on first use and re-opened after a
failure. The TLS certificate is not checked against a CA (a node starts with
a self-signed one until the cluster has committed its CA-issued one); instead
the endpoint must show that its validator key signed a link statement over
the TLS key it served (``consensus.identity``, spec §18.2). An endpoint that
cannot (an impostor on the address, a retired key) is refused, counted and
retried later; gossip carries this node's own statement over the endpoint's
key, so the endpoint can tell a validator from anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization

import stoq
from handlers.consensus import link_refusal, link_statement, spki_sha256
from handlers.consensus.bft import ValidatorSet
from protocol import Timeout, TrustChainError
from protocol.ops.consensus import PACK_AT_BYTES, pack_messages
from store import TlsCredential

log = logging.getLogger("trustchain.consensus")


class ServedTlsKeys:
    """SPKI hashes of the TLS keys this node served with since it started, newest first
    (a peer's connection may predate a certificate rotation)."""

    KEEP = 4

    def __init__(self, credential: TlsCredential) -> None:
        self.credential = credential
        self._mtime = -1.0
        self._keys: list[bytes] = []

    def __call__(self) -> list[bytes]:
        try:
            mtime = self.credential.certfile.stat().st_mtime
        except FileNotFoundError:
            return self._keys
        if mtime != self._mtime:
            chain = self.credential.read_chain()
            key = spki_sha256(chain[0].public_bytes(serialization.Encoding.DER))
            self._keys = [key, *(k for k in self._keys if k != key)][:self.KEEP]
            self._mtime = mtime
        return self._keys


class ImpostorEndpoint(ConnectionError):
    """The endpoint at a validator's address cannot show it speaks for that validator."""


class StoqPeerLinks:
    """Reaches validators by id at their configured ``[address]:port``.

    :param validators: the configured validator set (its keys check the endpoints;
        a key not in it, or with no power, is refused).
    :param sign: signs with this node's validator key (None: an observer, which only
        fetches blocks).
    """

    def __init__(self, *, chain_id: str, me: str | None, sign: Callable[[bytes], bytes] | None,
                 validators: ValidatorSet,
                 endpoints: dict[str, tuple[str, int]], engine: str,
                 timeout: float = 5.0) -> None:
        self.chain_id = chain_id
        self.me = me
        self.sign = sign
        self.validators = validators
        self.endpoints = endpoints
        self.engine = engine
        self.timeout = timeout
        self._clients: dict[str, stoq.AsyncClient] = {}
        self._statements: dict[str, bytes | None] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self.dropped: set[str] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self.refused: dict[str, str] = {}
        """validator id -> why its endpoint was last refused (``consensus.status``)."""

    async def _client(self, validator: str) -> stoq.AsyncClient:
        if validator in self.dropped:
            raise ConnectionError(f"validator {validator} is isolated")
        client = self._clients.get(validator)
        if client is not None and client.is_connected:
            return client
        lock = self._connecting.setdefault(validator, asyncio.Lock())
        async with lock:
            client = self._clients.get(validator)
            if client is not None and not client.is_connected:
                self._forget(validator, client)
                client = None
            if client is None:
                host, port = self.endpoints[validator]
                client = await stoq.connect(host, port, insecure=True, engine=self.engine,
                                            timeout=self.timeout, keep_alive_interval=5.0)
                try:
                    self._statements[validator] = await self._authenticate(validator, client)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await client.close()
                    raise
                self._clients[validator] = client
            return client

    async def _authenticate(self, validator: str, client: stoq.AsyncClient) -> bytes | None:
        """Check the endpoint speaks for ``validator``; return our statement for it."""
        presented = client.server_certificate
        reason: str | None = "it presented no TLS certificate"
        if presented is not None:
            tls_key = spki_sha256(presented)
            try:
                identity = await client.request("consensus.identity", {},
                                                timeout=self.timeout)
            except Timeout:
                raise
            except TrustChainError as exc:  # an observer, another service, an old node
                identity = {"refusal": f"it does not answer as a validator ({exc.message})"}
            if "refusal" in identity:
                reason = str(identity["refusal"])
            elif identity.get("validator") != validator:
                reason = f"it says it is validator {str(identity.get('validator'))[:16]}"
            elif identity.get("tls_key") != tls_key:
                reason = "its link statement names another TLS key than the one it served"
            else:
                reason = link_refusal(self.validators, self.chain_id, validator, tls_key,
                                      bytes(identity.get("link") or b""))
        if reason is not None:
            if self.refused.get(validator) != reason:
                log.warning("validator endpoint refused", extra={
                    "validator": validator, "endpoint": self.endpoints[validator],
                    "reason": reason})
            self.refused[validator] = reason
            raise ImpostorEndpoint(f"the endpoint of validator {validator[:16]} is refused: "
                                   f"{reason}")
        self.refused.pop(validator, None)
        assert presented is not None
        if self.me is None or self.sign is None:
            return None
        return self.sign(link_statement(self.chain_id, self.me, spki_sha256(presented)))

    async def _request(self, validator: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        client = await self._client(validator)
        try:
            return await client.request(op, args, timeout=self.timeout)
        except (stoq.ConnectionFailed, Timeout):
            # a peer that restarted leaves a connection that only times out: open a new one
            self._forget(validator, client)
            raise

    def _forget(self, validator: str, client: stoq.AsyncClient) -> None:
        if self._clients.get(validator) is client:
            del self._clients[validator]
        task = asyncio.get_running_loop().create_task(self._close(client))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(client: stoq.AsyncClient) -> None:
        with contextlib.suppress(Exception):
            await client.close()

    async def send(self, validator: str, messages: list[bytes]) -> None:
        args: dict[str, Any] = {"sender": self.me, "link": self._statements.get(validator)}
        if sum(len(m) for m in messages) >= PACK_AT_BYTES:
            args["packed"] = pack_messages(messages)
        else:
            args["messages"] = messages
        await self._request(validator, "consensus.gossip", args)

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
