"""The stake ledger as the node changes it, and the development faucet.

Stake changes in one place, :class:`StakeLedger`: stored (fsync), then
recorded in the audit log. In a validator cluster a faucet credit is a
decision that every validator applies once a block commits it
(:class:`ChainFaucet`); a node without a chain credits its own ledger
(:class:`LedgerFaucet`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from store import LedgerStore

from ._decisions import seal
from ._driver import ConsensusChain

log = logging.getLogger("trustchain.consensus")

Audit = Callable[[str, dict[str, Any]], Awaitable[Any]]


class StakeLedger:
    """Changes stake: stored, then audited (``consensus.stake-changed``).

    :param audit: ``async (kind, data)``, returns once the record is durable.
    """

    def __init__(self, *, ledger: LedgerStore, audit: Audit,
                 clock: Callable[[], float] = time.time) -> None:
        self.ledger = ledger
        self.clock = clock
        self._audit = audit
        self._lock = asyncio.Lock()

    def balance(self, key_id: str) -> int:
        return self.ledger.balance(key_id)

    async def set_stake(self, key_id: str, amount: int, reason: str) -> tuple[int, int]:
        """Set a key's stake; ``(before, after)`` once stored and audited."""
        async with self._lock:
            change = await self.ledger.set_stake(key_id, amount, reason, self.clock())
            await self._audit("consensus.stake-changed", {
                "key": key_id, "before": change.before, "after": change.after,
                "reason": reason})
        log.info("stake changed", extra={"key": key_id, "after": amount, "reason": reason})
        return change.before, change.after

    async def apply_genesis(self, genesis: dict[str, int]) -> int:
        """Credit the configured genesis stake to keys the ledger does not know yet.

        Once a key is in the ledger, the ledger is its authority: a changed
        genesis amount for a known key is ignored (with a warning).
        :returns: the number of keys credited.
        """
        credited = 0
        for key_id, amount in sorted(genesis.items()):
            if self.ledger.known(key_id):
                if self.ledger.balance(key_id) != amount:
                    log.warning("consensus.genesis: key %s is already in the ledger with %d; "
                                "the configured %d is ignored", key_id,
                                self.ledger.balance(key_id), amount)
                continue
            await self.set_stake(key_id, amount, "genesis")
            credited += 1
        return credited


class Faucet(Protocol):
    """How ``consensus.faucet`` credits a key (development only)."""

    async def credit(self, key_id: str, amount: int) -> None:
        """Raise ``key_id``'s stake to ``amount``; returns once it is in the ledger."""
        ...


class LedgerFaucet:
    """A node alone, without a validator chain, credits its own ledger."""

    def __init__(self, stake: StakeLedger) -> None:
        self.stake = stake

    async def credit(self, key_id: str, amount: int) -> None:
        await self.stake.set_stake(key_id, amount, "faucet")


class ChainFaucet:
    """A credit is a ``stake`` decision; every validator applies it once committed.

    :param sign: signs with this validator's key (the decision's seal).
    :param timeout: seconds to wait for the commit.
    """

    def __init__(self, *, chain: ConsensusChain, entry: str, sign: Callable[[bytes], bytes],
                 timeout: float) -> None:
        self.chain = chain
        self.entry = entry
        self.sign = sign
        self.timeout = timeout

    async def credit(self, key_id: str, amount: int) -> None:
        body = {"kind": "stake", "key_id": key_id, "amount": amount, "reason": "faucet",
                "at_ms": int(self.chain.clock() * 1000)}
        await self.chain.submit(seal(body, self.entry, self.sign), checked=False,
                                timeout=self.timeout)
