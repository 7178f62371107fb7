"""Epochs and their beacons: the unpredictable value every epoch credential starts from.

Epoch ``e`` covers the Unix times ``[e * L, (e + 1) * L)`` for the configured
length ``L``. Its beacon is 32 random bytes drawn once the epoch has begun
(never before, so no one can prepare space or time proofs for a later epoch),
chained to the previous beacon and signed by the node's ``beacon`` key, stored
in the ledger and recorded in the audit log (``consensus.beacon``). Once a
validator consensus exists, the beacon becomes the latest committed block
hash; until then the node is the beacon's only source, and signs it so that
clients can check where it came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.hazmat.primitives import serialization

from protocol.ops.consensus import beacon_statement
from store import BeaconRecord, BeaconStore, Signer

log = logging.getLogger("trustchain.consensus")

GENESIS_PREVIOUS = bytes(32)
"""The ``previous`` of the first beacon a ledger holds."""

Audit = Callable[[str, dict[str, Any]], Awaitable[Any]]


class BeaconChain:
    """Makes, stores and serves one beacon per epoch.

    :param audit: ``async (kind, data)``, returns once the record is durable.
    """

    def __init__(self, *, store: BeaconStore, signer: Signer, epoch_length: int,
                 audit: Audit, clock: Callable[[], float] = time.time) -> None:
        if epoch_length < 1:
            raise ValueError("epoch_length must be at least 1 second")
        self.store = store
        self.signer = signer
        self.epoch_length = epoch_length
        self.clock = clock
        self._audit = audit
        self._lock = asyncio.Lock()
        self.public_key = signer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    def epoch_at(self, now: float) -> int:
        """The epoch that contains Unix time ``now``."""
        return int(now // self.epoch_length)

    def current_epoch(self) -> int:
        return self.epoch_at(self.clock())

    def start_of(self, epoch: int) -> int:
        return epoch * self.epoch_length

    def get(self, epoch: int) -> BeaconRecord | None:
        """The beacon of ``epoch`` if it was made."""
        return self.store.beacon(epoch)

    async def current(self) -> BeaconRecord:
        """The beacon of the current epoch, made now if this is its first use."""
        return await self.ensure(self.current_epoch())

    async def ensure(self, epoch: int) -> BeaconRecord:
        """The beacon of ``epoch``, which must have begun; made, stored and audited once."""
        existing = self.store.beacon(epoch)
        if existing is not None:
            return existing
        if epoch > self.current_epoch():
            raise ValueError(f"epoch {epoch} has not begun")
        return await self._record(epoch, secrets.token_bytes(32))

    async def _record(self, epoch: int, value: bytes) -> BeaconRecord:
        """Sign, store and audit ``value`` as the beacon of ``epoch`` (once)."""
        async with self._lock:
            existing = self.store.beacon(epoch)
            if existing is not None:
                return existing
            previous = self.store.latest_beacon(before=epoch)
            previous_value = previous.value if previous is not None else GENESIS_PREVIOUS
            start = self.start_of(epoch)
            signature = self.signer.sign(beacon_statement(epoch=epoch, start=start, value=value,
                                                          previous=previous_value))
            record = await self.store.add_beacon(BeaconRecord(
                epoch=epoch, start=start, value=value, previous=previous_value,
                signature=signature, public_key=self.public_key,
                algorithm=self.signer.algorithm, created_at=self.clock()))
            await self._audit("consensus.beacon", {
                "epoch": record.epoch, "start": record.start, "value": record.value,
                "previous": record.previous, "signature": record.signature,
                "algorithm": record.algorithm})
            log.info("epoch beacon made", extra={"epoch": epoch})
            return record

    async def run(self, on_epoch: Callable[[int], Awaitable[None]] | None = None) -> None:
        """Make each epoch's beacon as the epoch begins (then call ``on_epoch``), forever."""
        while True:
            try:
                record = await self.current()
                if on_epoch is not None:
                    await on_epoch(record.epoch)
            except Exception:
                log.exception("epoch beacon pass failed; retrying at the next epoch")
            now = self.clock()
            await asyncio.sleep(max(0.05, self.start_of(self.epoch_at(now) + 1) - now))


class ChainBeacons(BeaconChain):
    """Beacons of a validator cluster: epoch ``e``'s beacon is the id of the first
    committed block stamped at or after the epoch's start.

    Every validator derives the same value from the same chain, and no one can
    know it before that block is committed. The node still signs the record it
    serves, so a client can tell which node answered.

    :param first_block_at: ``time_ms -> (block time_ms, block id) | None``, the first
        committed block at or after a time.
    """

    def __init__(self, *, first_block_at: Callable[[int], tuple[int, bytes] | None],
                 wait: float = 30.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._first_block_at = first_block_at
        self._wait = wait
        self._block = asyncio.Event()

    async def on_block(self, time_ms: int, block_id: bytes) -> None:
        """A block was committed: it may be the first of its epoch."""
        epoch = self.epoch_at(time_ms / 1000)
        if self.store.beacon(epoch) is None:
            await self._record(epoch, block_id)
        self._block.set()
        self._block = asyncio.Event()

    async def ensure(self, epoch: int) -> BeaconRecord:
        """The beacon of ``epoch``, waiting (up to ``wait`` s) for its first block."""
        deadline = asyncio.get_running_loop().time() + self._wait
        while True:
            existing = self.store.beacon(epoch)
            if existing is not None:
                return existing
            if epoch > self.current_epoch():
                raise ValueError(f"epoch {epoch} has not begun")
            found = self._first_block_at(self.start_of(epoch) * 1000)
            if found is not None:
                time_ms, block_id = found
                if self.epoch_at(time_ms / 1000) != epoch:
                    raise ValueError(f"the chain has no block in epoch {epoch}")
                return await self._record(epoch, block_id)
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"no block committed in epoch {epoch} yet")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._block.wait(), remaining)
