"""The development faucet: a stake credit every validator applies once a block commits it.

Stake is replicated state (the genesis stake of the configuration, then
committed credits); :class:`ChainFaucet` makes a ``stake`` decision and waits
until it is committed and executed.
"""

from __future__ import annotations

from typing import Protocol

from protocol import ConsensusRejected

from ._driver import ConsensusChain
from ._sealer import Sealer


class Faucet(Protocol):
    """How ``consensus.faucet`` credits a key (development only)."""

    async def credit(self, key_id: str, amount: int) -> None:
        """Raise ``key_id``'s stake to ``amount``; returns once it is in the ledger."""
        ...


class ChainFaucet:
    """A credit is a ``stake`` decision; every validator applies it once committed.

    :param sealer: seals with this validator's key.
    :param timeout: seconds to wait for the commit.
    """

    def __init__(self, *, chain: ConsensusChain, sealer: Sealer, timeout: float) -> None:
        self.chain = chain
        self.sealer = sealer
        self.timeout = timeout

    async def credit(self, key_id: str, amount: int) -> None:
        body = {"kind": "stake", "key_id": key_id, "amount": amount, "reason": "faucet",
                "at_ms": int(self.chain.clock() * 1000)}
        committed = await self.chain.submit(await self.sealer.seal(body), checked=False,
                                            timeout=self.timeout)
        outcome = committed.outcome
        if outcome is not None and not getattr(outcome, "accepted", True):
            raise ConsensusRejected(f"the credit was refused: {outcome.message}")
